"""Fused mixture-of-experts (Qwen3-MoE): routing, token alignment and two grouped-GEMM paths.

Weights are stacked per expert and row-major in the reduction dim: `w13 [E, 2I, H]` (gate rows `0..I-1`, up rows
`I..2I-1`) and `w2 [E, H, I]`. A forward is

    route -> GEMM1: x @ w13[e].T with SiLU(gate) * up fused in the epilogue          -> [T*k, I]
          -> GEMM2: . @ w2[e].T scaled by the routing weight in the epilogue          -> [T, k, H]
          -> sum over the k slots of each token                                      -> [T, H]

A (token, slot) pair is row `t * k + slot` of the flattened `topk_ids`. Four ways to run the GEMMs:

* GEMV (at most `GEMV_MAX_TOKENS` tokens, i.e. small-batch decode): CUDA-core dot products, no tensor cores, the
  dense decode GEMV's design (`kernels/gemv.py`). GEMM1 runs on grid (pair, N tile), each program streaming the
  gate and up rows of its tile of its pair's expert; GEMM2 runs on grid (token, N tile), each program walking the
  token's k experts and summing their routing-weighted rows in fp32, so the top-k sum needs no extra pass. FP8
  weights are W8A16 here (e4m3 tiles upcast in registers, activations not quantized), as in the dense decode GEMV.
  A pair's expert is read once per pair: once per step for one token (its k experts are distinct); with a few
  tokens an expert they share is read by each (the second read often hits L2), which still beat the
  low-latency path's read-once gather up to 8 tokens.
* low latency (at most `LOW_LATENCY_MAX_PAIRS` pairs, i.e. decode): grid (pair, N tile). The program of the first
  pair routed to an expert (its "leader") gathers every pair of that expert and streams that expert's weight tile
  exactly once; the other programs exit after one 256-byte load. No sort or alignment kernels run, so a decode
  MoE layer is route + two GEMMs + sum, and the grid depends only on shapes (CUDA-graph safe).
* grouped (prefill and large batches): `align_tokens` (`swiftlm.kernels.moe_align`) groups the pairs by expert
  and pads each expert's run to BLOCK_M; every program computes one (BLOCK_M rows of one expert) x BLOCK_N
  tensor-core tile.
* cutlass (prefill-sized, bf16 on sm90+): torch's CUTLASS grouped GEMM, `swiftlm.kernels.moe_cutlass`.

On the low-latency and grouped paths the top-k sum is a separate reduce over a `[T, k, H]` buffer rather than
atomics into an fp32 output (the cutlass path's combine kernel likewise sums each token's rows in order): it is
deterministic (same bits run to run and whatever else shares the batch), needs no zero-fill or fp32 -> dtype cast
pass, and costs about what the atomics' read-modify-write traffic would.

FP8 PTPC: `w13`/`w2` in float8_e4m3fn with per-(expert, output channel) scales `[E, N, 1]`; activations are
quantized per row (token for GEMM1, pair for GEMM2) right before each GEMM, and both scales are applied to the
fp32 accumulator, which is exact because each scale is constant along the reduction.

Every Triton path sits beside a PyTorch reference (`*_ref`), which is also the CPU path: the public wrappers run
Triton on CUDA tensors, and on CPU tensors only when the kernels were built under `TRITON_INTERPRET=1`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swiftlm.kernels.fused_norm import fused_add_rms_norm, fused_add_rms_norm_ref
from swiftlm.kernels.moe_align import align_tokens
from swiftlm.kernels.moe_cutlass import cutlass_moe, cutlass_moe_supported
from swiftlm.kernels.triton_support import HAS_TRITON, TRITON_INTERPRETED, can_use_triton, split_counters, use_pdl

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.gemv import fma_tile, fma_tile_norm
    from swiftlm.kernels.triton_support import release_dependents, swizzled_tile, wait_for_inputs

__all__ = [
    "CUTLASS_MIN_PAIRS_PER_EXPERT",
    "GATE_ROUTE_MAX_TOKENS",
    "GEMV_MAX_TOKENS",
    "LOW_LATENCY_MAX_PAIRS",
    "MoeGemvConfig",
    "MoeTileConfig",
    "align_tokens",
    "fused_moe",
    "fused_moe_ref",
    "gate_route",
    "gemv_configs",
    "grouped_config",
    "low_latency_config",
    "norm_gate_route",
    "route",
    "route_ref",
]


# Tokens up to which the GEMV path runs: on the H100 (Qwen3-30B-A3B shapes, bf16 and fp8) it beat the low-latency
# path at 1, 2, 4 and 8 tokens and the grouped path at 16 (286 vs 344 us bf16), the largest count measured.
GEMV_MAX_TOKENS = 16
# Tokens up to which `gate_route` fuses the gate GEMM with routing (measured on the H100 up to 8).
GATE_ROUTE_MAX_TOKENS = 8
# Pairs (T * top_k) up to which the low-latency path runs; also the width of the pair scan in its kernel.
LOW_LATENCY_MAX_PAIRS = 64
# Mean pairs per expert from which auto dispatch hands 16-bit experts to torch's CUTLASS grouped GEMM.
CUTLASS_MIN_PAIRS_PER_EXPERT = 32
FP8_DTYPE = torch.float8_e4m3fn
_DEFAULT_NUM_SMS = 132  # H100 SXM; used off-GPU (interpreter) so tile choices match the GPU.
_SMEM_BUDGET = 160 * 1024  # bytes of pipelined tiles per program; H100 has 227 KB, leave room for the epilogue


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_at_least(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


# ---------------------------------------------------------------------------------------------------------------
# Routing
# ---------------------------------------------------------------------------------------------------------------

def route_ref(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (fp32) over experts, top-k, optional renormalization to sum 1 (Qwen3 `norm_topk_prob`)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool, expert_counts: torch.Tensor | None = None,
          count_limit: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits `[T, E]` -> (weights `[T, k]` fp32, expert ids `[T, k]` int32), weights in descending order.

    One Triton kernel on GPU (softmax, k rounds of arg-max, renormalize) instead of the five or so launches of
    the PyTorch version, which matters at decode where a 48-layer model runs it 48 times per step. Ties go to
    the lower expert id. `expert_counts` (`[E]` int64), when given, is incremented by the number of tokens
    routed to each expert, with atomics in the same kernel: no extra launch and no host sync. `count_limit` (`[1]`
    int32 on the device) counts only the first that many tokens: a CUDA-graph batch ends with padding tokens.
    """
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [T, E], got {tuple(router_logits.shape)}")
    num_tokens, num_experts = router_logits.shape
    _check_routing(num_experts, top_k, expert_counts)
    if not can_use_triton(router_logits):
        weights, ids = route_ref(router_logits, top_k, renormalize)
        if expert_counts is not None:
            flat = (ids if count_limit is None else ids[: int(count_limit[0])]).reshape(-1).long()
            expert_counts.index_add_(0, flat, torch.ones_like(flat))
        return weights, ids
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = _pow2_at_least(num_experts)
    block_t = max(1, min(64, 4096 // block_e))
    _route_kernel[(_cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, weights if expert_counts is None else expert_counts,
        ids if count_limit is None else count_limit, num_tokens, num_experts, router_logits.stride(0),
        router_logits.stride(1), TOP_K=top_k, TOP_K_PAD=_pow2_at_least(top_k), RENORMALIZE=renormalize,
        COUNT=expert_counts is not None, HAS_LIMIT=count_limit is not None, BLOCK_T=block_t, BLOCK_E=block_e,
        num_warps=4)
    return weights, ids


def gate_route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool,
               expert_counts: torch.Tensor | None = None, count_limit: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x `[T, H]` and the router gate's weight `[E, H]` -> `route(x @ gate_weight.T, ...)`.

    Up to `GATE_ROUTE_MAX_TOKENS` tokens (decode) one Triton launch does both: its programs compute slices of the
    logits with the GEMV's CUDA-core loop and the last one to finish routes, which saves the gate GEMM's launch
    and the routing kernel's (together ~10 us per layer of a batch-1 Qwen3-30B-A3B step on an H100, for 0.5 MB
    of gate weight). The logits are rounded to x's dtype first, as the unfused gate linear's output is.
    """
    _check_gate(x, gate_weight, top_k, expert_counts)
    if not (can_use_triton(x) and 0 < x.shape[0] <= GATE_ROUTE_MAX_TOKENS):
        return route(F.linear(x, gate_weight), top_k, renormalize, expert_counts, count_limit)
    return _launch_gate_route(x, gate_weight, top_k, renormalize, expert_counts, count_limit)


def norm_gate_route(hidden: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                    gate_weight: torch.Tensor, top_k: int, renormalize: bool,
                    expert_counts: torch.Tensor | None = None, count_limit: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sparse block's input: (x, hidden + residual, weights, ids) with x = RMSNorm(hidden + residual) and
    (weights, ids) = `gate_route(x, ...)`.

    At `gate_route`'s fused sizes the norm runs inside its launch too, as the dense GEMV's norm mode does: each
    program normalizes as it loads (the row's 1/rms scales its finished sums) and program 0 also writes the new
    residual and x for the experts, saving the add + RMSNorm kernel (~2 us per layer at batch 1). The gate then
    sees x unrounded (fp32), where the unfused path rounds it to x's dtype first.
    """
    _check_gate(hidden, gate_weight, top_k, expert_counts)
    if residual.shape != hidden.shape or norm_weight.shape != (hidden.shape[1],):
        raise ValueError(f"residual {tuple(residual.shape)} and norm weight {tuple(norm_weight.shape)} do not match "
                         f"hidden {tuple(hidden.shape)}")
    if not (can_use_triton(hidden) and 0 < hidden.shape[0] <= GATE_ROUTE_MAX_TOKENS):
        add_norm = fused_add_rms_norm if can_use_triton(hidden) else fused_add_rms_norm_ref
        x, new_residual = add_norm(hidden, residual, norm_weight, eps)
        return (x, new_residual, *gate_route(x, gate_weight, top_k, renormalize, expert_counts, count_limit))
    if residual.stride(1) != 1 or norm_weight.stride(0) != 1:
        raise ValueError("norm_gate_route operands must be contiguous along H")
    x, new_residual = torch.empty_like(hidden), torch.empty_like(residual)
    weights, ids = _launch_gate_route(hidden, gate_weight, top_k, renormalize, expert_counts, count_limit,
                                      norm=(residual, norm_weight, eps, new_residual, x))
    return x, new_residual, weights, ids


def _check_gate(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, expert_counts: torch.Tensor | None) -> None:
    if gate_weight.dim() != 2 or x.dim() != 2 or gate_weight.shape[1] != x.shape[1] or gate_weight.dtype != x.dtype:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and gate weight {tuple(gate_weight.shape)} "
                         f"{gate_weight.dtype} must be [T, H] and [E, H] of one dtype")
    _check_routing(gate_weight.shape[0], top_k, expert_counts)


def _check_routing(num_experts: int, top_k: int, expert_counts: torch.Tensor | None) -> None:
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    if expert_counts is not None and (expert_counts.shape != (num_experts,) or expert_counts.dtype != torch.int64):
        raise ValueError(f"expert_counts must be [{num_experts}] int64")


def _launch_gate_route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool,
                       expert_counts: torch.Tensor | None, count_limit: torch.Tensor | None,
                       norm: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused gate + route launch; `norm` = (residual, norm weight, eps, new residual out, x out)."""
    if x.stride(1) != 1 or gate_weight.stride(1) != 1:
        raise ValueError("gate_route operands must be contiguous along H")
    num_tokens, hidden = x.shape
    num_experts = gate_weight.shape[0]
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=x.device)
    logits = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    residual, norm_weight, eps, residual_out, normed = norm if norm is not None else (x, x, 0.0, x, x)
    block_n = 2  # 64 programs stream Qwen3-MoE's 128-expert gate
    pdl = use_pdl(x)
    per_warp = 32 * 16 // x.element_size()
    block_k = max(32, min(per_warp * 4, _pow2_at_least(hidden)))
    _gate_route_kernel[(_cdiv(num_experts, block_n),)](
        x, gate_weight, logits, split_counters(x.device, 1), weights, ids,  # the GEMV's counters: launches on
        # one stream each leave their slots at zero
        weights if expert_counts is None else expert_counts, ids if count_limit is None else count_limit,
        residual, norm_weight, residual_out, normed, num_tokens, num_experts, x.stride(0), gate_weight.stride(0),
        residual.stride(0), residual_out.stride(0), normed.stride(0), eps, K=hidden, TOP_K=top_k,
        TOP_K_PAD=_pow2_at_least(top_k), RENORMALIZE=renormalize, COUNT=expert_counts is not None,
        HAS_LIMIT=count_limit is not None, NORM=norm is not None, BLOCK_T=_pow2_at_least(num_tokens),
        BLOCK_N=block_n, BLOCK_K=block_k, CHUNK=min(16 // x.element_size(), block_k),
        E_PAD=_pow2_at_least(num_experts), num_warps=4, PDL=pdl, launch_pdl=pdl)
    return weights, ids


def _quant_ops():
    """`swiftlm.kernels.quant` (per-token activation and per-channel weight FP8 quantization, shared with the
    dense FP8 linears), imported on first fp8 use: it needs Triton at import, and the 16-bit path must not."""
    from swiftlm.kernels import quant
    return quant


# ---------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------

def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, quantize_activations: bool = True) -> torch.Tensor:
    """PyTorch loop over the experts that received tokens (fp32 math): the test oracle and the CPU path.

    It rounds where the kernels do (the SwiGLU output and each pair's weighted row to x's dtype) and, for fp8
    weights, quantizes activations per row exactly like the tensor-core kernels (`quantize_activations=False`:
    W8A16, like the GEMV path), so differences are summation order only. Reads the routing on the host, so it
    is not graph-capturable.
    """
    num_tokens, hidden = x.shape
    inter = w2.shape[2]
    fp8 = w13.dtype == FP8_DTYPE
    quantize = fp8 and quantize_activations
    a = x.float()
    if quantize:
        q, s = _quant_ops().per_token_quant_fp8_ref(x)
        a = q.float() * s
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        tokens, slots = torch.where(topk_ids == expert)
        w_up = w13[expert].float() * (w13_scale[expert] if fp8 else 1.0)
        w_down = w2[expert].float() * (w2_scale[expert] if fp8 else 1.0)
        gate, up = F.linear(a[tokens], w_up).split(inter, dim=-1)
        act = (F.silu(gate) * up).to(x.dtype)
        if quantize:
            q, s = _quant_ops().per_token_quant_fp8_ref(act)
            act = q.float() * s
        y = F.linear(act.float(), w_down) * topk_weights[tokens, slots, None].float()
        out.index_add_(0, tokens, y.to(x.dtype).float())
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Tile configurations
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MoeTileConfig:
    """One GEMM's tiling. For the fused gate/up GEMM, BLOCK_N counts intermediate columns (each program loads a
    gate tile and an up tile, so 2 * BLOCK_N weight rows)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 1


