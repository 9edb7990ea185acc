"""Decode GEMV / skinny GEMM for M <= 16: y[M, N] = x[M, K] @ (W[N, K] * w_scale[N])^T + bias, W read exactly once.

At decode a linear layer's time is the time to stream its weight, so every design choice here serves bandwidth:
  * each program owns a BLOCK_N slice of output columns and streams its [BLOCK_N, K / SPLIT_K] piece of W with
    16-byte loads along K (rows are K-contiguous), marked evict-first so that x and partials keep L2;
  * x ([M, K], tiny) is re-read per tile from L1/L2;
  * split-K gives small-N shapes enough programs to cover the SMs several times. Each split parks an fp32 partial;
    the last split to finish a column tile (an atomic counter per tile) sums the partials in split order and writes
    y. One launch, deterministic, no host sync, CUDA-graph safe: the counters reset themselves.
Weights are bf16/fp16 (matching x), or float8_e4m3fn with one fp32 scale per output row (W8A16: weight tiles
upcast in registers, activations stay 16-bit, the scale is applied in the epilogue; exact products, fp32 sums).

Two kernels, both chosen per shape from `GEMV_CONFIGS` (filled from `benchmarks/bench_gemv.py` measurements):
  * "fma": CUDA-core products. Each iteration reduces only within a thread's 16-byte weight vector (an FMA chain),
    so the cross-lane half of the K reduction happens once, after the loop;
  * "dot": tensor cores on W_tile [BLOCK_N, BLOCK_K] @ x^T [BLOCK_K, 16] (M padded to 16 on the MMA's narrow side).
`gemv_ref` is the PyTorch twin (fp32 math, cast at the end); CPU tensors without the interpreter use it.
"""
from __future__ import annotations

import dataclasses

import torch

from swiftlm.kernels.activation import silu_and_mul_ref
from swiftlm.kernels.fused_norm import fused_add_rms_norm_ref, rms_norm_ref
from swiftlm.kernels.quant import (FP8_DTYPE, HAS_TRITON, TRITON_INTERPRETED, can_use_triton, cdiv,
                                   next_power_of_2, num_sms)
from swiftlm.kernels.triton_support import split_counters, use_pdl

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.triton_support import release_dependents, wait_for_inputs

