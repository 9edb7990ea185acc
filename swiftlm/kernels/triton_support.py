"""Whether Triton kernels can run here, decided once at import for every kernel module.

Kernels are decorated at import, so whether they are interpreted (`TRITON_INTERPRET=1`, the CPU tests) is
fixed then too. CPU-only installs without Triton (e.g. macOS) run each kernel's PyTorch reference.
"""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401  (re-exported for the kernel modules)
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

TRITON_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_use_triton(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors when built under TRITON_INTERPRET=1 (tests)."""
    return HAS_TRITON and (t.is_cuda or TRITON_INTERPRETED)


if HAS_TRITON:

    @triton.jit
    def swizzled_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles walk each column tile in
        turn, so consecutive programs share a weight tile while it sits in L2."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows
