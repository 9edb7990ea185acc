"""Fused MoE: routing, alignment, both GEMM paths (bf16/fp32/fp8) vs the PyTorch reference, and the FusedMoE layer.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set before triton is imported), so shapes stay
small; tile configs are forced where a case must cover several N tiles, a ragged K, or multi-chunk experts.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from swiftlm.kernels import fused_moe as fm  # noqa: E402
from swiftlm.kernels.fused_moe import MoeTileConfig  # noqa: E402
from swiftlm.kernels.fused_norm import fused_add_rms_norm_ref  # noqa: E402
from swiftlm.kernels.triton_support import split_counters  # noqa: E402
from swiftlm.kernels import moe_align, moe_cutlass  # noqa: E402
from swiftlm.kernels.moe_cutlass import group_rows  # noqa: E402
from swiftlm.layers.moe import FusedMoE  # noqa: E402
from swiftlm.layers.norm import RMSNorm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (fm.HAS_TRITON and (CUDA or fm.TRITON_INTERPRETED)),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SMALL = MoeTileConfig(16, 16, 32)  # several N tiles and a ragged K on the test shapes


def experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / math.sqrt(hidden)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / math.sqrt(inter)
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def routing(tokens: int, num_experts: int, top_k: int, seed: int = 0, hot: list[int] | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random softmax top-k routing; `hot` experts get a large logit bonus so the others stay empty."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen)
    if hot:
        logits[:, hot] += 20.0
    weights, ids = fm.route_ref(logits.to(DEVICE), top_k, renormalize=True)
    return weights, ids


def activations(tokens: int, hidden: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


# ---- routing -------------------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("tokens,num_experts,top_k,renorm", [(1, 8, 2, True), (5, 16, 4, False), (70, 128, 8, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_matches_reference(tokens: int, num_experts: int, top_k: int, renorm: bool, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(tokens)
    # Distinct values, exact in bf16 (k / 16, k < 256), so the top-k set has no ties to break differently.
    ranks = torch.stack([torch.randperm(num_experts, generator=gen) for _ in range(tokens)])
    logits = (ranks.float() / 16).to(DEVICE, dtype)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=DEVICE)
    weights, ids = fm.route(logits, top_k, renorm, expert_counts=counts)
    ref_w, ref_ids = fm.route_ref(logits, top_k, renorm)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-5)
    assert bool((weights[:, :-1] >= weights[:, 1:]).all())
    if renorm:
        torch.testing.assert_close(weights.sum(-1), torch.ones(tokens, device=DEVICE))
    assert torch.equal(counts, torch.bincount(ids.flatten().long(), minlength=num_experts))
    fm.route(logits, top_k, renorm, expert_counts=counts)
    assert counts.sum() == 2 * tokens * top_k  # accumulates across calls


@needs_kernels
def test_route_ties_go_to_lower_expert_ids() -> None:
    weights, ids = fm.route(torch.zeros(3, 8, device=DEVICE), 3, True)
    assert ids.tolist() == [[0, 1, 2]] * 3
    torch.testing.assert_close(weights, torch.full((3, 3), 1 / 3, device=DEVICE))


@pytest.mark.parametrize("limit", [0, 3, 70])
def test_route_counts_only_the_real_tokens(limit: int) -> None:
    """CUDA-graph batches end with padding tokens: `count_limit` (a device scalar, read in the kernel) keeps them
    out of the expert statistics while every token is still routed."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(70, 16, generator=gen).to(DEVICE)
    counts = torch.zeros(16, dtype=torch.int64, device=DEVICE)
    weights, ids = fm.route(logits, 4, True, expert_counts=counts,
                            count_limit=torch.tensor([limit], dtype=torch.int32, device=DEVICE))
    assert torch.equal(ids, fm.route_ref(logits, 4, True)[1])
    assert torch.equal(counts, torch.bincount(ids[:limit].flatten().long(), minlength=16))


def test_route_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="top_k"):
        fm.route(torch.zeros(2, 4), 5, True)
    with pytest.raises(ValueError, match="expert_counts"):
        fm.route(torch.zeros(2, 4), 2, True, expert_counts=torch.zeros(4, dtype=torch.int32))