GEMV_MAX_M = 16
_DOT_M = 16  # tl.dot needs 16 rows; the x^T operand is zero-padded to this many columns
_KERNELS = ("fma", "dot")


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of `gemv`.

    kernel: "fma" or "dot" (see the module docstring). block_n / block_k: weight tile (powers of two; "dot" needs
    >= 16). split_k: K splits (programs = cdiv(N, block_n) * split_k); 0 picks one at launch that fills the GPU.
    num_stages: software-pipelining depth of the K loop (cp.async into shared memory); 1 = plain loads.
    For "fma", block_k = 32 lanes * 16 bytes * num_warps (e.g. 1024 bf16 with 4 warps) puts the warps side by side
    along K, so each x element is loaded by exactly one thread, straight into the layout the products need;
    smaller block_k stacks warps along N and routes x through shared memory every iteration.
    """

    kernel: str
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int


# (N, K, M bucket = next power of two of M, weight kind "bf16" | "fp8") -> config. 16-bit weights (bf16 or fp16)
# share the "bf16" entries: same bytes per weight. Only shapes where the GEMV beat the path it replaces are listed
# (cuBLAS for 16-bit weights; per-token FP8 quantization + the best W8A8 GEMM for fp8), so a linear layer uses the
# GEMV exactly for these keys. Measured on H100 80GB HBM3 with `benchmarks/bench_gemv.py`
# (benchmarks/results/gemv_h100_*.json); comments: best GEMV time vs the replaced path. Shapes: Qwen3-8B qkv, o,
# gate_up, down, LM head; Qwen3-30B-A3B qkv, o.
GEMV_CONFIGS: dict[tuple[int, int, int, str], GemvConfig] = {
    (2048, 4096, 1, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 7.8 vs 11.0 us
    (2048, 4096, 2, 'bf16'): GemvConfig('fma', 2, 1024, 1, 4, 1),  # 8.3 vs 11.2 us
    (2048, 4096, 4, 'bf16'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 8.9 vs 11.0 us
    (2048, 4096, 8, 'bf16'): GemvConfig('dot', 64, 256, 4, 4, 3),  # 9.2 vs 10.8 us
    (2048, 4096, 16, 'bf16'): GemvConfig('dot', 64, 128, 4, 4, 4),  # 9.4 vs 10.8 us
    (4096, 4096, 1, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 13.4 vs 16.8 us
    (4096, 4096, 2, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 13.9 vs 16.8 us
    (4096, 4096, 4, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 14.5 vs 16.4 us
    (4096, 4096, 8, 'bf16'): GemvConfig('dot', 32, 256, 1, 4, 4),  # 14.6 vs 16.5 us
    (4096, 4096, 16, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 14.4 vs 16.9 us
    (4096, 12288, 1, 'bf16'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 35.8 vs 39.7 us
    (4096, 12288, 2, 'bf16'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 36.4 vs 40.5 us
    (4096, 12288, 4, 'bf16'): GemvConfig('dot', 64, 128, 2, 4, 6),  # 38.1 vs 39.9 us
    (4096, 12288, 8, 'bf16'): GemvConfig('dot', 64, 256, 2, 4, 3),  # 37.9 vs 40.0 us
    (4096, 12288, 16, 'bf16'): GemvConfig('dot', 64, 128, 2, 4, 6),  # 38.5 vs 40.6 us
    (5120, 2048, 1, 'bf16'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 9.0 vs 10.0 us
    (5120, 2048, 2, 'bf16'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 9.4 vs 10.1 us
    (5120, 2048, 4, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 9.6 vs 10.1 us
    (5120, 2048, 8, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 9.5 vs 10.2 us
    (5120, 2048, 16, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 9.5 vs 10.0 us
    (6144, 4096, 1, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 18.7 vs 21.3 us
    (6144, 4096, 2, 'bf16'): GemvConfig('fma', 8, 1024, 1, 4, 1),  # 19.6 vs 21.2 us
    (6144, 4096, 4, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 19.5 vs 21.1 us
    (6144, 4096, 8, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 19.7 vs 21.1 us
    (6144, 4096, 16, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 19.9 vs 21.7 us
    (24576, 4096, 1, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 66.4 vs 73.0 us
    (24576, 4096, 2, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 66.8 vs 73.8 us
    (24576, 4096, 4, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 68.8 vs 73.5 us
    (24576, 4096, 8, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 69.0 vs 73.4 us
    (24576, 4096, 16, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 69.9 vs 74.5 us
    (151936, 4096, 1, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 395.5 vs 438.9 us
    (151936, 4096, 2, 'bf16'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 393.0 vs 440.0 us
    (151936, 4096, 4, 'bf16'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 397.0 vs 440.4 us
    (151936, 4096, 8, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 405.8 vs 441.7 us
    (151936, 4096, 16, 'bf16'): GemvConfig('dot', 64, 128, 1, 4, 6),  # 410.9 vs 445.7 us
    (2048, 4096, 1, 'fp8'): GemvConfig('fma', 4, 2048, 1, 4, 1),  # 5.3 vs 11.9 us
    (2048, 4096, 2, 'fp8'): GemvConfig('fma', 4, 2048, 1, 4, 1),  # 6.4 vs 12.5 us
    (2048, 4096, 4, 'fp8'): GemvConfig('fma', 8, 2048, 1, 4, 3),  # 7.6 vs 12.3 us
    (2048, 4096, 8, 'fp8'): GemvConfig('dot', 64, 256, 4, 4, 4),  # 9.4 vs 12.4 us
    (2048, 4096, 16, 'fp8'): GemvConfig('dot', 64, 256, 4, 4, 4),  # 10.1 vs 12.4 us
    (4096, 4096, 1, 'fp8'): GemvConfig('fma', 4, 2048, 1, 4, 1),  # 8.1 vs 14.1 us
    (4096, 4096, 2, 'fp8'): GemvConfig('fma', 8, 2048, 1, 4, 1),  # 9.0 vs 14.6 us
    (4096, 4096, 4, 'fp8'): GemvConfig('fma', 8, 2048, 1, 4, 3),  # 11.3 vs 14.5 us
    (4096, 4096, 8, 'fp8'): GemvConfig('dot', 64, 256, 4, 4, 4),  # 13.9 vs 14.6 us
    (4096, 4096, 16, 'fp8'): GemvConfig('dot', 64, 256, 2, 4, 4),  # 14.2 vs 14.6 us
    (4096, 12288, 1, 'fp8'): GemvConfig('fma', 4, 4096, 1, 8, 1),  # 19.6 vs 31.8 us
    (4096, 12288, 2, 'fp8'): GemvConfig('fma', 8, 2048, 1, 4, 1),  # 20.5 vs 28.1 us
    (4096, 12288, 4, 'fp8'): GemvConfig('fma', 8, 2048, 1, 4, 3),  # 27.1 vs 28.3 us
    (4096, 12288, 8, 'fp8'): GemvConfig('dot', 64, 128, 4, 4, 8),  # 28.6 vs 28.6 us
    (5120, 2048, 1, 'fp8'): GemvConfig('fma', 4, 2048, 1, 4, 1),  # 6.0 vs 10.1 us
    (5120, 2048, 2, 'fp8'): GemvConfig('fma', 8, 1024, 1, 2, 1),  # 6.8 vs 10.2 us
    (5120, 2048, 4, 'fp8'): GemvConfig('fma', 8, 1024, 1, 2, 1),  # 9.2 vs 10.3 us
    (6144, 4096, 1, 'fp8'): GemvConfig('fma', 4, 2048, 1, 4, 1),  # 11.1 vs 15.2 us
    (6144, 4096, 2, 'fp8'): GemvConfig('fma', 8, 1024, 1, 2, 1),  # 12.0 vs 15.1 us
    (24576, 4096, 1, 'fp8'): GemvConfig('fma', 4, 4096, 1, 8, 1),  # 35.0 vs 38.9 us
    (24576, 4096, 2, 'fp8'): GemvConfig('fma', 16, 512, 1, 4, 1),  # 36.8 vs 39.5 us
}


# Fused-input modes of `gemv`, keyed (N, K, M bucket, weight kind, mode): "norm" (an RMSNorm input, the qkv and
# gate|up projections) and "silu" (SiLU(gate) * up, the down projection). They load two to three activation vectors
# per weight tile instead of one, so they can lose to the unfused sequence (the norm or activation kernel, then the
# plain GEMV), most with fp8 weights (half the weight bytes per activation byte) and at M >= 2. Only keys where
# the fused GEMV beat that sequence are listed, and layers fuse exactly there (`use_gemv(x, w, mode)`). Measured on
# H100 80GB HBM3 with `benchmarks/bench_gemv.py --fused --ms 1 2` (benchmarks/results/gemv_fused_h100_*.json);
# comments: fused vs unfused.
FUSED_GEMV_CONFIGS: dict[tuple[int, int, int, str, str], GemvConfig] = {
    (4096, 12288, 1, 'bf16', 'silu'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 35.6 vs 37.0 us
    (4096, 12288, 2, 'bf16', 'silu'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 36.8 vs 37.1 us
    (5120, 2048, 1, 'bf16', 'norm'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 9.5 vs 10.6 us
    (5120, 2048, 2, 'bf16', 'norm'): GemvConfig('fma', 8, 512, 1, 2, 1),  # 11.1 vs 11.2 us
    (6144, 4096, 1, 'bf16', 'norm'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 19.2 vs 20.1 us
    (6144, 4096, 2, 'bf16', 'norm'): GemvConfig('fma', 4, 1024, 1, 4, 1),  # 20.9 vs 21.3 us
    (24576, 4096, 1, 'bf16', 'norm'): GemvConfig('fma', 4, 2048, 1, 8, 1),  # 66.3 vs 68.0 us
    (4096, 12288, 1, 'fp8', 'silu'): GemvConfig('fma', 4, 2048, 1, 4, 1),  # 20.5 vs 20.6 us
    (5120, 2048, 1, 'fp8', 'norm'): GemvConfig('fma', 4, 2048, 1, 4, 1),  # 7.2 vs 7.6 us
    (6144, 4096, 1, 'fp8', 'norm'): GemvConfig('fma', 8, 1024, 1, 2, 1),  # 12.0 vs 12.6 us
}


def weight_kind(dtype: torch.dtype) -> str:
    """Key component of `GEMV_CONFIGS` for a weight dtype."""
    return "fp8" if dtype == FP8_DTYPE else "bf16"


def m_bucket(m: int) -> int:
    """Key component of `GEMV_CONFIGS` for M (1, 2, 4, 8, 16)."""
    return next_power_of_2(max(m, 1))


def _default_config(m: int, weight_dtype: torch.dtype) -> GemvConfig:
    """Untuned fallback: CUDA cores while each weight element feeds few rows, tensor cores beyond."""
    element = 1 if weight_dtype == FP8_DTYPE else 2
    if m <= 4:
        return GemvConfig("fma", block_n=8, block_k=2048 // element, split_k=0, num_warps=4, num_stages=1)
    return GemvConfig("dot", block_n=64, block_k=256 // element, split_k=0, num_warps=4, num_stages=4)


def has_tuned_config(m: int, n: int, k: int, weight_dtype: torch.dtype) -> bool:
    """Whether `GEMV_CONFIGS` lists this shape, i.e. the GEMV was measured faster than the path it would replace."""
    return m <= GEMV_MAX_M and (n, k, m_bucket(m), weight_kind(weight_dtype)) in GEMV_CONFIGS


def use_gemv(x: torch.Tensor, w: torch.Tensor, mode: str = "plain") -> bool:
    """Dispatch rule of the linear layers: a CUDA [M, K] input whose shape has a tuned config; a fused input
    mode ("norm", "silu") also needs its `FUSED_GEMV_CONFIGS` entry (the fusion measured faster there)."""
    m, (n, k) = x.shape[0], w.shape
    if not (x.is_cuda and x.dim() == 2 and has_tuned_config(m, n, k, w.dtype)):
        return False
    return mode == "plain" or (n, k, m_bucket(m), weight_kind(w.dtype), mode) in FUSED_GEMV_CONFIGS


def gemv_config(m: int, n: int, k: int, weight_dtype: torch.dtype, mode: str = "plain") -> GemvConfig:
    """The tuned config for this shape and input mode (`FUSED_GEMV_CONFIGS`, then `GEMV_CONFIGS`), else the default
    for M and the weight dtype."""
    key = (n, k, m_bucket(m), weight_kind(weight_dtype))
    return FUSED_GEMV_CONFIGS.get((*key, mode)) or GEMV_CONFIGS.get(key) or _default_config(m, weight_dtype)


def auto_split_k(tiles: int, k: int, block_k: int, sms: int) -> int:
    """Smallest power-of-two split giving >= 4 programs per SM while each split keeps >= 2 K tiles."""
    split = 1
    while tiles * split < 4 * sms and k >= 4 * split * block_k:
        split *= 2
    return split


def gemv_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] @ (w [N, K] * w_scale [N, 1])^T + bias in fp32, cast to out_dtype (default x's dtype)."""
    out = x.float() @ w.float().t()
    if w_scale is not None:
        out = out * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


