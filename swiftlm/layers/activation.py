"""SwiGLU activation over a merged gate/up projection (one Triton kernel on the GPU)."""
from __future__ import annotations

import torch
from torch import nn

from swiftlm.kernels import activation


class SiluAndMul(nn.Module):
    """[T, 2I] (gate | up) -> silu(gate) * up, [T, I]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(x) if x.is_cuda else activation.silu_and_mul_ref(x)