@dataclass(frozen=True)
class MoeGemvConfig:
    """One GEMV-path GEMM's tiling: BLOCK_N output rows per program (GEMM1: intermediate columns, each with a gate
    and an up row) and BLOCK_K weights per row per step. As in the dense GEMV, a BLOCK_K of 32 lanes x 16 bytes x
    num_warps puts the warps side by side along K; a smaller one stacks them along N."""

    block_n: int
    block_k: int
    num_warps: int = 4


def gemv_configs(hidden: int, inter: int, weight_dtype: torch.dtype) -> tuple[MoeGemvConfig, MoeGemvConfig]:
    """(GEMM1, GEMM2) GEMV tiles, from the H100 sweep in `benchmarks/bench_moe.py --sweep` (Qwen3-30B-A3B shapes,
    1 and 2 tokens; `benchmarks/results/moe_layer_h100_*`): 2 rows per program, so even one token's 8 experts
    fill the SMs many times over; GEMM1 steps 4 warps side by side along K. GEMM2 (K = I, short) takes all of K
    in one 4-warp step for 16-bit weights; fp8 was fastest with one warp per 512-weight step."""
    itemsize = torch.empty((), dtype=weight_dtype).element_size()
    per_warp = 32 * 16 // itemsize
    up = MoeGemvConfig(2, max(32, min(per_warp * 4, _pow2_at_least(hidden))), 4)
    if itemsize == 2:
        down = MoeGemvConfig(2, max(32, min(per_warp * 4, _pow2_at_least(inter))), 4)
    else:
        down = MoeGemvConfig(2, max(32, min(per_warp, _pow2_at_least(inter))), 1)
    return up, down


