"""Run llama.cpp's convert_hf_to_gguf.py unchanged except for the vocabulary: `python gguf_driver.py
LLAMA_CPP_DIR ARGS...`. The corpus models have no tokenizer (random weights, no hub), so every model
class's set_vocab is replaced by the converter's own `_set_vocab_none` (tokenizer.ggml.model = "none");
tensors and hyper-parameters go through the converter's code as they would for a user."""
import runpy
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1]).resolve()
    sys.path.insert(0, str(root))
    sys.path.insert(1, str(root / "gguf-py"))
    import conversion  # noqa: F401 - registers every model class

    def no_vocab(self) -> None:
        self._set_vocab_none()

    get_model_class = conversion.get_model_class

    def get_model_class_no_vocab(*a, **kw):
        cls = get_model_class(*a, **kw)
        cls.set_vocab = no_vocab
        return cls

    conversion.get_model_class = get_model_class_no_vocab
    sys.argv = [str(root / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
