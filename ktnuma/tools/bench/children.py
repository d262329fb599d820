"""What the timed child processes run (``python -m ktnuma.bench --child KIND ...``): kt-kernel's own
loader, ktnuma.stream and attach feeding kt-kernel's engines, and the peers a user would otherwise
pick, each loading the model's routed-expert tensors into owned CPU memory, every byte touched."""
from __future__ import annotations

import json
import os

# format -> kt_kernel.utils.loader class of the upstream path
UPSTREAM_LOADERS = {"bf16": "BF16SafeTensorLoader", "fp8": "FP8SafeTensorLoader",
                    "gptq-int4": "GPTQSafeTensorLoader", "rawint4": "CompressedSafeTensorLoader",
                    "mxfp4": "MXFP4SafeTensorLoader"}


def _engine_ctx():
    from ktnuma.integrations import kt_kernel as K

    return K, K.make_cpuinfer(threads=max(1, len(os.sched_getaffinity(0))))


def child_upstream(model: str) -> int:
    import gc

    import torch
    from kt_kernel.utils import loader as L

    from ktnuma.index.experts import index_model

    K, cpu = _engine_ctx()
    idx = index_model(model)
    c = idx.config
    if idx.format.startswith("gguf:"):
        return _child_upstream_gguf(model, idx, K, cpu)
    cls = getattr(L, UPSTREAM_LOADERS[idx.format])
    spec = K.backend_for(idx.format, hidden=c.hidden_size, intermediate=c.moe_intermediate_size,
                         num_experts=c.num_experts, experts_per_tok=c.experts_per_tok or 2,
                         group_size=c.group_size)
    engines = []
    for layer in c.layers:
        loader = cls(model)
        w = loader.load_experts(f"model.layers.{layer}")
        arrays = {}
        for proj in K.PROJS:
            arrays[(proj, "weight")] = [t.data_ptr() for t in w[proj]]
            if f"{proj}_scale" in w:
                sc = [t.to(torch.float32).contiguous() if idx.format == "fp8" else t for t in w[f"{proj}_scale"]]
                w[f"{proj}_scale"] = sc
                arrays[(proj, "scale")] = [t.data_ptr() for t in sc]
        engines.append(K.build_moe(cpu, spec, arrays, mode="pointers", layer_idx=layer))
        del w, arrays
        loader.close_all_handles()
        del loader
        gc.collect()
    print(json.dumps({"engines": len(engines)}), flush=True)
    return 0


def _child_upstream_gguf(model: str, idx, K, cpu) -> int:
    """kt-kernel's GGUFLoader (metadata parsed once, the file mapped) + llamafile MOE per layer."""
    import gc

    from kt_kernel.utils import loader as L

    c = idx.config
    files = sorted({f.path for f in idx.files})
    loader = L.GGUFLoader(files[0] if len(files) == 1 else os.path.dirname(files[0]))
    engines = []
    for layer in c.layers:
        arrays, types = {}, []
        for proj in K.PROJS:
            data, ggml_type = loader.get_undequanted_tensor_and_ggml_type(f"blk.{layer}.ffn_{proj}_exps.weight")
            arrays[(proj, "weight")] = data.numpy().reshape(c.num_experts, -1)
            types.append(ggml_type.name)
        spec = K.backend_for(f"gguf:{types[0]}", hidden=c.hidden_size, intermediate=c.moe_intermediate_size,
                             num_experts=c.num_experts, experts_per_tok=c.experts_per_tok or 2,
                             gguf_types=tuple(types))
        engines.append(K.build_moe(cpu, spec, arrays, mode="flat", layer_idx=layer))
        del arrays
        gc.collect()
    print(json.dumps({"engines": len(engines)}), flush=True)
    return 0


def child_stream(model: str, nodes: int, split: str) -> int:
    import ktnuma

    K, cpu = _engine_ctx()
    engines = []
    with ktnuma.stream(model, nodes=nodes, split=split, prefetch=1) as layers:
        for staged in layers:
            eng = K.engines_for_layer(staged, cpu)
            eng.release_sources()  # the engine copied the layer: let the stream unmap it
            engines.append(eng)
    print(json.dumps({"engines": len(engines)}), flush=True)
    return 0


def child_attach(manifest: str) -> int:
    import ktnuma

    K, cpu = _engine_ctx()
    engines = []
    with ktnuma.attach(manifest) as att:
        for layer in att.layers:
            engines.append(K.engines_for_layer(att.layer(layer), cpu))
    print(json.dumps({"engines": len(engines)}), flush=True)
    return 0


# ------------------------------------------------------------------ peers
def _touch(t) -> int:
    """Read every byte of tensor t (a sum over its bytes), as a consumer would."""
    import torch

    return int(torch.sum(t.reshape(-1).view(torch.uint8), dtype=torch.int64))


def _peer_safetensors(spec: dict) -> list:
    from safetensors import safe_open

    out = []
    for path, names in spec.items():
        with safe_open(path, framework="pt") as f:
            for n in names:
                out.append(f.get_tensor(n))  # an owned copy (read from its mapping)
    return out


def _peer_fastsafetensors(spec: dict) -> list:
    from fastsafetensors import fastsafe_open

    with fastsafe_open(list(spec), framework="pt", device="cpu", nogds=True) as f:
        return [f.get_tensor(n) for names in spec.values() for n in names]  # own their buffer


def _peer_runai(spec: dict) -> list:
    from runai_model_streamer import SafetensorsStreamer

    names = [n for ns in spec.values() for n in ns]
    with SafetensorsStreamer() as s:
        s.stream_files(list(spec), tensor_names=names, owned=True)
        return [t for _, t in s.get_tensors()]


# peer case -> loader of {file: [routed-expert tensor names]} -> owned tensors
PEERS = {"safetensors": _peer_safetensors, "fastsafetensors": _peer_fastsafetensors, "runai": _peer_runai}


def child_peer(kind: str, spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    tensors = PEERS[kind](spec)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    check = sum(_touch(t) for t in tensors)
    print(json.dumps({"tensors": len(tensors), "bytes": nbytes, "sum": check}), flush=True)
    return 0
