"""Whether Triton kernels can run here, decided once at import for every kernel module.

Kernels are decorated at import, so whether they are interpreted (`TRITON_INTERPRET=1`, the CPU tests) is
fixed then too. CPU-only installs without Triton (e.g. macOS) run each kernel's PyTorch reference.

Programmatic dependent launch (PDL, Hopper and later): a decode step is a chain of short kernels, each waiting
for the one before. A kernel launched with `launch_pdl=True` may start while its predecessor finishes; it must
call `wait_for_inputs` before it touches memory that an earlier kernel writes (activations, caches, outputs) and
may only read constant data (weights) before that. `release_dependents` lets the next kernel start launching.
The wait covers the whole chain: a kernel ends only after its own wait, so its successor's wait implies every
earlier kernel finished too. `SWIFTLM_PDL=0` turns it off.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401  (re-exported for the kernel modules)
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

TRITON_INTERPRETED = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


_pdl_wanted = os.environ.get("SWIFTLM_PDL", "1") != "0"


def can_use_triton(t: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or on CPU tensors when built under TRITON_INTERPRET=1 (tests)."""
    return HAS_TRITON and (t.is_cuda or TRITON_INTERPRETED)


def set_pdl(enabled: bool) -> None:
    """Turn programmatic dependent launch on or off for launches from now on (benchmarks compare both)."""
    global _pdl_wanted
    _pdl_wanted = enabled


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch with PDL: CUDA sm90+, not interpreted, not turned off."""
    return _pdl_wanted and t.is_cuda and not TRITON_INTERPRETED and _pdl_capable(t.device.index or 0)


if HAS_TRITON:

    @triton.jit
    def swizzled_tile(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(row tile, column tile) of program `pid` in grouped order: GROUP_M row tiles walk each column tile in
        turn, so consecutive programs share a weight tile while it sits in L2."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        group_rows = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows

    @triton.jit
    def wait_for_inputs(PDL: tl.constexpr):
        """Under PDL, block until the previous kernel in the stream has finished and its writes are visible."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def release_dependents(PDL: tl.constexpr):
        """Under PDL, let the next kernel in the stream start launching (it still waits for this one's writes)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()


# Arrival counters for kernels whose last-arriving program finishes a reduction (split-K GEMVs, the MoE gate's
# routing): one int32 per reduction, zero between launches (each launch's last arrivals reset theirs). Buffers
# are never freed: a captured CUDA graph keeps using the one it was captured with. Launches on a device must not
# overlap in time (one stream; a PDL launch touches them only after `wait_for_inputs`), as they share them.
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}
_MIN_COUNTERS = 1 << 14


def split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """A zeroed counter buffer for `device` with at least `tiles` slots (allocated on first need, then reused)."""
    buffers = _COUNTERS.setdefault(device, [])
    if not buffers or buffers[-1].numel() < tiles:
        buffers.append(torch.zeros(max(tiles, _MIN_COUNTERS), dtype=torch.int32, device=device))
    return buffers[-1]
