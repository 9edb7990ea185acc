"""Feed a step's sampled tokens straight into the next step's input ids, on the device.

Under asynchronous scheduling the host launches step n+1 before it has read step n's samples, so the input id
of every token that step n sampled is unknown on the host. The host packs a placeholder plus (flat token index,
sample row) pairs; this kernel copies `sampled[row]` over the placeholder after the step buffer reaches the
device and before the forward reads it. One launch of one program: at most `max_num_seqs` pairs per step.
"""
from __future__ import annotations

import torch

from swiftlm.kernels.triton_support import HAS_TRITON, can_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["fill_sampled_ids", "fill_sampled_ids_ref"]


def fill_sampled_ids_ref(ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                         sampled: torch.Tensor) -> None:
    """`ids[positions[i]] = sampled[rows[i]]` for every pair, in place."""
    ids[positions.long()] = sampled[rows.long()].to(ids.dtype)


def fill_sampled_ids(ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, sampled: torch.Tensor,
                     max_pairs: int) -> None:
    """As `fill_sampled_ids_ref`, in one kernel launch; `max_pairs` (fixed per engine) sizes the program so
    every step reuses one compiled variant."""
    if positions.shape != rows.shape or positions.numel() > max_pairs:
        raise ValueError(f"{positions.numel()} positions and {rows.numel()} rows; at most {max_pairs} pairs")
    if not can_use_triton(ids):
        fill_sampled_ids_ref(ids, positions, rows, sampled)
        return
    _fill_kernel[(1,)](ids, positions, rows, sampled, positions.numel(),
                       BLOCK=triton.next_power_of_2(max(max_pairs, 16)), num_warps=4)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n"], do_not_specialize_on_alignment=["pos_ptr", "row_ptr", "sampled_ptr"])
    def _fill_kernel(ids_ptr, pos_ptr, row_ptr, sampled_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        pos = tl.load(pos_ptr + offs, mask=mask, other=0)
        row = tl.load(row_ptr + offs, mask=mask, other=0)
        token = tl.load(sampled_ptr + row, mask=mask, other=0)
        tl.store(ids_ptr + pos, token.to(ids_ptr.dtype.element_ty), mask=mask)
