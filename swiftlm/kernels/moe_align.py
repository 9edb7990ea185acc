"""Group the (token, slot) pairs of a MoE batch by expert on the GPU.

A pair is row `t * k + slot` of the flattened `topk_ids [T, k]`. Both expert-grouped paths need the pairs in
expert order: the Triton grouped GEMM (`align_tokens`, each expert's run padded to whole BLOCK_M blocks) and the
CUTLASS path (`moe_cutlass.group_rows`, unpadded groups). Built from PyTorch ops (scatter_add_, cumsum, a radix
argsort, gathers, searchsorted) `align_tokens` cost ~60-90 us per layer on an H100 at 1600 pairs (a Qwen3-30B-A3B
decode step at batch 200; the sort alone 30 us), ~3 ms of a 33 ms step. Here it is three small kernels:

    histogram       one per block of pairs, added into `counts [E]` with E atomics
    align           one program: padded run lengths, their cumsum, each run's start as a claim cursor, the
                    expert of every BLOCK_M block (each expert labels its own run), the padding fill
    scatter         each pair claims the next slot of its expert's run with an atomic add on the cursor

(H100, 128 experts, block_m 16, CUDA-graph replay, `benchmarks/bench_moe_align.py`: 7.8 us at 1600 pairs
against 88.9 for the PyTorch ops, 24.3 against 147.4 at 64000 pairs, where the scatter's atomics on few addresses
take about half.)

Nothing syncs with the host and every grid depends only on shapes, so it runs inside CUDA graphs; per-step
sizes are not specialized on, so a new batch size does not recompile. Where Triton cannot run (CPU without the
interpreter) `align_tokens` keeps the PyTorch version, which orders pairs inside a run by pair index.
"""
from __future__ import annotations

import torch

from swiftlm.kernels.triton_support import HAS_TRITON, can_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["align_tokens", "expert_histogram", "max_padded_pairs"]

_COUNT_BLOCK = 2048
_SCATTER_BLOCK = 256  # pairs per scatter program: at decode sizes the atomics spread over several SMs
_FILL_BLOCK = 4096  # slots the align program fills per step (a decode batch's buffer in one step)
_RUN_TILE = 2048  # (expert, block of its run) pairs the align program labels per step


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Shape-only bound on the padded length: each non-empty expert pads by at most `block_m - 1`, rounded up
    to whole blocks so a program never reads past the buffer."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return -(-bound // block_m) * block_m