@needs_kernels
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden", [(1, 16, 4, 64), (3, 8, 2, 48), (8, 128, 8, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_route_matches_gate_then_route(tokens: int, num_experts: int, top_k: int, hidden: int,
                                            dtype: torch.dtype) -> None:
    """The fused decode kernel (gate GEMV + routing by the last program) equals F.linear + route_ref, and its
    counters are back at zero after each launch (two launches in a row give the same answer)."""

    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(DEVICE, dtype)
    gate = (torch.randn(num_experts, hidden, generator=gen) / math.sqrt(hidden)).to(DEVICE, dtype)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=DEVICE)
    logits = x.float() @ gate.float().t()  # fp32 sums rounded to the activation dtype, as a linear's output
    if dtype == torch.bfloat16 and fm.TRITON_INTERPRETED:  # the interpreter's fp32 -> bf16 cast truncates
        logits = (logits.view(torch.int32) & ~0xFFFF).view(torch.float32)
    else:
        logits = logits.to(dtype)
    want_w, want_i = fm.route_ref(logits, top_k, renormalize=True)
    for _ in range(2):
        weights, ids = fm.gate_route(x, gate, top_k, True, counts)
        assert split_counters(x.device, 1)[0] == 0
        # The same experts up to ties of rounded logits (torch.topk breaks ties either way; the kernel: lower id).
        assert torch.equal(logits.gather(1, ids.long()), logits.gather(1, want_i.long()))
        torch.testing.assert_close(weights, want_w, **(dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else
                                                       dict(atol=5e-3, rtol=1e-2)))
    assert torch.equal(counts, 2 * torch.bincount(ids.flatten().long(), minlength=num_experts))


@needs_kernels
def test_gate_route_counts_only_real_tokens_and_falls_back_past_gemv_sizes(monkeypatch) -> None:
    """The real-token limit applies in the fused kernel; past GATE_ROUTE_MAX_TOKENS the gate GEMM and `route` run."""
    x = activations(fm.GATE_ROUTE_MAX_TOKENS + 1, 32, torch.float32)
    gate = torch.randn(8, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    counts = torch.zeros(8, dtype=torch.int64, device=DEVICE)
    limit = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    _, ids = fm.gate_route(x[:4], gate, 2, False, counts, limit)
    assert torch.equal(counts, torch.bincount(ids[:2].flatten().long(), minlength=8))
    calls = []
    route = fm.route
    monkeypatch.setattr(fm, "route", lambda *a: calls.append(a[0].shape) or route(*a))
    weights, ids = fm.gate_route(x, gate, 2, False)
    assert calls == [(fm.GATE_ROUTE_MAX_TOKENS + 1, 8)]
    want_w, want_i = fm.route_ref(x @ gate.t(), 2, False)
    assert torch.equal(ids, want_i) and torch.allclose(weights, want_w, atol=1e-6)
    with pytest.raises(ValueError, match="gate weight"):
        fm.gate_route(x, gate.t(), 2, False)


@needs_kernels
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (3, 40), (2, 1100), (fm.GATE_ROUTE_MAX_TOKENS, 64),
                                           (fm.GATE_ROUTE_MAX_TOKENS + 1, 64)])
def test_norm_gate_route_matches_add_norm_then_gate_route(tokens: int, hidden: int) -> None:
    """Fused sizes (ragged H, several K tiles at 1100) and the unfused fallback past them: the normalized input,
    the new residual, the routing and the expert counts of add + RMSNorm followed by `gate_route`, in fp32."""
    gen = torch.Generator().manual_seed(tokens)
    hid, res = (torch.randn(tokens, hidden, generator=gen).to(DEVICE) for _ in range(2))
    gamma = (torch.rand(hidden, generator=gen) + 0.5).to(DEVICE)
    gate = (torch.randn(16, hidden, generator=gen) / 4).to(DEVICE)
    counts = torch.zeros(16, dtype=torch.int64, device=DEVICE)
    limit = torch.tensor([max(1, tokens - 1)], dtype=torch.int32, device=DEVICE)
    x, new_res, weights, ids = fm.norm_gate_route(hid, res, gamma, 1e-6, gate, 4, True, counts, limit)
    want_x, want_res = fused_add_rms_norm_ref(hid, res, gamma, 1e-6)
    want_w, want_i = fm.route_ref(want_x @ gate.t(), 4, True)
    torch.testing.assert_close(x, want_x, atol=1e-5, rtol=1e-5)
    assert torch.equal(new_res, want_res)
    assert torch.equal(ids, want_i)
    torch.testing.assert_close(weights, want_w, atol=1e-5, rtol=1e-4)
    assert torch.equal(counts, torch.bincount(ids[:int(limit[0])].flatten().long(), minlength=16))
    assert split_counters(x.device, 1)[0] == 0
    with pytest.raises(ValueError, match="residual"):
        fm.norm_gate_route(hid, res[:, :8], gamma, 1e-6, gate, 4, True)