def _fit(cfg: MoeTileConfig, n: int, k: int, fused: bool, itemsize: int) -> MoeTileConfig:
    """Shrink tiles to tiny problems (tests) and pipeline stages to the shared-memory budget."""
    block_n = max(16, min(cfg.block_n, _pow2_at_least(n)))
    block_k = max(16, min(cfg.block_k, _pow2_at_least(k)))
    stage = (cfg.block_m + (2 if fused else 1) * block_n) * block_k * itemsize
    stages = max(2, min(cfg.num_stages, _SMEM_BUDGET // stage))
    return MoeTileConfig(cfg.block_m, block_n, block_k, cfg.num_warps, stages, cfg.group_m)


def low_latency_config(num_pairs: int, num_experts: int, n: int, k: int, fused: bool, weight_dtype: torch.dtype,
                       num_sms: int = _DEFAULT_NUM_SMS) -> MoeTileConfig:
    """Memory-bound GEMV tiles: 16 rows (the tensor-core minimum; a decode expert rarely sees more), 16-byte
    weight loads along K, and the widest N tile that still gives at least one program per SM over the
    (at most `num_pairs`) active experts."""
    itemsize = torch.empty((), dtype=weight_dtype).element_size()
    block_k = 256 if itemsize == 1 else 128
    active = min(num_pairs, num_experts)
    block_n = 16
    for candidate in ((64, 32) if fused else (128, 64, 32)):
        if active * _cdiv(n, candidate) >= num_sms:
            block_n = candidate
            break
    return _fit(MoeTileConfig(16, block_n, block_k, num_warps=4, num_stages=4), n, k, fused, itemsize)


def grouped_config(num_pairs: int, num_experts: int, n: int, k: int, fused: bool,
                   weight_dtype: torch.dtype) -> MoeTileConfig:
    """Tensor-core tiles sized by the mean number of pairs per expert, so padding stays under ~half a block."""
    itemsize = torch.empty((), dtype=weight_dtype).element_size()
    per_expert = num_pairs / num_experts
    if per_expert <= 16:
        cfg = MoeTileConfig(16, 64, 128, num_warps=4, num_stages=4, group_m=1)
    elif per_expert <= 32:
        cfg = MoeTileConfig(32, 64, 128, num_warps=4, num_stages=4, group_m=4)
    elif per_expert <= 96:
        cfg = MoeTileConfig(64, 64 if fused else 128, 64, num_warps=4, num_stages=4, group_m=8)
    else:  # prefill-sized; bf16 at T=8000 (bench_moe --sweep): the 128-wide fused tile took the layer 1934 -> 1713 us
        cfg = MoeTileConfig(128, 64 if fused and itemsize == 1 else 128, 64, num_warps=8, num_stages=3, group_m=8)
    if itemsize == 1:
        cfg = MoeTileConfig(cfg.block_m, cfg.block_n, cfg.block_k * 2, cfg.num_warps, cfg.num_stages, cfg.group_m)
    return _fit(cfg, n, k, fused, itemsize)


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------

def _check_inputs(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None) -> None:
    num_experts, two_i, hidden = w13.shape
    if x.dim() != 2 or x.shape[1] != hidden or two_i % 2:
        raise ValueError(f"x {tuple(x.shape)} does not fit w13 {tuple(w13.shape)} ([E, 2I, H])")
    if w2.shape != (num_experts, hidden, two_i // 2):
        raise ValueError(f"w2 {tuple(w2.shape)} must be [E, H, I] = {(num_experts, hidden, two_i // 2)}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} / topk_weights {tuple(topk_weights.shape)} must be [T, k]")
    if (w13.dtype == FP8_DTYPE) != (w2.dtype == FP8_DTYPE):
        raise ValueError("w13 and w2 must both be fp8 or both unquantized")
    if w13.dtype == FP8_DTYPE:
        if w13_scale is None or w2_scale is None:
            raise ValueError("fp8 expert weights need w13_scale [E, 2I, 1] and w2_scale [E, H, 1]")
        if w13_scale.shape != (num_experts, two_i, 1) or w2_scale.shape != (num_experts, hidden, 1):
            raise ValueError(f"scales {tuple(w13_scale.shape)}, {tuple(w2_scale.shape)} must be [E, N, 1]")
    elif w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"expert weights ({w13.dtype}, {w2.dtype}) must match x ({x.dtype}) or be fp8")


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              *, path: str = "auto",
              configs: tuple[MoeTileConfig, MoeTileConfig] | tuple[MoeGemvConfig, MoeGemvConfig] | None = None
              ) -> torch.Tensor:
    """Mixture-of-experts FFN: x `[T, H]` -> `[T, H]` in x's dtype.

    `path`: "auto" (GEMV when `T <= GEMV_MAX_TOKENS`, low latency when `T * k <= LOW_LATENCY_MAX_PAIRS`, cutlass
    from `CUTLASS_MIN_PAIRS_PER_EXPERT` pairs per expert where `cutlass_moe_supported`, else grouped), "gemv",
    "low_latency", "grouped" or "cutlass" (`swiftlm.kernels.moe_cutlass`). `configs` overrides the (GEMM1, GEMM2)
    tiles (tests, benchmark sweeps): `MoeGemvConfig`s for "gemv", `MoeTileConfig`s otherwise. Capturable in a
    CUDA graph: no host syncs, and every launch's grid depends only on shapes.
    """
    _check_inputs(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale)
    num_tokens, hidden = x.shape
    num_experts, two_i, _ = w13.shape
    inter = two_i // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if path == "auto":
        path = ("gemv" if num_tokens <= GEMV_MAX_TOKENS else
                "low_latency" if num_pairs <= LOW_LATENCY_MAX_PAIRS else
                "cutlass" if (num_pairs >= CUTLASS_MIN_PAIRS_PER_EXPERT * num_experts
                              and cutlass_moe_supported(x, w13, w2)) else "grouped")
    if path not in ("gemv", "low_latency", "grouped", "cutlass"):
        raise ValueError(f"path must be auto, gemv, low_latency, grouped or cutlass, got {path!r}")
    if path == "cutlass":
        if configs is not None or w13.dtype == FP8_DTYPE:
            raise ValueError("the cutlass path takes 16-bit experts and no tile configs")
        return cutlass_moe(x, w13, w2, topk_weights, topk_ids) if num_pairs else torch.zeros_like(x)
    if path == "low_latency" and num_pairs > LOW_LATENCY_MAX_PAIRS:
        raise ValueError(f"the low-latency path takes at most {LOW_LATENCY_MAX_PAIRS} pairs, got {num_pairs}")
    config_type = MoeGemvConfig if path == "gemv" else MoeTileConfig
    if configs is not None and not all(isinstance(c, config_type) for c in configs):
        raise ValueError(f"the {path} path takes two {config_type.__name__}s")
    if not can_use_triton(x):
        return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale,
                             quantize_activations=path != "gemv")
    if num_pairs == 0:
        return torch.zeros_like(x)
    ids = topk_ids.reshape(-1).to(torch.int32)
    weights = topk_weights.reshape(-1).to(torch.float32)
    if path == "gemv":
        return _moe_gemv(x, w13, w2, w13_scale, w2_scale, ids, weights, top_k,
                         configs or gemv_configs(hidden, inter, w13.dtype))

    if configs is None:
        if path == "low_latency":
            num_sms = _num_sms(x.device.index or 0) if x.is_cuda else _DEFAULT_NUM_SMS
            configs = (low_latency_config(num_pairs, num_experts, inter, hidden, True, w13.dtype, num_sms),
                       low_latency_config(num_pairs, num_experts, hidden, inter, False, w2.dtype, num_sms))
        else:
            configs = (grouped_config(num_pairs, num_experts, inter, hidden, True, w13.dtype),
                       grouped_config(num_pairs, num_experts, hidden, inter, False, w2.dtype))
    if path == "grouped" and configs[0].block_m != configs[1].block_m:
        raise ValueError("both grouped GEMMs share one alignment, so their block_m must match")

    alignment = align_tokens(ids, num_experts, configs[0].block_m) if path == "grouped" else None
    fp8 = w13.dtype == FP8_DTYPE

    quantize = _quant_ops().per_token_quant_fp8 if fp8 else None
    a1, a1_scale = quantize(x) if quantize else (x, None)
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    _gemm(a1, a1_scale, w13, w13_scale, act, ids, weights, alignment, top_k, inter, configs[0], first=True)
    a2, a2_scale = quantize(act) if quantize else (act, None)
    per_pair = torch.empty(num_tokens, top_k, hidden, dtype=x.dtype, device=x.device)
    _gemm(a2, a2_scale, w2, w2_scale, per_pair.view(num_pairs, hidden), ids, weights, alignment, top_k, 0,
          configs[1], first=False)
    return per_pair.sum(dim=1)