def expert_histogram(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert, `[E]` int32, from contiguous expert ids on a Triton device (one histogram per block of
    pairs plus E atomics: scatter_add_ took 23 us at 64000 pairs)."""
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat_ids.device)
    if flat_ids.numel():
        _count_kernel[(triton.cdiv(flat_ids.numel(), _COUNT_BLOCK),)](
            flat_ids, counts, flat_ids.numel(), num_experts, E_PAD=triton.next_power_of_2(num_experts),
            BLOCK=_COUNT_BLOCK, num_warps=4)
    return counts


def align_tokens(topk_ids: torch.Tensor, num_experts: int, block_m: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the `T*k` pairs by expert, each expert's run padded to a multiple of `block_m`.

    Returns
      sorted_token_ids `[P]` int32: pair indices (`t * k + slot`) grouped by expert, padding = T*k;
      expert_ids_per_block `[P // block_m]` int32: the expert of each block, -1 for blocks past the end;
      num_tokens_post_pad `[1]` int32: the used length (a device tensor, so the host never waits on it).
    `P = max_padded_pairs(...)` depends only on shapes, and nothing here syncs, so it can run in a CUDA graph.
    On the Triton path pairs claim their slots with atomics, so their order inside a run varies from run to run;
    no result does, since every GEMM row depends only on its own pair. The PyTorch path keeps pair order.
    """
    flat = topk_ids.reshape(-1)
    if not can_use_triton(flat):
        return _align_tokens_torch(flat, num_experts, block_m)
    num_pairs = flat.numel()
    padded_len = max_padded_pairs(num_pairs, num_experts, block_m)
    counts = expert_histogram(flat, num_experts)
    cursor = torch.empty_like(counts)
    sorted_ids = torch.empty(padded_len, dtype=torch.int32, device=flat.device)
    expert_ids = torch.empty(padded_len // block_m, dtype=torch.int32, device=flat.device)
    post_pad = torch.empty(1, dtype=torch.int32, device=flat.device)
    e_pad = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](counts, cursor, post_pad, expert_ids, sorted_ids, num_experts, num_pairs, padded_len,
                        BLOCK_M=block_m, E_PAD=e_pad, RUN_STEP=max(1, _RUN_TILE // e_pad), FILL=_FILL_BLOCK,
                        num_warps=4)
    if num_pairs:
        _scatter_pairs_kernel[(triton.cdiv(num_pairs, _SCATTER_BLOCK),)](flat, cursor, sorted_ids, num_pairs,
                                                                         BLOCK=_SCATTER_BLOCK, num_warps=4)
    return sorted_ids, expert_ids, post_pad


def _align_tokens_torch(flat: torch.Tensor, num_experts: int, block_m: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`align_tokens` in PyTorch ops, pairs in pair order inside each run (a stable sort)."""
    flat = flat.to(torch.int64)
    num_pairs = flat.numel()
    device = flat.device
    padded_len = max_padded_pairs(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[by_expert]
    sorted_ids = torch.full((padded_len,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, (ends - padded)[by_expert] + rank, order.to(torch.int32))
    block_starts = torch.arange(0, padded_len, block_m, device=device)
    experts = torch.searchsorted(ends, block_starts, right=True)
    expert_ids = torch.where(experts < num_experts, experts, -1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


if HAS_TRITON:

    @triton.jit(do_not_specialize=["n"])
    def _count_kernel(ids_ptr, counts_ptr, n, E, E_PAD: tl.constexpr, BLOCK: tl.constexpr):
        """Program (block of pairs): counts[e] += how many of its pairs go to expert e."""
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + offs, mask=offs < n, other=0).to(tl.int32)
        hist = tl.histogram(ids, E_PAD)
        experts = tl.arange(0, E_PAD)
        padding = tl.maximum(tl.program_id(0) * BLOCK + BLOCK - n, 0)  # masked-off pairs were counted as expert 0
        hist -= tl.where(experts == 0, padding, 0)
        tl.atomic_add(counts_ptr + experts, hist, mask=(experts < E) & (hist > 0), sem="relaxed")

    @triton.jit(do_not_specialize=["num_pairs", "padded_len"])
    def _align_kernel(counts_ptr, cursor_ptr, post_pad_ptr, expert_ids_ptr, sorted_ids_ptr, E, num_pairs,
                      padded_len, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, RUN_STEP: tl.constexpr,
                      FILL: tl.constexpr):
        """Single program: from the counts, each expert's run start (the scatter's cursor), the used length, the
        expert of each BLOCK_M block (-1 past the used length), and sorted_ids filled with the padding value.
        Every expert writes its own run's block ids, RUN_STEP blocks per step: an expert gets at most T pairs, so
        the steps are few, and no block searches the runs."""
        experts = tl.arange(0, E_PAD)
        real = experts < E
        counts = tl.load(counts_ptr + experts, mask=real, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        starts = tl.cumsum(padded, 0) - padded
        total = tl.sum(padded, 0)
        tl.store(cursor_ptr + experts, starts, mask=real)
        tl.store(post_pad_ptr, total)
        run_blocks = padded // BLOCK_M
        first_blocks = starts // BLOCK_M
        owners = tl.broadcast_to(experts[:, None], (E_PAD, RUN_STEP))
        for step in range(0, tl.max(run_blocks, 0), RUN_STEP):
            nth = step + tl.arange(0, RUN_STEP)
            tl.store(expert_ids_ptr + first_blocks[:, None] + nth[None, :], owners,
                     mask=nth[None, :] < run_blocks[:, None])
        num_blocks = padded_len // BLOCK_M
        for first in range(total // BLOCK_M, num_blocks, FILL):
            blocks = first + tl.arange(0, FILL)
            tl.store(expert_ids_ptr + blocks, tl.full([FILL], -1, tl.int32), mask=blocks < num_blocks)
        for first in range(0, padded_len, FILL):
            offs = first + tl.arange(0, FILL)
            tl.store(sorted_ids_ptr + offs, tl.full([FILL], 0, tl.int32) + num_pairs, mask=offs < padded_len)

    @triton.jit(do_not_specialize=["n"])
    def _scatter_pairs_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, n, BLOCK: tl.constexpr):
        """Program (block of pairs): each pair takes the next free slot of its expert's run and writes its index
        there."""
        pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = pairs < n
        experts = tl.load(ids_ptr + pairs, mask=mask, other=0)
        slots = tl.atomic_add(cursor_ptr + experts, 1, mask=mask, sem="relaxed")
        tl.store(sorted_ids_ptr + slots, pairs, mask=mask)