if HAS_TRITON:

    @triton.jit
    def _finish(acc, offs_m, offs_n, M, N, s_ptr, b_ptr, out_ptr, stride_om, HAS_SCALE: tl.constexpr,
                HAS_BIAS: tl.constexpr):
        """Epilogue on the full fp32 sums [BLOCK_M, BLOCK_N]: per-row weight scale, bias, cast, store."""
        mask_n = offs_n < N
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & mask_n[None, :])

    @triton.jit
    def store_tile(acc, offs_m, offs_n, M, N, SPLIT_K, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, stride_om,
                   HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Finish this program's [BLOCK_M, BLOCK_N] sums, or with split-K park them in the workspace [S, M, N] and let
        the last split of the column tile (atomic arrival count) add all partials in split order and finish."""
        if SPLIT_K == 1:
            _finish(acc, offs_m, offs_n, M, N, s_ptr, b_ptr, out_ptr, stride_om, HAS_SCALE, HAS_BIAS)
        else:
            pid_n = tl.program_id(0)
            plane = M * N
            parts = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(parts + tl.program_id(1) * plane, acc, mask=mask)
            tl.debug_barrier()  # every thread's partial is written before the (releasing) arrival below
            arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:
                total = tl.zeros_like(acc)
                for s in range(SPLIT_K):  # fixed order: bitwise reproducible whichever split came last
                    total += tl.load(parts + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
                _finish(total, offs_m, offs_n, M, N, s_ptr, b_ptr, out_ptr, stride_om, HAS_SCALE, HAS_BIAS)
                tl.store(cnt_ptr + pid_n, 0)  # ready for the next launch / graph replay

    @triton.jit
    def _chunk_sums(w, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
        """[BLOCK_N, BLOCK_K // CHUNK] sums of w[n, k] * x[k] over CHUNK consecutive k (w: fp32 [BLOCK_N, BLOCK_K])."""
        return tl.sum(tl.reshape(w * x.to(tl.float32)[None, :], (BLOCK_N, BLOCK_K // CHUNK, CHUNK)), axis=2)

    @triton.jit
    def load_x(ptrs, mask, up_offset, SILU_MUL: tl.constexpr):
        """Activations at `ptrs`; with SILU_MUL, SiLU(gate) * up of a merged gate|up row (gate at `ptrs`, up
        `up_offset` elements on), in fp32 and rounded to the row's dtype like the separate activation kernel."""
        if SILU_MUL:
            gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(ptrs + up_offset, mask=mask, other=0.0).to(tl.float32)
            return (gate * tl.sigmoid(gate) * up).to(ptrs.dtype.element_ty)
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def _add_row(acc, part, m, BLOCK_M: tl.constexpr):
        """acc[m] += part ([1, ...], broadcast over acc's rows); the row select resolves at compile time because
        each thread holds all BLOCK_M rows."""
        if BLOCK_M == 1:
            return acc + part
        rows = tl.reshape(tl.arange(0, BLOCK_M), [BLOCK_M] + [1] * (len(acc.shape) - 1))
        return tl.where(rows == m, acc + part, acc)

    @triton.jit
    def fma_tile(acc, w, x_ptr, stride_xm, M, k, k_stop, TAIL: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, SILU_MUL: tl.constexpr = False,
                 up_offset=0):
        """acc [BLOCK_M, BLOCK_N, BLOCK_K // CHUNK] += chunk sums of x[m, k] * w[n, k] for every row m.

        Everything is shaped from the 2-D weight tile, so the compiler keeps its load layout (16-byte vectors along
        K per thread) and loads each x row straight into it. CHUNK is one such vector, so the sums are per-thread FMA
        chains (no shuffles); the cross-lane part of the K reduction waits until after the loop.
        """
        w = w.to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            row_ok = tl.full([BLOCK_K], m, tl.int32) < M  # a splat: keeps the load vectorized
            if TAIL:
                row_ok = row_ok & (k < k_stop)
            x = load_x(x_ptr + m * stride_xm + k, row_ok, up_offset, SILU_MUL)
            acc = _add_row(acc, _chunk_sums(w, x, BLOCK_N, BLOCK_K, CHUNK)[None, :, :], m, BLOCK_M)
        return acc

    @triton.jit
    def _load_norm_x(x_ptr, r_ptr, g_ptr, r_out_ptr, x_off, r_off, ro_off, g_off, mask, g_mask, tile,
                    HAS_RES: tl.constexpr):
        """RMSNorm input of a GEMV: s = x (+ residual) in fp32 and s * gamma, the normalized input before its
        per-row 1 / rms, which the caller applies to the finished sums (it needs the whole row's sum of squares,
        accumulated from s as the K loop goes). With a residual, column tile 0 (`tile` is the caller's) writes s
        rounded to the residual's dtype: the layer's new residual stream; the other tiles only read."""
        s = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
            first = tl.zeros_like(x_off) == tile  # a tensor: the interpreter rejects scalar-and-tensor masks
            tl.store(r_out_ptr + ro_off, s.to(r_out_ptr.dtype.element_ty), mask=mask & first)
        return s, s * tl.load(g_ptr + g_off, mask=g_mask, other=0.0).to(tl.float32)

    @triton.jit
    def fma_tile_norm(acc, ssq, w, x_ptr, r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom, tile, M,
                      k, k_stop, TAIL: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
        """`fma_tile` on RMSNorm inputs (`_load_norm_x`); also adds each row's s^2 chunk sums to ssq
        [BLOCK_M, BLOCK_K // CHUNK]."""
        w = w.to(tl.float32)
        for m in tl.static_range(BLOCK_M):
            row_ok = tl.full([BLOCK_K], m, tl.int32) < M
            if TAIL:
                row_ok = row_ok & (k < k_stop)
            s, x = _load_norm_x(x_ptr, r_ptr, g_ptr, r_out_ptr, m * stride_xm + k, m * stride_rm + k,
                               m * stride_rom + k, k, row_ok, k < k_stop, tile, HAS_RES)
            acc = _add_row(acc, _chunk_sums(w, x, BLOCK_N, BLOCK_K, CHUNK)[None, :, :], m, BLOCK_M)
            sq = tl.sum(tl.reshape(s * s, (BLOCK_K // CHUNK, CHUNK)), axis=1)
            ssq = _add_row(ssq, sq[None, :], m, BLOCK_M)
        return acc, ssq

    @triton.jit
    def _fma_step(acc, ssq, w, x_ptr, r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom, tile, M, K, k, k_stop,
                  TAIL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  CHUNK: tl.constexpr, SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr):
        """One K tile of the fma kernel for its input mode (plain / SiLU-and-mul via `fma_tile`, or RMSNorm)."""
        if NORM:
            acc, ssq = fma_tile_norm(acc, ssq, w, x_ptr, r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom,
                                     tile, M, k, k_stop, TAIL, HAS_RES, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK)
        else:
            acc = fma_tile(acc, w, x_ptr, stride_xm, M, k, k_stop, TAIL, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, SILU_MUL, K)
        return acc, ssq

    @triton.jit(do_not_specialize=["M", "SPLIT_K"])
    def _gemv_fma_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, r_ptr, g_ptr, r_out_ptr, M, N, K,
                         K_PER_SPLIT, SPLIT_K, stride_xm, stride_wn, stride_om, stride_rm, stride_rom, eps,
                         HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr, NUM_STAGES: tl.constexpr,
                         SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr):
        """Program (column tile, K split): CUDA-core dot products of all M rows with its weight rows."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Rows past N re-read row n % N (unmasked, vectorized loads); their results are never stored.
        w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn
        k_begin = tl.program_id(1) * K_PER_SPLIT
        k_stop = tl.minimum(k_begin + K_PER_SPLIT, K)
        k_full = k_begin + (k_stop - k_begin) // BLOCK_K * BLOCK_K
        tile = tl.program_id(0)
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K // CHUNK], dtype=tl.float32)
        ssq = tl.zeros([BLOCK_M, BLOCK_K // CHUNK], dtype=tl.float32)
        wait_for_inputs(PDL)
        for k0 in tl.range(k_begin, k_full, BLOCK_K, num_stages=NUM_STAGES):
            k = k0 + offs_k
            w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
            acc, ssq = _fma_step(acc, ssq, w, x_ptr, r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom, tile,
                                 M, K, k, k_stop, False, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, SILU_MUL, NORM, HAS_RES)
        if not EVEN_K:  # the last split's ragged tile; masks would break vectorization inside the loop
            k = k_full + offs_k
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < k_stop, other=0.0)
            acc, ssq = _fma_step(acc, ssq, w, x_ptr, r_ptr, g_ptr, r_out_ptr, stride_xm, stride_rm, stride_rom, tile,
                                 M, K, k, k_stop, True, BLOCK_M, BLOCK_N, BLOCK_K, CHUNK, SILU_MUL, NORM, HAS_RES)
        release_dependents(PDL)
        sums = tl.sum(acc, axis=2)
        if NORM:  # one K split covers the whole row, so ssq is the row's full sum of squares
            sums = sums * tl.math.rsqrt(tl.sum(ssq, axis=1) / K + eps)[:, None]
        store_tile(sums, tl.arange(0, BLOCK_M), offs_n, M, N, SPLIT_K, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr,
                   stride_om, HAS_SCALE, HAS_BIAS)

    @triton.jit
    def _mma(w, xt, acc, DOT_F32: tl.constexpr):
        """acc += w @ xt with w upcast to x's dtype (exact for e4m3). DOT_F32 widens both operands to fp32 with IEEE
        products: the interpreter multiplies bf16 dot operands as raw bit patterns, and the widening is exact."""
        if DOT_F32:
            acc = tl.dot(w.to(xt.dtype).to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
        return acc

    @triton.jit
    def _dot_step(acc, ssq, k, k_stop, x_ptr, w_rows, r_ptr, g_ptr, r_out_ptr, xt_cols, offs_m, mask_x, stride_xm,
                  stride_rm, stride_rom, tile, up_offset, TAIL: tl.constexpr, DOT_F32: tl.constexpr,
                  SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RES: tl.constexpr):
        """One K tile of the dot kernel: x^T [BLOCK_K, BLOCK_M] (plain, SiLU-and-mul, or RMSNorm input adding its
        s^2 column sums to ssq) against the weight tile. Only the TAIL tile masks along K."""
        mask_xt = mask_x
        if TAIL:
            mask_xt = mask_x & (k[:, None] < k_stop)
        if NORM:
            s, xn = _load_norm_x(x_ptr, r_ptr, g_ptr, r_out_ptr, offs_m[None, :] * stride_xm + k[:, None],
                                offs_m[None, :] * stride_rm + k[:, None], offs_m[None, :] * stride_rom + k[:, None],
                                k[:, None], mask_xt, k[:, None] < k_stop, tile, HAS_RES)
            ssq += tl.sum(s * s, axis=0)
            xt = xn.to(x_ptr.dtype.element_ty)
        else:
            xt = load_x(xt_cols + k[:, None], mask_xt, up_offset, SILU_MUL)
        if TAIL:
            w = tl.load(w_rows + k[None, :], mask=k[None, :] < k_stop, other=0.0)
        else:
            w = tl.load(w_rows + k[None, :], eviction_policy="evict_first")
        return _mma(w, xt, acc, DOT_F32), ssq

    @triton.jit(do_not_specialize=["M", "SPLIT_K"])
    def _gemv_dot_kernel(x_ptr, w_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, r_ptr, g_ptr, r_out_ptr, M, N, K,
                         K_PER_SPLIT, SPLIT_K, stride_xm, stride_wn, stride_om, stride_rm, stride_rom, eps,
                         HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, SILU_MUL: tl.constexpr,
                         NORM: tl.constexpr, HAS_RES: tl.constexpr, PDL: tl.constexpr):
        """Program (column tile, K split): tensor-core W_tile @ x^T, weight rows on the MMA's wide side."""
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        xt_cols = x_ptr + offs_m[None, :] * stride_xm
        mask_x = offs_m[None, :] < M
        w_rows = w_ptr + (offs_n % N).to(tl.int64)[:, None] * stride_wn
        k_begin = tl.program_id(1) * K_PER_SPLIT
        k_stop = tl.minimum(k_begin + K_PER_SPLIT, K)
        k_full = k_begin + (k_stop - k_begin) // BLOCK_K * BLOCK_K
        tile = tl.program_id(0)
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        ssq = tl.zeros([BLOCK_M], dtype=tl.float32)
        wait_for_inputs(PDL)
        for k0 in range(k_begin, k_full, BLOCK_K):
            acc, ssq = _dot_step(acc, ssq, k0 + offs_k, k_stop, x_ptr, w_rows, r_ptr, g_ptr, r_out_ptr, xt_cols, offs_m,
                                 mask_x, stride_xm, stride_rm, stride_rom, tile, K, False, DOT_F32, SILU_MUL,
                                 NORM, HAS_RES)
        if not EVEN_K:
            acc, ssq = _dot_step(acc, ssq, k_full + offs_k, k_stop, x_ptr, w_rows, r_ptr, g_ptr, r_out_ptr, xt_cols,
                                 offs_m, mask_x, stride_xm, stride_rm, stride_rom, tile, K, True, DOT_F32,
                                 SILU_MUL, NORM, HAS_RES)
        release_dependents(PDL)
        if NORM:
            acc = acc * tl.math.rsqrt(ssq / K + eps)[None, :]
        store_tile(tl.trans(acc), offs_m, offs_n, M, N, SPLIT_K, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, stride_om,
                    HAS_SCALE, HAS_BIAS)


def _check(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
           silu_mul: bool) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1] * (2 if silu_mul else 1):
        want = "x [M, 2K] (gate | up)" if silu_mul else "x [M, K]"
        raise ValueError(f"gemv expects {want} and w [N, K], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[0] > GEMV_MAX_M:
        raise ValueError(f"gemv handles at most {GEMV_MAX_M} rows, got {x.shape[0]}")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gemv activations must be bf16 or fp16, got {x.dtype}")
    if w.dtype != FP8_DTYPE and w.dtype != x.dtype:
        raise ValueError(f"16-bit weights must match the activations' dtype, got {w.dtype} and {x.dtype}")
    if w.dtype == FP8_DTYPE and w_scale is None:
        raise ValueError("fp8 weights need their per-output-channel w_scale [N, 1]")
    if w_scale is not None and w_scale.numel() != w.shape[0]:
        raise ValueError(f"w_scale needs one value per output row ({w.shape[0]}), got {tuple(w_scale.shape)}")
    if bias is not None and bias.shape != (w.shape[0],):
        raise ValueError(f"bias must be [{w.shape[0]}], got {tuple(bias.shape)}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv operands must be contiguous along K")


def _check_config(cfg: GemvConfig) -> None:
    sizes = (cfg.block_n, cfg.block_k)
    if cfg.kernel not in _KERNELS or any(s < 1 or s & (s - 1) for s in sizes) or cfg.split_k < 0:
        raise ValueError(f"invalid gemv config {cfg}")
    if cfg.kernel == "dot" and min(cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"the dot kernel needs block_n and block_k >= 16, got {cfg}")


def _check_norm(x: torch.Tensor, rms_weight: torch.Tensor, residual: torch.Tensor | None,
                residual_out: torch.Tensor | None, silu_mul: bool) -> None:
    if silu_mul:
        raise ValueError("gemv takes either silu_mul or an RMSNorm input, not both")
    if rms_weight.shape != (x.shape[1],):
        raise ValueError(f"rms_weight must be [{x.shape[1]}], got {tuple(rms_weight.shape)}")
    if (residual is None) != (residual_out is None):
        raise ValueError("a residual needs residual_out (where x + residual goes) and vice versa")
    for name, t in (("residual", residual), ("residual_out", residual_out)):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype or t.stride(1) != 1):
            raise ValueError(f"{name} must be {tuple(x.shape)} {x.dtype} with unit column stride, got "
                             f"{tuple(t.shape)} {t.dtype}")
    if residual_out is not None and any(residual_out.data_ptr() == t.data_ptr() for t in (x, residual)):
        raise ValueError("residual_out must not alias x or residual: other programs still read them")


def gemv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, config: GemvConfig | None = None,
         out: torch.Tensor | None = None, silu_mul: bool = False, rms_weight: torch.Tensor | None = None,
         rms_eps: float = 1e-6, residual: torch.Tensor | None = None,
         residual_out: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (w [N, K] * w_scale)^T + bias for M <= 16, streaming w once (see the module docstring).

    x: bf16/fp16, rows may be strided; w: x's dtype, or float8_e4m3fn with w_scale [N, 1] (or [N]) fp32; bias: [N].
    out_dtype defaults to x's dtype (or out's); out: a preallocated [M, N] destination, rows may be strided.
    config overrides `gemv_config` (benchmarks). silu_mul: x is a merged [M, 2K] gate|up projection and the
    input is SiLU(gate) * up, computed as x is loaded (a SwiGLU MLP's down projection without the separate
    activation launch).
    rms_weight: the input is RMSNorm(s) * rms_weight with s = x (+ residual), the pre-norm of a decoder layer
    folded into the load: products use s * rms_weight and each row's 1 / rms (its sum of squares accumulates in
    the same K loop) scales the finished sums, so the norm costs no launch and no pass of its own. With a
    residual, s is also written to residual_out (rounded to x's dtype), the layer's new residual stream. The norm
    needs whole rows per program, so this mode runs without a K split.
    """
    _check(x, w, w_scale, bias, silu_mul)
    if rms_weight is not None:
        _check_norm(x, rms_weight, residual, residual_out, silu_mul)
    m = x.shape[0]
    n, k = w.shape
    out_dtype = out_dtype or (out.dtype if out is not None else x.dtype)
    if out is not None and (out.shape != (m, n) or out.dtype != out_dtype or out.stride(1) != 1):
        raise ValueError(f"out must be [{m}, {n}] {out_dtype} with unit column stride, got {tuple(out.shape)} "
                         f"{out.dtype}")
    if not can_use_triton(x):
        if rms_weight is None:
            inp = silu_and_mul_ref(x) if silu_mul else x
        elif residual is None:
            inp = rms_norm_ref(x, rms_weight, rms_eps)
        else:
            inp, new_residual = fused_add_rms_norm_ref(x, residual, rms_weight, rms_eps)
            residual_out.copy_(new_residual)
        y = gemv_ref(inp, w, w_scale, bias, out_dtype)
        return y if out is None else out.copy_(y)
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    mode = "norm" if rms_weight is not None else "silu" if silu_mul else "plain"
    cfg = config or gemv_config(m, n, k, w.dtype, mode)
    _check_config(cfg)
    tiles = cdiv(n, cfg.block_n)
    split = 1 if rms_weight is not None else cfg.split_k or auto_split_k(tiles, k, cfg.block_k, num_sms(x.device))
    k_per_split = cdiv(cdiv(k, split), cfg.block_k) * cfg.block_k
    split = cdiv(k, k_per_split)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    counters = split_counters(x.device, tiles) if split > 1 else out
    scale = w_scale.reshape(-1).float() if w_scale is not None else out
    res_in = residual if residual is not None else x
    res_out = residual_out if residual_out is not None else x
    args = (x, w, scale, bias if bias is not None else out, out, ws, counters, res_in,
            rms_weight if rms_weight is not None else x, res_out, m, n, k, k_per_split, split, x.stride(0),
            w.stride(0), out.stride(0), res_in.stride(0), res_out.stride(0), rms_eps)
    pdl = use_pdl(x)
    flags = dict(HAS_SCALE=w_scale is not None, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
                 BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SILU_MUL=silu_mul, NORM=rms_weight is not None,
                 HAS_RES=residual is not None, num_warps=cfg.num_warps, PDL=pdl, launch_pdl=pdl)
    if cfg.kernel == "fma":
        chunk = min(16 // w.element_size(), cfg.block_k)  # one 16-byte weight vector per thread
        _gemv_fma_kernel[(tiles, split)](*args, BLOCK_M=next_power_of_2(m), CHUNK=chunk, NUM_STAGES=cfg.num_stages,
                                         **flags)
    else:
        _gemv_dot_kernel[(tiles, split)](*args, BLOCK_M=_DOT_M, DOT_F32=TRITON_INTERPRETED,
                                         num_stages=cfg.num_stages, **flags)
    return out
