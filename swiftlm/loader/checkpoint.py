"""Finding a checkpoint and streaming its tensors: local directory, hub id, or the embedded demo model."""
from __future__ import annotations

import glob
import json
import os
from typing import Iterator

import torch

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def resolve_model_path(model: str | None, revision: str | None = None, weights: bool = True) -> str:
    """Local directory for `model`: None -> the demo model, an existing path -> itself, else a hub id."""
    if model is None:
        from swiftlm.demo import demo_model_path
        return demo_model_path()
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise ValueError(f"model path {model!r} is a file; pass the checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
        patterns = _HUB_PATTERNS if weights else [p for p in _HUB_PATTERNS if p != "*.safetensors"]
        return snapshot_download(model, revision=revision, allow_patterns=patterns)
    except Exception as exc:
        raise ValueError(f"model {model!r} is not a local directory and could not be fetched from the hub "
                         f"({type(exc).__name__}: {exc}); when offline, pass a local checkpoint directory") from exc


def load_hf_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise ValueError(f"no config.json in {path!r}: not a Hugging Face checkpoint directory")
    with open(file) as f:
        cfg = json.load(f)
    # Multimodal wrappers keep the language model's fields under text_config.
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "architectures": cfg.get("architectures", [])}
    return cfg


def load_generation_config(path: str) -> dict:
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        return json.load(f)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    return sorted(glob.glob(os.path.join(path, "*.safetensors")))


def has_weights(path: str) -> bool:
    return bool(safetensors_files(path))


def iterate_weights(path: str, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) shard by shard, each tensor materialized straight on `device` (no full host copy)."""
    files = safetensors_files(path)
    if not files:
        raise ValueError(f"no *.safetensors weights in {path!r} (use --load-format dummy for random weights)")
    from safetensors import safe_open
    dev = str(device) if device.type != "cuda" else f"cuda:{device.index or 0}"
    for file in files:
        with safe_open(file, framework="pt", device=dev) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights made on the model's device (vLLM's `--load-format dummy`): norms 1, biases 0, else U(-a, a).

    The range keeps activations well-scaled so the random model runs the same kernels as a real one.
    """
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        elif "scale" in name.rsplit(".", 1)[-1]:
            param.fill_(0.01)
        elif param.dtype.is_floating_point:
            noise = torch.empty(param.shape, device=param.device, dtype=torch.float32).uniform_(-0.02, 0.02, generator=gen)
            param.copy_(noise if param.element_size() >= 2 else noise * 50)
        else:
            param.copy_(torch.randint(-2**31, 2**31 - 1, param.shape, generator=gen, device=param.device,
                                      dtype=torch.int64).to(param.dtype))
