"""Rotary position embedding (neox rotate-half layout, as Qwen uses), with default and YaRN frequency tables."""
from __future__ import annotations

import math

import torch
from torch import nn


def _yarn_inv_freq(dim: int, base: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; returns (inv_freq, attention factor)."""
    factor = float(scaling["factor"])
    original = scaling.get("original_max_position_embeddings") or max_position

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        if scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32.0
    beta_slow = scaling.get("beta_slow") or 1.0

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def compute_inv_freq(head_dim: int, base: float, scaling: dict | None, max_position: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the factor applied to cos/sin, for the config's rope type."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", None):
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, base, scaling or {}, max_position)
    if rope_type == "linear":
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return inv / float(scaling["factor"]), 1.0
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, yarn)")


class RotaryEmbedding(nn.Module):
    """The cos/sin table `[max_position, head_dim]` (cos half, then sin half) that the fused RoPE kernel reads."""

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None, dtype: torch.dtype) -> None:
        super().__init__()
        inv_freq, factor = compute_inv_freq(head_dim, base, scaling, max_position)
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv_freq)
        cos_sin = torch.cat([freqs.cos() * factor, freqs.sin() * factor], dim=-1).to(torch.float32)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        self.head_dim = head_dim