def _moe_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
              w2_scale: torch.Tensor | None, ids: torch.Tensor, weights: torch.Tensor, top_k: int,
              configs: tuple[MoeGemvConfig, MoeGemvConfig]) -> torch.Tensor:
    """The GEMV path: two launches, GEMM1 -> act `[T*k, I]` (SiLU-and-mul fused), GEMM2 -> out `[T, H]`."""
    for cfg in configs:
        if any(v < 1 or v & (v - 1) for v in (cfg.block_n, cfg.block_k, cfg.num_warps)):
            raise ValueError(f"GEMV tiles must be powers of two, got {cfg}")
    num_tokens, hidden = x.shape
    inter = w2.shape[2]
    fp8 = w13.dtype == FP8_DTYPE
    chunk = 16 // w13.element_size()  # one 16-byte weight vector per lane, as in the dense GEMV
    s13 = w13_scale if fp8 else w13
    s2 = w2_scale if fp8 else w2
    act = torch.empty(ids.numel(), inter, dtype=x.dtype, device=x.device)
    up, down = configs
    pdl = use_pdl(x)
    _moe_gemv_up_kernel[(ids.numel(), _cdiv(inter, up.block_n))](
        x, w13, s13, ids, act, x.stride(0), w13.stride(0), w13.stride(1), s13.stride(0), s13.stride(1),
        act.stride(0), N=inter, K=hidden, TOP_K=top_k, FP8=fp8, BLOCK_N=up.block_n, BLOCK_K=up.block_k,
        CHUNK=min(chunk, up.block_k), num_warps=up.num_warps, PDL=pdl, launch_pdl=pdl)
    out = torch.empty_like(x)
    _moe_gemv_down_kernel[(num_tokens, _cdiv(hidden, down.block_n))](
        act, w2, s2, ids, weights, out, act.stride(0), w2.stride(0), w2.stride(1), s2.stride(0), s2.stride(1),
        out.stride(0), N=hidden, K=inter, TOP_K=top_k, FP8=fp8, BLOCK_N=down.block_n, BLOCK_K=down.block_k,
        CHUNK=min(chunk, down.block_k), num_warps=down.num_warps, PDL=pdl, launch_pdl=pdl)
    return out


