"""A corpus of MoE checkpoints written by real writers (transformers, llama.cpp's converter,
llm-compressor) from tiny configs with random weights, cached under ~/.cache/ktnuma-corpus/<versions>/.

`python -m tests.corpus [--only NAME...] [--list]` builds (or reuses) it and prints one line per model.
"""