# ---- alignment -----------------------------------------------------------------------------------------------

def _align_oracle(ids: torch.Tensor, num_experts: int, block_m: int
                  ) -> tuple[list[int], list[int], list[tuple[int, list[int], int]]]:
    """Plain-Python version: each expert's pairs in pair order, padded with T*k up to a multiple of block_m.
    Returns (sorted ids, expert of each used block, runs as (start, pairs, padded length))."""
    flat = ids.flatten().tolist()
    pad = len(flat)
    sorted_ids, block_experts, runs = [], [], []
    for e in range(num_experts):
        pairs = [i for i, x in enumerate(flat) if x == e]
        if not pairs:
            continue
        padded = -(-len(pairs) // block_m) * block_m
        runs.append((len(sorted_ids), pairs, padded))
        sorted_ids += pairs + [pad] * (padded - len(pairs))
        block_experts += [e] * (padded // block_m)
    return sorted_ids, block_experts, runs


ALIGN_CASES = [(1, 16, 2, 16, None), (3, 8, 2, 4, None), (17, 16, 4, 16, None), (64, 8, 2, 16, [2, 5]),
               (70, 16, 4, 64, None), (0, 8, 2, 16, None), (40, 12, 3, 8, [1, 6, 11]), (200, 128, 8, 16, None),
               (400, 128, 4, 16, [3, 77]), (1200, 16, 8, 16, None)]


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernels), False])
@pytest.mark.parametrize("tokens,num_experts,top_k,block_m,hot", ALIGN_CASES)
def test_align_tokens_exact(tokens: int, num_experts: int, top_k: int, block_m: int, hot: list[int] | None,
                            kernel: bool, monkeypatch) -> None:
    """Each expert's run holds exactly its pairs, then padding, at the oracle's offset; blocks name their expert.
    The Triton path claims slots with atomics, so only the PyTorch path's order inside a run is checked. Cases:
    a non-power-of-two expert count, empty experts (`hot`), a Qwen3-30B-A3B decode step at batch 200, experts
    with more blocks than the align program labels per step, several fill steps and scatter programs."""
    if not kernel:
        monkeypatch.setattr(moe_align, "can_use_triton", lambda t: False)
    _, ids = routing(tokens, num_experts, top_k, seed=tokens, hot=hot)
    assert moe_align.can_use_triton(ids) == kernel
    sorted_ids, expert_ids, post_pad = fm.align_tokens(ids, num_experts, block_m)
    want_sorted, want_experts, runs = _align_oracle(ids.cpu(), num_experts, block_m)
    num_pairs, want_len = tokens * top_k, len(want_sorted)
    capacity = moe_align.max_padded_pairs(num_pairs, num_experts, block_m)
    assert sorted_ids.shape == (capacity,) and expert_ids.shape == (capacity // block_m,) and post_pad.shape == (1,)
    assert sorted_ids.dtype == expert_ids.dtype == post_pad.dtype == torch.int32
    assert post_pad.tolist() == [want_len]
    got = sorted_ids.tolist()
    for start, pairs, padded in runs:
        assert sorted(got[start:start + len(pairs)]) == pairs
        assert got[start + len(pairs):start + padded] == [num_pairs] * (padded - len(pairs))
    if not kernel:
        assert got[:want_len] == want_sorted
    assert got[want_len:] == [num_pairs] * (capacity - want_len)
    n_used = want_len // block_m
    assert expert_ids[:n_used].tolist() == want_experts
    assert expert_ids[n_used:].tolist() == [-1] * (capacity // block_m - n_used)


def test_align_tokens_cases_cover_several_steps() -> None:
    """`ALIGN_CASES` reach the multi-step loops of the align kernel and several scatter programs."""
    tokens, num_experts, top_k, block_m, _ = ALIGN_CASES[-1]
    pairs = tokens * top_k
    assert pairs > 2 * moe_align._SCATTER_BLOCK
    assert moe_align.max_padded_pairs(pairs, num_experts, block_m) > 2 * moe_align._FILL_BLOCK
    tokens, num_experts, top_k, block_m, hot = ALIGN_CASES[-2]
    _, ids = routing(tokens, num_experts, top_k, seed=tokens, hot=hot)
    hot_blocks = -(-int((ids == hot[0]).sum()) // block_m)
    assert hot_blocks > moe_align._RUN_TILE // num_experts
    for tokens, num_experts, top_k, _, hot in ALIGN_CASES:
        if hot and len(hot) == top_k:  # every pair goes to a hot expert
            _, ids = routing(tokens, num_experts, top_k, seed=tokens, hot=hot)
            assert set(ids.flatten().tolist()) == set(hot)


# ---- fused MoE vs reference ----------------------------------------------------------------------------------

CASES = [
    # tokens, experts, top_k, hidden, inter, hot experts, configs (None = heuristic)
    pytest.param(1, 16, 2, 64, 32, None, None, id="T1-E16-most-empty"),
    pytest.param(2, 8, 4, 64, 32, None, None, id="T2-E8-k4"),
    pytest.param(3, 16, 2, 48, 24, None, (SMALL, SMALL), id="T3-ragged-K-N"),
    pytest.param(17, 8, 2, 64, 32, None, None, id="T17"),
    pytest.param(16, 16, 4, 64, 32, None, None, id="T16-k4-64-pairs"),
    pytest.param(32, 8, 2, 32, 16, [3, 6], (SMALL, SMALL), id="T32-two-hot-experts"),
]


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter,hot,configs", CASES)
def test_low_latency_matches_reference(tokens, num_experts, top_k, hidden, inter, hot, configs, dtype) -> None:
    w13, w2 = experts(num_experts, hidden, inter, dtype)
    weights, ids = routing(tokens, num_experts, top_k, hot=hot)
    x = activations(tokens, hidden, dtype)
    out = fm.fused_moe(x, w13, w2, weights, ids, path="low_latency", configs=configs)
    _check(out, fm.fused_moe_ref(x, w13, w2, weights, ids), dtype)


GEMV_CASES = [
    # tokens, experts, top_k, hidden, inter, configs (None = heuristic)
    pytest.param(1, 16, 2, 64, 32, None, id="T1-E16"),
    pytest.param(1, 8, 8, 64, 32, None, id="T1-every-expert"),
    pytest.param(2, 4, 3, 64, 32, None, id="T2-shared-experts"),
    pytest.param(2, 8, 2, 48, 24, (fm.MoeGemvConfig(4, 32, 1), fm.MoeGemvConfig(8, 16, 1)), id="T2-ragged-K-N"),
    pytest.param(3, 8, 2, 64, 32, (fm.MoeGemvConfig(16, 64, 2), fm.MoeGemvConfig(2, 32, 1)), id="T3-forced"),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter,configs", GEMV_CASES)
def test_gemv_matches_reference(tokens, num_experts, top_k, hidden, inter, configs, dtype) -> None:
    w13, w2 = experts(num_experts, hidden, inter, dtype)
    weights, ids = routing(tokens, num_experts, top_k)
    x = activations(tokens, hidden, dtype)
    out = fm.fused_moe(x, w13, w2, weights, ids, path="gemv", configs=configs)
    _check(out, fm.fused_moe_ref(x, w13, w2, weights, ids), dtype)


@needs_kernels
def test_gemv_token_result_does_not_depend_on_the_batch() -> None:
    """Each token's top-k sum runs in a fixed order inside one program, so a token's bits are the same alone or
    beside another token (what makes batched decode reproducible)."""
    w13, w2 = experts(8, 64, 32, torch.bfloat16)
    weights, ids = routing(2, 8, 4)
    x = activations(2, 64, torch.bfloat16)
    both = fm.fused_moe(x, w13, w2, weights, ids, path="gemv")
    alone = fm.fused_moe(x[1:], w13, w2, weights[1:], ids[1:], path="gemv")
    assert torch.equal(both[1:], alone)


GROUPED_CASES = CASES[:3] + [
    pytest.param(17, 8, 2, 64, 32, None, (MoeTileConfig(32, 32, 32), MoeTileConfig(32, 64, 32)), id="T17-bm32"),
    pytest.param(70, 16, 4, 64, 32, None, None, id="T70-k4"),
    pytest.param(66, 8, 2, 48, 24, [1, 4], (MoeTileConfig(64, 16, 32, group_m=4),) * 2, id="T66-hot-bm64-ragged"),
]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter,hot,configs", GROUPED_CASES)
def test_grouped_matches_reference(tokens, num_experts, top_k, hidden, inter, hot, configs, dtype) -> None:
    w13, w2 = experts(num_experts, hidden, inter, dtype)
    weights, ids = routing(tokens, num_experts, top_k, hot=hot)
    x = activations(tokens, hidden, dtype)
    out = fm.fused_moe(x, w13, w2, weights, ids, path="grouped", configs=configs)
    _check(out, fm.fused_moe_ref(x, w13, w2, weights, ids), dtype)


CUTLASS_DTYPES = [torch.bfloat16] if CUDA else [torch.float32, torch.bfloat16]  # CUDA's grouped GEMM is bf16


@needs_kernels
@pytest.mark.parametrize("dtype", CUTLASS_DTYPES)
@pytest.mark.parametrize("tokens,num_experts,top_k,hot", [(1, 4, 2, None), (37, 8, 3, None),
                                                          (40, 16, 4, [3, 9, 12, 14])])
def test_cutlass_matches_reference(tokens, num_experts, top_k, hot, dtype) -> None:
    """torch's grouped GEMM on expert-sorted rows, including experts with no rows (`hot` leaves 12 empty)."""
    w13, w2 = experts(num_experts, 32, 16, dtype)
    weights, ids = routing(tokens, num_experts, top_k, hot=hot)
    x = activations(tokens, 32, dtype)
    out = fm.fused_moe(x, w13, w2, weights, ids, path="cutlass")
    _check(out, fm.fused_moe_ref(x, w13, w2, weights, ids), dtype)


@pytest.mark.parametrize("kernel", [pytest.param(True, marks=needs_kernels), False])
@pytest.mark.parametrize("top_k", [2, 3])
def test_group_rows_puts_each_pair_in_its_experts_group(top_k, kernel, monkeypatch) -> None:
    """Every (token, slot) pair's row is x's row, inside its expert's group; groups are contiguous and sized by
    the routing (expert 4 gets none). Row order inside a group is free (the GPU claims rows atomically); without
    Triton a stable sort groups them."""
    if not kernel:
        monkeypatch.setattr(moe_cutlass, "can_use_triton", lambda t: False)
    num_tokens, num_experts = 9, 5
    ids = torch.stack([torch.randperm(4)[:top_k] for _ in range(num_tokens)]).to(DEVICE)
    x = torch.randn(num_tokens, 40, device=DEVICE)
    rows, position, ends = group_rows(x, ids, num_experts)
    counts = torch.bincount(ids.flatten().cpu(), minlength=num_experts)
    assert ends.dtype == torch.int32 and ends.tolist() == torch.cumsum(counts, 0).tolist()
    assert sorted(position.tolist()) == list(range(num_tokens * top_k))
    starts = [0] + ends.tolist()[:-1]
    for pair, row in enumerate(position.tolist()):
        token, expert = pair // top_k, ids.flatten()[pair].item()
        assert starts[expert] <= row < ends[expert].item()
        assert torch.equal(rows[row], x[token])


@needs_kernels
def test_auto_path_takes_cutlass_from_its_pairs_per_expert(monkeypatch) -> None:
    """Where CUTLASS is supported, auto dispatch switches from grouped to cutlass at exactly
    CUTLASS_MIN_PAIRS_PER_EXPERT mean pairs per expert."""

    class Grouped(Exception):
        pass

    def no_align(*args):
        raise Grouped

    calls: list[int] = []
    monkeypatch.setattr(fm, "cutlass_moe_supported", lambda *a: True)
    monkeypatch.setattr(fm, "cutlass_moe", lambda x, *a: calls.append(x.shape[0]) or torch.zeros_like(x))
    monkeypatch.setattr(fm, "align_tokens", no_align)
    num_experts, top_k = 4, 2
    w13, w2 = experts(num_experts, 16, 8, torch.float32)
    tokens = fm.CUTLASS_MIN_PAIRS_PER_EXPERT * num_experts // top_k
    weights, ids = routing(tokens, num_experts, top_k)
    x = activations(tokens, 16, torch.float32)
    fm.fused_moe(x, w13, w2, weights, ids)
    assert calls == [tokens]
    with pytest.raises(Grouped):
        fm.fused_moe(x[1:], w13, w2, weights[1:], ids[1:])


@needs_kernels
def test_expert_with_more_tokens_than_a_block_runs_in_chunks() -> None:
    """Top-1 routing with 40 tokens on expert 2 and 8 on expert 5: expert 2's leader loops over 16+16+8 rows."""
    tokens, num_experts = 48, 8
    w13, w2 = experts(num_experts, 32, 16, torch.float32)
    ids = torch.tensor([[5] if t % 6 == 0 else [2] for t in range(tokens)], dtype=torch.int32, device=DEVICE)
    weights = torch.rand(tokens, 1, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x = activations(tokens, 32, torch.float32)
    out = fm.fused_moe(x, w13, w2, weights, ids, path="low_latency")
    _check(out, fm.fused_moe_ref(x, w13, w2, weights, ids), torch.float32)


@needs_kernels
def test_ref_matches_per_expert_loop() -> None:
    """The reference itself against the textbook formula sum_j w_j * down(silu(gate x) * up x)."""
    w13, w2 = experts(4, 16, 8, torch.float32)
    weights, ids = routing(5, 4, 2)
    x = activations(5, 16, torch.float32)
    want = torch.zeros(5, 16, device=DEVICE)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            gate, up = w13[e, :8] @ x[t], w13[e, 8:] @ x[t]
            want[t] += weights[t, j] * (w2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(fm.fused_moe_ref(x, w13, w2, weights, ids), want, atol=1e-5, rtol=1e-5)


@needs_kernels
def test_auto_path_dispatch_by_token_and_pair_count(monkeypatch) -> None:
    """Up to GEMV_MAX_TOKENS tokens the GEMV kernels run; then up to LOW_LATENCY_MAX_PAIRS pairs nothing is sorted
    (low-latency path); one pair more aligns (grouped path)."""
    calls: list[str] = []
    align, gemv = fm.align_tokens, fm._moe_gemv
    monkeypatch.setattr(fm, "align_tokens", lambda *a: calls.append("grouped") or align(*a))
    monkeypatch.setattr(fm, "_moe_gemv", lambda *a: calls.append("gemv") or gemv(*a))
    w13, w2 = experts(8, 32, 16, torch.float32)
    half = fm.LOW_LATENCY_MAX_PAIRS // 2
    for tokens, path in ((fm.GEMV_MAX_TOKENS, ["gemv"]), (fm.GEMV_MAX_TOKENS + 1, []), (half, []),
                         (half + 1, ["grouped"])):
        calls.clear()
        weights, ids = routing(tokens, 8, 2)
        x = activations(tokens, 32, torch.float32)
        out = fm.fused_moe(x, w13, w2, weights, ids)
        _check(out, fm.fused_moe_ref(x, w13, w2, weights, ids), torch.float32)
        assert calls == path


@needs_kernels
def test_bad_inputs_and_empty_batch() -> None:
    w13, w2 = experts(4, 16, 8, torch.float32)
    weights, ids = routing(40, 4, 2)
    x = activations(40, 16, torch.float32)
    with pytest.raises(ValueError, match="low-latency"):
        fm.fused_moe(x, w13, w2, weights, ids, path="low_latency")
    with pytest.raises(ValueError, match="block_m"):
        fm.fused_moe(x, w13, w2, weights, ids, path="grouped",
                     configs=(MoeTileConfig(16, 16, 16), MoeTileConfig(32, 16, 16)))
    with pytest.raises(ValueError, match="w2"):
        fm.fused_moe(x, w13, w2[:, :8], weights, ids)
    with pytest.raises(ValueError, match="MoeGemvConfig"):
        fm.fused_moe(x[:1], w13, w2, weights[:1], ids[:1], path="gemv", configs=(SMALL, SMALL))
    with pytest.raises(ValueError, match="powers of two"):
        fm.fused_moe(x[:1], w13, w2, weights[:1], ids[:1], path="gemv",
                     configs=(fm.MoeGemvConfig(3, 32), fm.MoeGemvConfig(4, 32)))
    with pytest.raises(ValueError, match="path"):
        fm.fused_moe(x, w13, w2, weights, ids, path="fast")
    with pytest.raises(ValueError, match="cutlass"):
        fm.fused_moe(x, w13, w2, weights, ids, path="cutlass", configs=(SMALL, SMALL))
    with pytest.raises(ValueError, match="cutlass"):
        fm.fused_moe(x.bfloat16(), w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn), weights, ids,
                     torch.ones(4, 16, 1, device=DEVICE), torch.ones(4, 16, 1, device=DEVICE), path="cutlass")
    empty = fm.fused_moe(x[:0], w13, w2, weights[:0], ids[:0])
    assert empty.shape == (0, 16)


# ---- FP8 PTPC ------------------------------------------------------------------------------------------------

@needs_kernels
@pytest.mark.parametrize("path,tokens", [("gemv", 2), ("low_latency", 3), ("grouped", 3), ("grouped", 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matches_reference(path: str, tokens: int, dtype: torch.dtype) -> None:
    """Tensor-core paths are W8A8 (activations quantized per row), the GEMV path W8A16; each against the
    reference doing the same."""
    from swiftlm.kernels.quant import quantize_weight_fp8_ref

    w13, w2 = experts(8, 64, 32, dtype)
    q13, s13 = quantize_weight_fp8_ref(w13)
    q2, s2 = quantize_weight_fp8_ref(w2)
    assert q13.dtype == torch.float8_e4m3fn and s13.shape == (8, 64, 1) and s2.shape == (8, 64, 1)
    weights, ids = routing(tokens, 8, 2)
    x = activations(tokens, 64, dtype)
    out = fm.fused_moe(x, q13, q2, weights, ids, s13, s2, path=path)
    ref = fm.fused_moe_ref(x, q13, q2, weights, ids, s13, s2, quantize_activations=path != "gemv")
    # Same math as the reference; bf16 can flip an fp8 rounding of the intermediate, hence the looser bound.
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    exact = fm.fused_moe_ref(x, w13, w2, weights, ids).float()
    assert (ref.float() - exact).norm() / exact.norm() < 0.1  # e4m3 (3 mantissa bits) on both GEMMs


def test_fp8_needs_scales() -> None:
    w13, w2 = experts(4, 16, 8, torch.float32)
    weights, ids = routing(2, 4, 2)
    with pytest.raises(ValueError, match="scale"):
        fm.fused_moe(activations(2, 16, torch.float32), w13.to(torch.float8_e4m3fn), w2.to(torch.float8_e4m3fn),
                     weights, ids)


# ---- FusedMoE layer ------------------------------------------------------------------------------------------

def _checkpoint_experts(num_experts: int, hidden: int, inter: int) -> dict[tuple[int, str], torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    return {(e, s): torch.randn(*shape, generator=gen) / math.sqrt(shape[1])
            for e in range(num_experts) for s, shape in shapes.items()}


def _load(layer: FusedMoE, tensors: dict[tuple[int, str], torch.Tensor]) -> None:
    for (expert, shard), t in tensors.items():
        param = layer.w2_weight if shard == "down" else layer.w13_weight
        param.weight_loader(param, t.to(DEVICE), expert, shard)


def test_loader_places_gate_up_down() -> None:
    layer = FusedMoE(4, 2, 16, 8, torch.float32).to(DEVICE)
    tensors = _checkpoint_experts(4, 16, 8)
    _load(layer, tensors)
    for e in range(4):
        assert torch.equal(layer.w13_weight[e, :8].cpu(), tensors[e, "gate"])
        assert torch.equal(layer.w13_weight[e, 8:].cpu(), tensors[e, "up"])
        assert torch.equal(layer.w2_weight[e].cpu(), tensors[e, "down"])
    with pytest.raises(ValueError, match="expected"):
        layer.weight_loader(layer.w13_weight, torch.zeros(16, 8), 0, "gate")
    with pytest.raises(ValueError, match="belongs to w2_weight"):
        layer.weight_loader(layer.w13_weight, torch.zeros(16, 8), 0, "down")
    with pytest.raises(ValueError, match="shard"):
        layer.weight_loader(layer.w13_weight, torch.zeros(8, 16), 0, "gate_up")
    with pytest.raises(ValueError, match="out of range"):
        layer.weight_loader(layer.w13_weight, torch.zeros(8, 16), 4, "up")


def test_loader_takes_this_ranks_intermediate_slice() -> None:
    layer = FusedMoE(2, 1, 16, 8, torch.float32, tp_rank=1, tp_size=2)
    tensors = _checkpoint_experts(2, 16, 8)
    _load(layer, {k: v.cpu() for k, v in tensors.items()})
    assert layer.w13_weight.shape == (2, 8, 16) and layer.w2_weight.shape == (2, 16, 4)
    assert torch.equal(layer.w13_weight[1, :4], tensors[1, "gate"][4:])
    assert torch.equal(layer.w13_weight[1, 4:], tensors[1, "up"][4:])
    assert torch.equal(layer.w2_weight[1], tensors[1, "down"][:, 4:])


@pytest.mark.parametrize("tokens", [3, 40])
def test_layer_forward_and_expert_stats(tokens: int) -> None:
    """Loaded from per-expert tensors, the layer equals the HF-style loop over those tensors."""
    layer = FusedMoE(8, 2, 32, 16, torch.float32).to(DEVICE)
    tensors = _checkpoint_experts(8, 32, 16)
    _load(layer, tensors)
    layer.enable_expert_stats()
    x = activations(tokens, 32, torch.float32)
    gate = torch.randn(8, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = layer(x, gate)
    probs = torch.softmax(x.cpu() @ gate.cpu().t(), -1)
    top_w, top_i = torch.topk(probs, 2, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    want = torch.zeros(tokens, 32)
    for t in range(tokens):
        for j in range(2):
            e = int(top_i[t, j])
            h = torch.nn.functional.silu(tensors[e, "gate"] @ x[t].cpu()) * (tensors[e, "up"] @ x[t].cpu())
            want[t] += top_w[t, j] * (tensors[e, "down"] @ h)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)
    layer(x, gate)
    assert torch.equal(layer.expert_counts.cpu(), 2 * torch.bincount(top_i.flatten(), minlength=8))
    layer.reset_expert_stats()
    assert layer.expert_counts.sum() == 0


@needs_kernels
@pytest.mark.parametrize("tokens", [3, 40])
def test_layer_forward_pre_norm_equals_norm_then_forward(tokens: int) -> None:
    """The sparse block's entry (norm inside the gate launch at 3 tokens, unfused at 40; the first layer's
    residual-free form) against RMSNorm then `forward`."""
    layer = FusedMoE(8, 2, 32, 16, torch.float32).to(DEVICE)
    _load(layer, _checkpoint_experts(8, 32, 16))
    norm = RMSNorm(32, 1e-6, torch.float32).to(DEVICE)
    norm.weight.data.uniform_(0.5, 1.5, generator=torch.Generator(DEVICE).manual_seed(2))
    hidden, residual = activations(tokens, 32, torch.float32), activations(tokens, 32, torch.float32, seed=5)
    gate = torch.randn(8, 32, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out, new_residual = layer.forward_pre_norm(hidden, residual, norm, gate)
    x, want_residual = norm.pre_norm(hidden, residual)
    torch.testing.assert_close(out, layer(x, gate), atol=1e-5, rtol=1e-5)
    assert torch.equal(new_residual, want_residual)
    out, same = layer.forward_pre_norm(hidden, None, norm, gate)
    torch.testing.assert_close(out, layer(norm(hidden), gate), atol=1e-5, rtol=1e-5)
    assert same is hidden


@needs_kernels
def test_layer_online_fp8() -> None:
    layer = FusedMoE(8, 2, 64, 32, torch.bfloat16, quant="fp8").to(DEVICE)
    _load(layer, _checkpoint_experts(8, 64, 32))
    x = activations(4, 64, torch.bfloat16)
    gate = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    exact = layer(x, gate).float()
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.w13_weight.dtype == layer.w2_weight.dtype == torch.float8_e4m3fn
    assert layer.w13_scale.shape == (8, 64, 1) and layer.w2_scale.shape == (8, 64, 1)
    out = layer(x, gate).float()
    assert (out - exact).norm() / exact.norm() < 0.1
    with pytest.raises(ValueError, match="unsupported MoE quantization"):
        FusedMoE(2, 1, 16, 8, torch.float32, quant="awq")


# ---- GPU only ------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("tokens", [4, 48, 512])
def test_cuda_graph_replay_without_host_sync(tokens: int) -> None:
    """Routing from the gate (fused at 4 tokens) and the experts (GEMV path at 4 tokens, grouped at 48, cutlass
    at 512: 128 pairs per expert) capture in a CUDA graph (no syncs: sync debug mode errors on one) and replay on
    new inputs like eager runs."""
    w13, w2 = experts(16, 256, 128, torch.bfloat16)
    x = activations(tokens, 256, torch.bfloat16)
    gate = (torch.randn(16, 256, device=DEVICE) / 16).to(torch.bfloat16)
    counts = torch.zeros(16, dtype=torch.int64, device=DEVICE)

    def step() -> torch.Tensor:
        weights, ids = fm.gate_route(x, gate, 4, True, counts)
        return fm.fused_moe(x, w13, w2, weights, ids)

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        x.copy_(activations(tokens, 256, torch.bfloat16, seed=seed + 10))
        want = step()
        counts.zero_()
        graph.replay()
        assert torch.equal(out, want)
        weights, ids = fm.gate_route(x, gate, 4, True)
        _check(out, fm.fused_moe_ref(x, w13, w2, weights, ids), torch.bfloat16)
        assert counts.sum() == tokens * 4
