"""Prefill-sized MoE on torch's grouped GEMM (`torch._grouped_mm`, CUTLASS on Hopper and Blackwell).

At prefill sizes each expert sees hundreds of rows and the MoE layer is compute-bound. There the two expert
GEMMs run faster in CUTLASS than in the Triton grouped kernel (H100, Qwen3-30B-A3B shapes, T=8000: 1123 us for
both GEMMs, 538 TFLOP/s, against 1729 us for the whole Triton layer; `benchmarks/bench_moe_grouped_mm.py`), enough
to pay for what CUTLASS cannot fuse: rows gathered into expert order first, SiLU-and-mul between the GEMMs, and
a weighted combine after. A forward is
    group the T*k (token, slot) pairs by expert, copying x rows to their group's slots     -> [T*k, H]
    GEMM1 (per-expert row groups, w13[e].T)              -> SiLU(gate) * up                  -> [T*k, I]
    GEMM2 (w2[e].T)                                      -> per token: sum_k weight * row    -> [T, H]
Nothing here syncs with the host: group ends are a device cumsum. On the GPU one kernel per token claims a row
in each of its experts' groups (an atomic cursor per expert) and writes x's row there, so the grouping costs one
read of x and one write of the rows instead of a sort plus a gather (H100, 8000 tokens of Qwen3-30B-A3B: 134
against 220 us per layer). The order of rows inside a group then varies from run to run, which changes no
result: each GEMM row depends only on its own input row. The combine sums each token's k rows in fp32 in slot
order, so a token's output does not depend on the rest of the batch. 16-bit weights only (torch's grouped GEMM
is bf16 on CUDA); FP8 experts keep the Triton paths.
"""
from __future__ import annotations

import torch

from swiftlm.kernels.activation import silu_and_mul
from swiftlm.kernels.moe_align import expert_histogram
from swiftlm.kernels.triton_support import HAS_TRITON, can_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["cutlass_moe", "cutlass_moe_supported", "group_rows"]

_COMBINE_BLOCK = 1024
_SCATTER_BLOCK = 1024


def cutlass_moe_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether `cutlass_moe` runs these operands on a GPU: bf16 activations and experts on sm90+, with the
    16-byte-aligned rows CUTLASS needs."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda and HAS_TRITON):
        return False
    if not (x.dtype == w13.dtype == w2.dtype == torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return w13.shape[2] % 8 == 0 and w2.shape[2] % 8 == 0


def group_rows(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, position, group_ends): `rows [T*k, H]` copies of x's rows grouped by expert, `position [T*k]` the
    row of pair `t * k + slot`, `group_ends [E]` int32 cumulative row counts (the grouped GEMM's `offs`)."""
    num_tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    if not can_use_triton(x):
        counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device)
        counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int32))
        order = torch.argsort(flat, stable=True)
        position = torch.empty_like(order)
        position.scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return x.index_select(0, order // top_k), position, torch.cumsum(counts, 0, dtype=torch.int32)
    rows = x.new_empty(num_tokens * top_k, x.shape[1])
    position = torch.empty(num_tokens * top_k, dtype=torch.int32, device=x.device)
    counts = expert_histogram(flat, num_experts)
    if not num_tokens:
        return rows, position, counts
    group_ends = torch.cumsum(counts, 0, dtype=torch.int32)
    cursor = group_ends - counts
    block = min(_SCATTER_BLOCK, triton.next_power_of_2(x.shape[1]))
    _scatter_rows_kernel[(num_tokens,)](x, topk_ids, cursor, rows, position, x.shape[1], x.stride(0),
                                        topk_ids.stride(0), rows.stride(0), TOP_K=top_k,
                                        K_PAD=triton.next_power_of_2(top_k), BLOCK=block, num_warps=4)
    return rows, position, group_ends


def cutlass_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor) -> torch.Tensor:
    """x `[T, H]`, w13 `[E, 2I, H]`, w2 `[E, H, I]`, routing `[T, k]` -> `[T, H]` in x's dtype.

    Operands are `fused_moe`'s, already checked there. Runs wherever `torch._grouped_mm` takes the dtype (also
    CPU, for tests); the combine is a Triton kernel, or PyTorch where Triton cannot run."""
    num_tokens, top_k = topk_ids.shape
    rows, position, group_ends = group_rows(x, topk_ids, w13.shape[0])
    act = silu_and_mul(torch._grouped_mm(rows, w13.transpose(1, 2), offs=group_ends))
    expert_out = torch._grouped_mm(act, w2.transpose(1, 2), offs=group_ends)
    weights = topk_weights.to(torch.float32).contiguous()
    if not can_use_triton(x):
        picked = expert_out.index_select(0, position).view(num_tokens, top_k, -1).float()
        return (picked * weights[..., None]).sum(1).to(x.dtype)
    out = torch.empty_like(x)
    hidden = x.shape[1]
    block = min(_COMBINE_BLOCK, triton.next_power_of_2(hidden))
    _combine_kernel[(num_tokens, triton.cdiv(hidden, block))](
        expert_out, position, weights, out, hidden, expert_out.stride(0), out.stride(0), TOP_K=top_k, BLOCK=block,
        num_warps=4)
    return out


if HAS_TRITON:

    @triton.jit
    def _combine_kernel(rows_ptr, position_ptr, weights_ptr, out_ptr, H, stride_r, stride_o,
                        TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        """Program (token, column block): out[t] = sum over slots of weight[t, slot] * rows[position[t, slot]],
        in fp32, slots in order."""
        token = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < H
        acc = tl.zeros([BLOCK], tl.float32)
        for slot in tl.static_range(TOP_K):
            row = tl.load(position_ptr + token * TOP_K + slot)
            weight = tl.load(weights_ptr + token * TOP_K + slot)
            acc += weight * tl.load(rows_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64) * stride_o + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_rows_kernel(x_ptr, ids_ptr, cursor_ptr, rows_ptr, position_ptr, H, stride_x, stride_ids,
                             stride_r, TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """Program (token): claim a row in each of the token's experts' groups and copy x's row to all of them."""
        token = tl.program_id(0)
        slots = tl.arange(0, K_PAD)
        rows = tl.zeros([K_PAD], tl.int64)
        for slot in tl.static_range(TOP_K):
            expert = tl.load(ids_ptr + token * stride_ids + slot)
            row = tl.atomic_add(cursor_ptr + expert, 1, sem="relaxed")
            tl.store(position_ptr + token * TOP_K + slot, row)
            rows = tl.where(slots == slot, row.to(tl.int64), rows)
        x_row = x_ptr + token.to(tl.int64) * stride_x
        for start in range(0, H, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < H
            vals = tl.load(x_row + offs, mask=mask)
            copies = tl.broadcast_to(vals[None, :], (K_PAD, BLOCK))
            tl.store(rows_ptr + rows[:, None] * stride_r + offs[None, :], copies,
                     mask=(slots < TOP_K)[:, None] & mask[None, :])
