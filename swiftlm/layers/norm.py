"""RMSNorm, with the residual add folded in so decoder layers hand one tensor pair from layer to layer.

On the GPU both forms are one Triton kernel each (swiftlm.kernels.fused_norm); elsewhere the kernels' PyTorch
references run.
"""
from __future__ import annotations

import torch
from torch import nn

from swiftlm.kernels import fused_norm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            fn = fused_norm.rms_norm if x.is_cuda else fused_norm.rms_norm_ref
            return fn(x, self.weight, self.eps)
        fn2 = fused_norm.fused_add_rms_norm if x.is_cuda else fused_norm.fused_add_rms_norm_ref
        return fn2(x, residual, self.weight, self.eps)

    def pre_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoder's pre-norm: (norm(x + residual), x + residual), or (norm(x), x) for the first layer."""
        if residual is None:
            return self(x), x
        return self(x, residual)