_TORCH_TO_TL: dict[torch.dtype, object] = {}
if HAS_TRITON:
    _TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                    FP8_DTYPE: tl.float8e4nv}


def _dot_args(dtype: torch.dtype) -> tuple[object, str]:
    """(operand dtype for tl.dot, input precision). fp32 runs exact IEEE dots. The interpreter multiplies bf16
    dot operands as raw bit patterns, so there bf16 tiles are widened to fp32 (exactly) before the dot."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and TRITON_INTERPRETED):
        return tl.float32, "ieee"
    return _TORCH_TO_TL[dtype], "tf32"


def _gemm(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor | None,
          out: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
          alignment: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, top_k: int, up_offset: int,
          cfg: MoeTileConfig, first: bool) -> None:
    """Launch one expert GEMM. `first`: GEMM1 (rows of `a` are tokens, SiLU-and-mul over gate rows n and up
    rows `up_offset + n`); else GEMM2 (rows of `a` are pairs, output scaled by the pair's routing weight)."""
    num_pairs, n = out.shape
    k = a.shape[1]
    fp8 = w.dtype == FP8_DTYPE
    dot_dtype, precision = _dot_args(w.dtype)
    scale_ptr = w_scale if fp8 else w
    scale_strides = (w_scale.stride(0), w_scale.stride(1)) if fp8 and w_scale is not None else (0, 0)
    common = dict(TOP_K=top_k, A_BY_TOKEN=first, FUSE_SILU=first, APPLY_ROUTING=not first, FP8=fp8,
                  DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, IMPRECISE_ACC=cfg.block_k if fp8 else None,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (a, w, out, a_scale if fp8 else a, scale_ptr, weights)
    sizes = (n, k, num_pairs, up_offset, a.stride(0), a.stride(1), *w.stride(), out.stride(0), out.stride(1),
             *scale_strides)
    n_tiles = _cdiv(n, cfg.block_n)
    if alignment is None:
        _moe_low_latency_kernel[(num_pairs, n_tiles)](*args, ids, *sizes, PAIRS_CAP=LOW_LATENCY_MAX_PAIRS, **common)
    else:
        sorted_ids, expert_ids, post_pad = alignment
        m_blocks = expert_ids.numel()
        _moe_grouped_kernel[(m_blocks * n_tiles,)](*args, sorted_ids, expert_ids, post_pad, m_blocks, *sizes,
                                                   GROUP_M=cfg.group_m, **common)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _route_rows(logits, rows, row_mask, offs_e, E, weights_ptr, ids_ptr, counts_ptr, limit_ptr,
                    TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, COUNT: tl.constexpr,
                    HAS_LIMIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        """Route a `[BLOCK_T, BLOCK_E]` fp32 logits tile (-inf outside `row_mask` x `offs_e < E`): softmax over
        experts, then TOP_K rounds of (max, lowest index at the max); store weights and ids, count experts."""
        valid = row_mask[:, None] & (offs_e[None, :] < E)
        peak = tl.where(row_mask, tl.max(logits, 1), 0.0)
        probs = tl.exp(logits - peak[:, None])
        probs = probs / tl.where(row_mask, tl.sum(probs, 1), 1.0)[:, None]
        probs = tl.where(valid, probs, -1.0)  # never picked, even when every real probability underflows to 0
        slot = tl.arange(0, TOP_K_PAD)
        top_w = tl.zeros((BLOCK_T, TOP_K_PAD), tl.float32)
        top_i = tl.zeros((BLOCK_T, TOP_K_PAD), tl.int32)
        total = tl.zeros((BLOCK_T,), tl.float32)
        for j in tl.static_range(TOP_K):
            best = tl.max(probs, 1)
            idx = tl.min(tl.where(probs == best[:, None], offs_e[None, :], BLOCK_E), 1)
            top_w = tl.where(slot[None, :] == j, best[:, None], top_w)
            top_i = tl.where(slot[None, :] == j, idx[:, None], top_i)
            total += best
            probs = tl.where(offs_e[None, :] == idx[:, None], -1.0, probs)
        if RENORMALIZE:
            top_w = top_w / total[:, None]
        out_off = rows[:, None] * TOP_K + slot[None, :]
        out_mask = row_mask[:, None] & (slot[None, :] < TOP_K)
        tl.store(weights_ptr + out_off, top_w, mask=out_mask)
        tl.store(ids_ptr + out_off, top_i, mask=out_mask)
        if COUNT:
            count_mask = out_mask
            if HAS_LIMIT:
                count_mask = count_mask & (rows < tl.load(limit_ptr))[:, None]
            tl.atomic_add(counts_ptr + top_i, tl.full((BLOCK_T, TOP_K_PAD), 1, tl.int64), mask=count_mask)

    @triton.jit(do_not_specialize=["T"])
    def _route_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, limit_ptr, T, E, stride_t, stride_e,
                      TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr, RENORMALIZE: tl.constexpr, COUNT: tl.constexpr,
                      HAS_LIMIT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        """BLOCK_T tokens of router logits."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, BLOCK_E)
        row_mask = rows < T
        logits = tl.load(logits_ptr + rows[:, None] * stride_t + offs_e[None, :] * stride_e,
                         mask=row_mask[:, None] & (offs_e[None, :] < E), other=float("-inf")).to(tl.float32)
        _route_rows(logits, rows, row_mask, offs_e, E, weights_ptr, ids_ptr, counts_ptr, limit_ptr, TOP_K, TOP_K_PAD,
                    RENORMALIZE, COUNT, HAS_LIMIT, BLOCK_T, BLOCK_E)

    @triton.jit
    def _gate_step(acc, ssq, w, x_ptr, r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom, pid, T, k, K,
                   TAIL: tl.constexpr, NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
        """One K tile of the gate GEMV: plain input, or RMSNorm(x + residual) as it loads."""
        if NORM:
            acc, ssq = fma_tile_norm(acc, ssq, w, x_ptr, r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom,
                                     pid, T, k, K, TAIL, True, BLOCK_T, BLOCK_N, BLOCK_K, CHUNK)
        else:
            acc = fma_tile(acc, w, x_ptr, stride_xm, T, k, K, TAIL, BLOCK_T, BLOCK_N, BLOCK_K, CHUNK)
        return acc, ssq

    @triton.jit
    def _gate_route_kernel(x_ptr, w_ptr, ws_ptr, cnt_ptr, weights_ptr, ids_ptr, counts_ptr, limit_ptr,
                           r_ptr, g_ptr, r_out_ptr, normed_ptr, T, E, stride_xm, stride_wn, stride_rm, stride_rom,
                           stride_nm, eps, K: tl.constexpr, TOP_K: tl.constexpr, TOP_K_PAD: tl.constexpr,
                           RENORMALIZE: tl.constexpr, COUNT: tl.constexpr, HAS_LIMIT: tl.constexpr,
                           NORM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           CHUNK: tl.constexpr, E_PAD: tl.constexpr, PDL: tl.constexpr):
        """Program: BLOCK_N gate rows -> logits `[T, BLOCK_N]` (CUDA-core GEMV, rounded to x's dtype as a linear
        layer's output is) parked in the fp32 workspace `[T, E]`; the last program to arrive (an atomic counter,
        reset for the next launch) routes all T tokens from the workspace. NORM: the input is
        RMSNorm(x + residual), applied as it loads; program 0 writes x + residual and the normalized rows."""
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + (offs_n % E).to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros([BLOCK_T, BLOCK_N, BLOCK_K // CHUNK], tl.float32)
        ssq = tl.zeros([BLOCK_T, BLOCK_K // CHUNK], tl.float32)
        wait_for_inputs(PDL)
        for k0 in tl.static_range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if k0 + BLOCK_K <= K:
                acc, ssq = _gate_step(acc, ssq, tl.load(w_rows + k[None, :]), x_ptr, r_ptr, g_ptr, r_out_ptr,
                                      stride_xm, stride_rm, stride_rom, pid, T, k, K, False, NORM, BLOCK_T, BLOCK_N,
                                      BLOCK_K, CHUNK)
            else:
                acc, ssq = _gate_step(acc, ssq, tl.load(w_rows + k[None, :], mask=k[None, :] < K, other=0.0), x_ptr,
                                      r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom, pid, T, k, K, True,
                                      NORM, BLOCK_T, BLOCK_N, BLOCK_K, CHUNK)
        release_dependents(PDL)
        rows = tl.arange(0, BLOCK_T)
        row_mask = rows < T
        sums = tl.sum(acc, axis=2)
        if NORM:
            inv_rms = tl.rsqrt(tl.sum(ssq, axis=1) / K + eps)
            sums = sums * inv_rms[:, None]
            if pid == 0:
                for k0 in tl.static_range(0, K, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    mask = row_mask[:, None] & (k[None, :] < K)
                    s = (tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=mask, other=0.0).to(tl.float32)
                         + tl.load(r_ptr + rows[:, None] * stride_rm + k[None, :], mask=mask, other=0.0).to(tl.float32))
                    gamma = tl.load(g_ptr + k, mask=k < K, other=0.0).to(tl.float32)
                    tl.store(normed_ptr + rows[:, None] * stride_nm + k[None, :],
                             (s * inv_rms[:, None] * gamma[None, :]).to(normed_ptr.dtype.element_ty), mask=mask)
        logits = sums.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(ws_ptr + rows[:, None] * E + offs_n[None, :], logits,
                 mask=row_mask[:, None] & (offs_n[None, :] < E))
        tl.debug_barrier()  # every thread's logits are written before the (releasing) arrival below
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            offs_e = tl.arange(0, E_PAD)
            all_logits = tl.load(ws_ptr + rows[:, None] * E + offs_e[None, :],
                                 mask=row_mask[:, None] & (offs_e[None, :] < E), other=float("-inf"),
                                 cache_modifier=".cg")
            _route_rows(all_logits, rows, row_mask, offs_e, E, weights_ptr, ids_ptr, counts_ptr, limit_ptr, TOP_K,
                        TOP_K_PAD, RENORMALIZE, COUNT, HAS_LIMIT, BLOCK_T, E_PAD)
            tl.store(cnt_ptr, 0)  # ready for the next launch / graph replay

    @triton.jit
    def _expert_tile(a_ptr, a_rows, stride_am, stride_ak, w_ptr, expert, w_rows, up_offset,
                     stride_we, stride_wn, stride_wk, K,
                     FUSE_SILU: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     IMPRECISE_ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
        """fp32 `[BLOCK_M, BLOCK_N]` accumulators of `a[a_rows] @ w[expert, w_rows].T` (and of the up rows
        `up_offset + w_rows` when FUSE_SILU). Rows are pre-clamped to valid indices, so only K needs masks.

        IMPRECISE_ACC (fp8: BLOCK_K) promotes Hopper's reduced-precision fp8 accumulation into the fp32
        accumulator once per K step instead of never (Triton's sm_90 default), bounding fp8 drift over long K."""
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        g_ptrs = w_base + w_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
        u_ptrs = g_ptrs + up_offset * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                wg = tl.load(g_ptrs)
            else:
                k_mask = offs_k[None, :] < K - k0
                a = tl.load(a_ptrs, mask=k_mask, other=0.0)
                wg = tl.load(g_ptrs, mask=k_mask, other=0.0)
            a = a.to(DOT_DTYPE)
            acc_g = tl.dot(a, tl.trans(wg.to(DOT_DTYPE)), acc_g, input_precision=DOT_PRECISION,
                           max_num_imprecise_acc=IMPRECISE_ACC)
            if FUSE_SILU:
                if EVEN_K:
                    wu = tl.load(u_ptrs)
                else:
                    wu = tl.load(u_ptrs, mask=offs_k[None, :] < K - k0, other=0.0)
                acc_u = tl.dot(a, tl.trans(wu.to(DOT_DTYPE)), acc_u, input_precision=DOT_PRECISION,
                               max_num_imprecise_acc=IMPRECISE_ACC)
            a_ptrs += BLOCK_K * stride_ak
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
        return acc_g, acc_u

    @triton.jit
    def _store_tile(acc_g, acc_u, c_ptr, pairs, pair_mask, offs_n, w_rows, N, stride_cm, stride_cn,
                    a_scale_ptr, a_rows, w_scale_ptr, expert, stride_se, stride_sn, up_offset, topk_w_ptr,
                    FUSE_SILU: tl.constexpr, APPLY_ROUTING: tl.constexpr, FP8: tl.constexpr):
        """Epilogue: fp8 dequant (row scale x channel scale), SiLU(gate) * up or routing weight, masked store."""
        if FP8:
            a_scale = tl.load(a_scale_ptr + a_rows)[:, None]
            s_base = w_scale_ptr + expert.to(tl.int64) * stride_se
            acc_g = acc_g * a_scale * tl.load(s_base + w_rows * stride_sn)[None, :]
            if FUSE_SILU:
                acc_u = acc_u * a_scale * tl.load(s_base + (up_offset + w_rows) * stride_sn)[None, :]
        if FUSE_SILU:
            out = acc_g * tl.sigmoid(acc_g) * acc_u
        else:
            out = acc_g
        if APPLY_ROUTING:
            out = out * tl.load(topk_w_ptr + pairs, mask=pair_mask, other=0.0)[:, None]
        c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & (offs_n[None, :] < N))

    @triton.jit
    def _moe_low_latency_kernel(
        a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, topk_w_ptr, topk_ids_ptr,
        N, K, num_pairs, up_offset,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_se, stride_sn,
        TOP_K: tl.constexpr, A_BY_TOKEN: tl.constexpr, FUSE_SILU: tl.constexpr, APPLY_ROUTING: tl.constexpr,
        FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
        PAIRS_CAP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """Program (pair p, N tile): runs only if p is the first pair routed to its expert, and then computes
        that N tile for all of the expert's pairs, BLOCK_M at a time (one chunk unless an expert has more than
        BLOCK_M tokens), so each active expert's weights are read once."""
        pid_p = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_p = tl.arange(0, PAIRS_CAP)
        all_ids = tl.load(topk_ids_ptr + offs_p, mask=offs_p < num_pairs, other=-1)
        expert = tl.load(topk_ids_ptr + pid_p)
        same = all_ids == expert
        if tl.sum((same & (offs_p < pid_p)).to(tl.int32), 0) > 0:
            return
        rank = tl.where(same, tl.cumsum(same.to(tl.int32), 0) - 1, -1)
        count = tl.sum(same.to(tl.int32), 0)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = offs_n % N
        offs_m = tl.arange(0, BLOCK_M)
        for m0 in range(0, count, BLOCK_M):
            select = rank[None, :] == (m0 + offs_m)[:, None]
            pair_mask = tl.sum(select.to(tl.int32), 1) > 0
            pairs = tl.sum(tl.where(select, offs_p[None, :], 0), 1)
            if A_BY_TOKEN:
                a_rows = pairs // TOP_K
            else:
                a_rows = pairs
            acc_g, acc_u = _expert_tile(a_ptr, a_rows, stride_am, stride_ak, w_ptr, expert, w_rows, up_offset,
                                        stride_we, stride_wn, stride_wk, K, FUSE_SILU, DOT_DTYPE, DOT_PRECISION,
                                        IMPRECISE_ACC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
            _store_tile(acc_g, acc_u, c_ptr, pairs, pair_mask, offs_n, w_rows, N, stride_cm, stride_cn,
                        a_scale_ptr, a_rows, w_scale_ptr, expert, stride_se, stride_sn, up_offset, topk_w_ptr,
                        FUSE_SILU, APPLY_ROUTING, FP8)

    @triton.jit(do_not_specialize=["num_m_blocks", "num_pairs"])
    def _moe_grouped_kernel(
        a_ptr, w_ptr, c_ptr, a_scale_ptr, w_scale_ptr, topk_w_ptr,
        sorted_ids_ptr, expert_ids_ptr, post_pad_ptr, num_m_blocks,
        N, K, num_pairs, up_offset,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_se, stride_sn,
        TOP_K: tl.constexpr, A_BY_TOKEN: tl.constexpr, FUSE_SILU: tl.constexpr, APPLY_ROUTING: tl.constexpr,
        FP8: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, IMPRECISE_ACC: tl.constexpr,
        GROUP_M: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ):
        """Program: one BLOCK_M block of expert-sorted pairs x one N tile. Blocks are swizzled in groups of
        GROUP_M so consecutive programs share a weight tile (L2 reuse); blocks past the used length exit."""
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = swizzled_tile(pid, num_m_blocks, num_n, GROUP_M)
        if pid_m * BLOCK_M >= tl.load(post_pad_ptr):
            return
        expert = tl.load(expert_ids_ptr + pid_m)
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        pair_mask = pairs < num_pairs
        pairs = tl.where(pair_mask, pairs, 0)
        if A_BY_TOKEN:
            a_rows = pairs // TOP_K
        else:
            a_rows = pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = offs_n % N
        acc_g, acc_u = _expert_tile(a_ptr, a_rows, stride_am, stride_ak, w_ptr, expert, w_rows, up_offset,
                                    stride_we, stride_wn, stride_wk, K, FUSE_SILU, DOT_DTYPE, DOT_PRECISION,
                                    IMPRECISE_ACC, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)
        _store_tile(acc_g, acc_u, c_ptr, pairs, pair_mask, offs_n, w_rows, N, stride_cm, stride_cn,
                    a_scale_ptr, a_rows, w_scale_ptr, expert, stride_se, stride_sn, up_offset, topk_w_ptr,
                    FUSE_SILU, APPLY_ROUTING, FP8)

    @triton.jit
    def _gemv_rows(acc, rows_ptr, x_row_ptr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   CHUNK: tl.constexpr):
        """acc `[1, BLOCK_N, BLOCK_K // CHUNK]` += chunk sums of rows `[BLOCK_N, K]` times one activation row,
        K statically unrolled (every step's load can be issued up front); only a ragged last step is masked."""
        for k0 in tl.static_range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            if k0 + BLOCK_K <= K:
                w = tl.load(rows_ptr + k[None, :], eviction_policy="evict_first")
                acc = fma_tile(acc, w, x_row_ptr, 0, 1, k, K, False, 1, BLOCK_N, BLOCK_K, CHUNK)
            else:
                w = tl.load(rows_ptr + k[None, :], mask=k[None, :] < K, other=0.0, eviction_policy="evict_first")
                acc = fma_tile(acc, w, x_row_ptr, 0, 1, k, K, True, 1, BLOCK_N, BLOCK_K, CHUNK)
        return acc

    @triton.jit
    def _moe_gemv_up_kernel(x_ptr, w_ptr, s_ptr, ids_ptr, act_ptr, stride_xm, stride_we, stride_wn, stride_se,
                            stride_sn, stride_am, N: tl.constexpr, K: tl.constexpr, TOP_K: tl.constexpr,
                            FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                            PDL: tl.constexpr):
        """Program (pair, N tile): act[pair, n] = SiLU(gate_n . x) * (up_n . x) with the pair's expert's gate rows
        n and up rows N + n, x the pair's token."""
        pair = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n % N  # rows past N re-read a valid row (unmasked, vectorized loads); never stored
        wait_for_inputs(PDL)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        gate_rows = w_ptr + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
        x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xm
        acc_g = _gemv_rows(tl.zeros([1, BLOCK_N, BLOCK_K // CHUNK], tl.float32), gate_rows, x_row, K, BLOCK_N,
                           BLOCK_K, CHUNK)
        acc_u = _gemv_rows(tl.zeros([1, BLOCK_N, BLOCK_K // CHUNK], tl.float32), gate_rows + N * stride_wn, x_row,
                           K, BLOCK_N, BLOCK_K, CHUNK)
        release_dependents(PDL)
        gate = tl.sum(acc_g, axis=2)
        up = tl.sum(acc_u, axis=2)
        if FP8:
            scales = s_ptr + expert * stride_se + rows * stride_sn
            gate = gate * tl.load(scales)[None, :]
            up = up * tl.load(scales + N * stride_sn)[None, :]
        out = gate * tl.sigmoid(gate) * up
        tl.store(act_ptr + pair * stride_am + offs_n[None, :], out.to(act_ptr.dtype.element_ty),
                 mask=offs_n[None, :] < N)

    @triton.jit
    def _moe_gemv_down_kernel(act_ptr, w_ptr, s_ptr, ids_ptr, topk_w_ptr, out_ptr, stride_am, stride_we, stride_wn,
                              stride_se, stride_sn, stride_om, N: tl.constexpr, K: tl.constexpr,
                              TOP_K: tl.constexpr, FP8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                              CHUNK: tl.constexpr, PDL: tl.constexpr):
        """Program (token, N tile): out[t, n] = sum over the token's k slots of weight * (down_n . act[pair]), the
        slots in order in fp32, so the result does not depend on which other tokens share the batch."""
        token = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_n % N
        total = tl.zeros([1, BLOCK_N], tl.float32)
        wait_for_inputs(PDL)
        for slot in tl.static_range(TOP_K):
            pair = token * TOP_K + slot
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            w_rows = w_ptr + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
            acc = _gemv_rows(tl.zeros([1, BLOCK_N, BLOCK_K // CHUNK], tl.float32), w_rows,
                             act_ptr + pair.to(tl.int64) * stride_am, K, BLOCK_N, BLOCK_K, CHUNK)
            part = tl.sum(acc, axis=2) * tl.load(topk_w_ptr + pair)
            if FP8:
                part = part * tl.load(s_ptr + expert * stride_se + rows * stride_sn)[None, :]
            total += part
        release_dependents(PDL)
        tl.store(out_ptr + token * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=offs_n[None, :] < N)
