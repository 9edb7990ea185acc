"""Quantization config -> per-layer linear method.

`get_linear_method(quantization, hf_quant_config)` reads the engine's `--quantization` flag and the
checkpoint's `quantization_config` and returns `quant_for(prefix)`, which the model calls once per linear
layer (prefixes such as "model.layers.0.self_attn.qkv_proj"): a `LinearMethod`, or None for unquantized.

Supported: compressed-tensors FP8-dynamic checkpoints (8-bit float weights with per-channel scales, dynamic
per-token activations), AutoAWQ "gemm" checkpoints (4-bit, zero point), and online FP8 (`quantization="fp8"`
on a 16-bit checkpoint). Layers the checkpoint leaves unquantized (compressed-tensors `ignore`, AWQ
`modules_to_not_convert`) get None; a fused layer (qkv_proj, gate_up_proj) is checked through the checkpoint
names of its parts, which must agree.
"""
from __future__ import annotations

import re
from typing import Callable

from swiftlm.layers.linear import LinearMethod
from swiftlm.layers.quantization.awq import AWQLinearMethod
from swiftlm.layers.quantization.fp8 import Fp8LinearMethod

__all__ = ["AWQLinearMethod", "Fp8LinearMethod", "get_linear_method", "FUSED_LAYERS"]

# Our fused layer name -> the checkpoint names it is built from.
FUSED_LAYERS: dict[str, tuple[str, ...]] = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                                            "gate_up_proj": ("gate_proj", "up_proj")}
# Layers online FP8 keeps in 16 bits: the output head and MoE routers (small, accuracy-sensitive).
_ONLINE_FP8_SKIP = ("lm_head", "gate")

QuantFor = Callable[[str], "LinearMethod | None"]


def _checkpoint_names(prefix: str) -> list[str]:
    """Checkpoint module names behind one of our layers (several for a fused layer)."""
    parent, _, leaf = prefix.rpartition(".")
    parts = FUSED_LAYERS.get(leaf)
    if parts is None:
        return [prefix]
    return [f"{parent}.{part}" if parent else part for part in parts]


def _is_skipped(prefix: str, matches: Callable[[str], bool]) -> bool:
    """Whether a layer stays unquantized; a fused layer's parts must all agree."""
    verdicts = {matches(name) for name in _checkpoint_names(prefix)}
    if len(verdicts) > 1:
        raise ValueError(f"checkpoint quantizes only some of the projections fused into {prefix}")
    return verdicts.pop()


def _ct_ignored(ignore: list[str]) -> Callable[[str], bool]:
    """compressed-tensors `ignore`: exact module names (matched as a dotted suffix) or "re:<regex>" patterns."""
    patterns = [re.compile(entry[3:]) for entry in ignore if entry.startswith("re:")]
    names = [entry for entry in ignore if not entry.startswith("re:")]

    def matches(name: str) -> bool:
        return any(name == n or name.endswith("." + n) for n in names) or any(p.match(name) for p in patterns)

    return matches


def _compressed_tensors_fp8(config: dict) -> QuantFor:
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors config has no config_groups")
    for name, group in groups.items():
        weights = group.get("weights") or {}
        acts = group.get("input_activations") or {}
        fp8_channel = (weights.get("num_bits") == 8 and weights.get("type") == "float"
                       and weights.get("strategy") == "channel")
        dynamic_token = (acts.get("num_bits") == 8 and acts.get("type") == "float" and bool(acts.get("dynamic"))
                         and acts.get("strategy") == "token")
        if not (fp8_channel and dynamic_token):
            raise NotImplementedError(
                f"compressed-tensors group {name!r} is not FP8-dynamic (8-bit float weights, strategy channel; "
                f"dynamic 8-bit float activations, strategy token): weights={weights}, input_activations={acts}")
    ignored = _ct_ignored(list(config.get("ignore") or []))
    method = Fp8LinearMethod(checkpoint_fp8=True)
    return lambda prefix: None if _is_skipped(prefix, ignored) else method


def _awq(config: dict) -> QuantFor:
    bits = config.get("bits", config.get("w_bit"))
    group_size = config.get("group_size", config.get("q_group_size"))
    version = str(config.get("version", "gemm")).lower()
    if bits != 4 or not config.get("zero_point", True) or version != "gemm" or not group_size or group_size < 0:
        raise NotImplementedError(f"AWQ checkpoints must be 4-bit, zero-point, version gemm, grouped; got {config}")
    not_converted = list(config.get("modules_to_not_convert") or [])
    method = AWQLinearMethod(int(group_size))
    # AutoAWQ/transformers skip a module when any entry is a substring of its name.
    return lambda prefix: None if _is_skipped(prefix, lambda n: any(m in n for m in not_converted)) else method


def _online_fp8() -> QuantFor:
    method = Fp8LinearMethod(checkpoint_fp8=False)
    return lambda prefix: None if prefix.rpartition(".")[2] in _ONLINE_FP8_SKIP else method


def get_linear_method(quantization: str | None, hf_quant_config: dict | None) -> QuantFor:
    """Map a layer prefix to its linear method (None = unquantized) for this engine/checkpoint pair.

    A quantized checkpoint decides the method; `quantization` may restate it ("fp8" for compressed-tensors
    FP8, "awq") but not contradict it. Without a checkpoint config, "fp8" quantizes 16-bit weights online.
    """
    quantization = quantization.lower() if quantization else None
    if hf_quant_config:
        method = str(hf_quant_config.get("quant_method", "")).lower()
        if method == "compressed-tensors":
            if quantization not in (None, "fp8", "compressed-tensors"):
                raise ValueError(f"--quantization {quantization} does not match this FP8 compressed-tensors checkpoint")
            return _compressed_tensors_fp8(hf_quant_config)
        if method == "awq":
            if quantization not in (None, "awq"):
                raise ValueError(f"--quantization {quantization} does not match this AWQ checkpoint")
            return _awq(hf_quant_config)
        raise NotImplementedError(f"checkpoint quantization {method!r} is not supported "
                                  "(supported: compressed-tensors FP8-dynamic, awq)")
    if quantization is None:
        return lambda prefix: None
    if quantization == "fp8":
        return _online_fp8()
    if quantization in ("awq", "compressed-tensors"):
        raise ValueError(f"--quantization {quantization} needs a checkpoint quantized that way")
    raise ValueError(f"unknown quantization {quantization!r} (supported: fp8, awq, compressed-tensors)")
