"""Architecture registry: config.json `architectures[0]` -> model class."""
from __future__ import annotations

import importlib

from torch import nn

_REGISTRY: dict[str, tuple[str, str]] = {
    "Qwen3ForCausalLM": ("swiftlm.models.qwen3", "Qwen3ForCausalLM"),
    "Qwen2ForCausalLM": ("swiftlm.models.qwen3", "Qwen2ForCausalLM"),
    "Qwen3MoeForCausalLM": ("swiftlm.models.qwen3_moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def get_model_class(hf_config: dict) -> type[nn.Module]:
    archs = hf_config.get("architectures") or []
    for arch in archs:
        if arch in _REGISTRY:
            module, name = _REGISTRY[arch]
            return getattr(importlib.import_module(module), name)
    raise ValueError(f"unsupported architecture {archs!r}; swiftlm supports {supported_architectures()}")
