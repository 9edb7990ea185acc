"""FP8 (e4m3) PTPC quantization: per-token dynamic activation scales, per-output-channel weight scales.

`fp8_linear` quantizes activations per token and picks a GEMM per shape: a Triton small-M kernel (decode:
tiles cover all rows, the grid splits N and K so the weight is streamed once by many CTAs), a Triton
large-M tiled kernel, or `torch._scaled_mm` with row-wise scales (cuBLASLt/CUTLASS). The choice comes from
`FP8_GEMM_DISPATCH`, whose values `benchmarks/bench_quant_kernels.py` recommends from measurements.
Every kernel has a `*_ref` PyTorch twin with the same semantics (fp32 math, cast at the end).
"""
from __future__ import annotations

import functools

import torch

from swiftlm.kernels.triton_support import HAS_TRITON, TRITON_INTERPRETED, can_use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.triton_support import swizzled_tile

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
FP8_MIN_SCALE = 1e-12  # keeps an all-zero row from dividing by zero; such a row quantizes to zeros

# M <= triton_small_m_max: Triton small-M kernel; M <= triton_large_m_max: Triton large-M kernel;
# otherwise torch._scaled_mm. The small-M kernel pads M to a power of two >= 16 and supports up to 64 rows.
FP8_GEMM_DISPATCH: dict[str, int] = {"triton_small_m_max": 16, "triton_large_m_max": 0}
_SMALL_M_LIMIT = 64
FP8_BACKENDS = ("triton_small", "triton_large", "scaled_mm", "torch")

FP8_PRE_ROUND = TRITON_INTERPRETED  # see `to_fp8`


def cdiv(a: int, b: int) -> int:
    """Ceil division for launch grids (no Triton import needed)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (tl.arange sizes)."""
    return 1 << max(0, n - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """SM count used to size split-K grids; a nominal H100 figure off-GPU (interpreter)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ----------------------------------------------------------------------------------------------------------
# Per-token activation quantization
# ----------------------------------------------------------------------------------------------------------

def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (e4m3 [..., K], fp32 scales [..., 1]); scale = max(amax / 448, 1e-12), x ~ q * scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALE)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def _row_block(k: int) -> tuple[int, bool, int]:
    """(BLOCK, single_pass, num_warps) for a row-wise kernel over k elements."""
    block = next_power_of_2(k)
    if block <= 8192:
        return block, True, 4 if block <= 2048 else 8 if block <= 4096 else 16
    return 4096, False, 8


if HAS_TRITON:

    @triton.jit
    def to_fp8(x, dtype: tl.constexpr, PRE_ROUND: tl.constexpr):
        """Cast fp32 values already clamped to +-448 to e4m3 (`dtype`) with round-to-nearest-even.

        GPUs convert with cvt.rn.satfinite. The Triton interpreter's float cast rounds without carrying into the
        exponent (124.3 -> 64), so with PRE_ROUND the value is first rounded on the e4m3 grid in fp32 (scale |x|
        by the power-of-two ulp, round with the 1.5 * 2^23 trick, scale back), which makes that cast exact.
        """
        if PRE_ROUND:
            bits = x.to(tl.int32, bitcast=True)
            ulp_exp = tl.maximum((bits >> 23) & 0xFF, 127 - 6) - 3  # 3 mantissa bits; min normal 2^-6
            ulp = (ulp_exp << 23).to(tl.float32, bitcast=True)
            inv_ulp = ((254 - ulp_exp) << 23).to(tl.float32, bitcast=True)
            rounded = ((tl.abs(x) * inv_ulp + 12582912.0) - 12582912.0) * ulp
            x = tl.where(bits < 0, -rounded, rounded)  # keeps the sign of zero, as the hardware cast does
        return x.to(dtype)

    @triton.jit
    def _fp8_quant_row(x, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr):
        """Scale and clamped scaled values of one fp32 row held in registers (padding lanes must be 0)."""
        amax = tl.max(tl.abs(x), axis=0)
        scale = tl.maximum(amax / FP8_MAX, MIN_SCALE)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        return q, scale

    @triton.jit
    def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
                                FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
                                SINGLE_PASS: tl.constexpr, PRE_ROUND: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * stride_q
        offs = tl.arange(0, BLOCK)
        if SINGLE_PASS:
            mask = offs < K
            x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            q, scale = _fp8_quant_row(x, FP8_MAX, MIN_SCALE)
            tl.store(q_row + offs, to_fp8(q, q_ptr.dtype.element_ty, PRE_ROUND), mask=mask)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                x = tl.load(x_row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(x))
            scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
            for k0 in range(0, K, BLOCK):
                mask = k0 + offs < K
                x = tl.load(x_row + k0 + offs, mask=mask, other=0.0).to(tl.float32)
                q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
                tl.store(q_row + k0 + offs, to_fp8(q, q_ptr.dtype.element_ty, PRE_ROUND), mask=mask)
        tl.store(s_ptr + row, scale)

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, bias_ptr, c_ptr, MN, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def store_split_k_tile(acc, offs_m, offs_n, M, N, pid_k, bias_ptr, c_ptr, stride_cm, stride_cs,
                           HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        """Epilogue of the split-K GEMMs: with one split, add the bias and store in c's dtype; otherwise park this
        split's fp32 partial at c[pid_k] ([S, M, N]) for `reduce_split_k`."""
        mask_n = offs_n < N
        mask = (offs_m < M)[:, None] & mask_n[None, :]
        rows = offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(c_ptr + rows, acc.to(c_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(c_ptr + pid_k.to(tl.int64) * stride_cs + rows, acc, mask=mask)

    @triton.jit
    def _fp8_gemm_small_m_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, K_PER_SPLIT,
                                 stride_am, stride_bn, stride_cm, stride_cs,
                                 HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One CTA per (N tile, K split) covering every row, so each weight byte is read once."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
        k_begin = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < k_end
            a = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_cols + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc=acc)
        a_scale = tl.load(as_ptr + offs_m, mask=mask_m, other=0.0)
        b_scale = tl.load(bs_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * a_scale[:, None] * b_scale[None, :]
        store_split_k_tile(acc, offs_m, offs_n, M, N, pid_k, bias_ptr, c_ptr, stride_cm, stride_cs, HAS_BIAS, SPLIT_K)

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, stride_am, stride_bn, stride_cm,
                         HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        """Tiled GEMM with grouped tile order (weight tiles reused from L2 across GROUP_M row tiles)."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = swizzled_tile(pid, num_m, num_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        # Out-of-range rows/cols wrap onto valid ones for the loads; the store is masked.
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
                b = tl.load(b_ptrs, mask=(k0 + offs_k)[:, None] < K, other=0.0)
            acc = tl.dot(a, b, acc=acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        a_scale = tl.load(as_ptr + rows)
        b_scale = tl.load(bs_ptr + cols)
        acc = acc * a_scale[:, None] * b_scale[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        c = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token FP8 quantization (see `per_token_quant_fp8_ref`); x's last dim must be contiguous."""
    if not can_use_triton(x):
        return per_token_quant_fp8_ref(x)
    lead = x.shape[:-1]
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block, single, warps = _row_block(k)
        _per_token_quant_kernel[(m,)](x2, q, scale, k, x2.stride(0), q.stride(0), FP8_MAX=FP8_MAX,
                                      MIN_SCALE=FP8_MIN_SCALE, BLOCK=block, SINGLE_PASS=single,
                                      PRE_ROUND=FP8_PRE_ROUND, num_warps=warps)
    return q.view(*lead, k), scale.view(*lead, 1)


def quantize_weight_fp8_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization: w [N, K] -> (e4m3 [N, K], fp32 scales [N, 1]).

    Same rule as activations (each output row is a "token"), so w ~ q * scale row by row.
    """
    return per_token_quant_fp8_ref(w)


def quantize_kv_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """FP8 KV-cache store semantics: e4m3(clamp(x / scale, -448, 448)), computed in fp32."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of `quantize_kv_fp8` up to e4m3 rounding: x * scale in fp32, cast to dtype."""
    return (x.float() * scale).to(dtype)


# ----------------------------------------------------------------------------------------------------------
# FP8 GEMM: C[M, N] = (A_q[M, K] * a_scale[M]) @ (W_q[N, K] * w_scale[N])^T + bias
# ----------------------------------------------------------------------------------------------------------

def fp8_gemm_ref(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize both operands to fp32 and multiply; a [M, K] e4m3, a_scale [M, 1], w [N, K], w_scale [N, 1]."""
    out = (a.float() @ w.float().t()) * a_scale.float().view(-1, 1) * w_scale.float().view(1, -1)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def reduce_split_k(partials: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[M, N] (contiguous) = sum of fp32 partials [S, M, N] + bias, in a fixed order (deterministic)."""
    split, m, n = partials.shape
    block = 1024
    _splitk_reduce_kernel[(cdiv(m * n, block),)](partials, bias if bias is not None else partials, out, m * n, n,
                                                 SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block,
                                                 num_warps=4)
    return out


def choose_split_k(tiles: int, k: int, block_k: int, device: torch.device, max_split: int = 16) -> int:
    """Smallest split of K giving about two waves of CTAs, keeping whole BLOCK_K tiles per split."""
    k_tiles = cdiv(k, block_k)
    split = 1
    while tiles * split < 2 * num_sms(device) and split * 2 <= min(max_split, k_tiles):
        split *= 2
    return split


# (BLOCK_N, BLOCK_K, num_warps, num_stages) of the small-M kernel; BLOCK_M is next_pow2(M) >= 16.
FP8_SMALL_M_CONFIG: dict[str, int] = {"BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}


def _large_m_config(m: int) -> dict[str, int]:
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    if m <= 256:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}


def _check_gemm_args(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> None:
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"fp8 gemm expects a [M, K] and w [N, K], got {tuple(a.shape)} and {tuple(w.shape)}")
    if a.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("fp8 gemm operands must be contiguous along K")
    if a_scale.numel() != a.shape[0] or w_scale.numel() != w.shape[0]:
        raise ValueError("fp8 gemm expects one fp32 scale per activation row and per weight row")


def fp8_gemm_triton_small_m(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                            bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                            split_k: int | None = None, config: dict[str, int] | None = None) -> torch.Tensor:
    """Decode-shaped FP8 GEMM (M <= 64): grid over N tiles x K splits; split partials reduced in fixed order."""
    _check_gemm_args(a, a_scale, w, w_scale)
    m, k = a.shape
    n = w.shape[0]
    if m > _SMALL_M_LIMIT:
        raise ValueError(f"small-M fp8 kernel handles at most {_SMALL_M_LIMIT} rows, got {m}")
    cfg = dict(FP8_SMALL_M_CONFIG, **(config or {}))
    block_m = max(16, next_power_of_2(m))
    tiles_n = cdiv(n, cfg["BLOCK_N"])
    split = split_k or choose_split_k(tiles_n, k, cfg["BLOCK_K"], a.device)
    k_per_split = cdiv(cdiv(k, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=a.device)
    a_scale = a_scale.reshape(-1).float()
    w_scale = w_scale.reshape(-1).float()
    _fp8_gemm_small_m_kernel[(tiles_n, split)](
        a, a_scale, w, w_scale, bias if bias is not None else w_scale, target, m, n, k, k_per_split,
        a.stride(0), w.stride(0), n, m * n, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
        BLOCK_M=block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    if split > 1:
        reduce_split_k(target, bias, out)
    return out


def fp8_gemm_triton(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                    config: dict[str, int] | None = None) -> torch.Tensor:
    """Prefill-shaped FP8 GEMM: 2-D tiled, fp32 accumulation, scales and bias applied in the epilogue."""
    _check_gemm_args(a, a_scale, w, w_scale)
    m, k = a.shape
    n = w.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out
    cfg = dict(_large_m_config(m), **(config or {}))
    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]),)
    a_scale = a_scale.reshape(-1).float()
    w_scale = w_scale.reshape(-1).float()
    _fp8_gemm_kernel[grid](a, a_scale, w, w_scale, bias if bias is not None else w_scale, out, m, n, k,
                           a.stride(0), w.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                           EVEN_K=k % cfg["BLOCK_K"] == 0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                           BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"],
                           num_stages=cfg["num_stages"])
    return out


def fp8_gemm_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """torch._scaled_mm with row-wise scales (a_scale [M, 1], w_scale as [1, N]); bias added afterwards."""
    out = torch._scaled_mm(a, w.t(), scale_a=a_scale.reshape(-1, 1).float(), scale_b=w_scale.reshape(1, -1).float(),
                           out_dtype=out_dtype)
    if bias is not None:
        out.add_(bias)
    return out


def _scaled_mm_ok(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Row-wise _scaled_mm needs bf16 output, K and N multiples of 16, and sm89+ CUDA (CPU builds take only
    per-tensor scales in some torch versions, e.g. 2.11, so CPU runs the reference)."""
    if out_dtype != torch.bfloat16 or a.shape[1] % 16 or w.shape[0] % 16 or not a.is_cuda:
        return False
    return _capability(a.device.index if a.device.index is not None else torch.cuda.current_device()) >= (8, 9)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def select_fp8_backend(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> str:
    """Backend `fp8_gemm` uses for this shape, from `FP8_GEMM_DISPATCH` (see FP8_BACKENDS)."""
    m = a.shape[0]
    if can_use_triton(a):
        if m <= min(FP8_GEMM_DISPATCH["triton_small_m_max"], _SMALL_M_LIMIT):
            return "triton_small"
        if m <= FP8_GEMM_DISPATCH["triton_large_m_max"] or not _scaled_mm_ok(a, w, out_dtype):
            return "triton_large"
        return "scaled_mm"
    return "scaled_mm" if _scaled_mm_ok(a, w, out_dtype) else "torch"


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             backend: str | None = None) -> torch.Tensor:
    """FP8 x FP8 -> out_dtype GEMM on pre-quantized operands; backend None picks per shape."""
    if a.shape[0] == 0:
        return torch.empty((0, w.shape[0]), dtype=out_dtype, device=a.device)
    backend = backend or select_fp8_backend(a, w, out_dtype)
    if backend == "triton_small":
        return fp8_gemm_triton_small_m(a, a_scale, w, w_scale, bias, out_dtype)
    if backend == "triton_large":
        return fp8_gemm_triton(a, a_scale, w, w_scale, bias, out_dtype)
    if backend == "scaled_mm":
        return fp8_gemm_scaled_mm(a, a_scale, w, w_scale, bias, out_dtype)
    if backend == "torch":
        return fp8_gemm_ref(a, a_scale, w, w_scale, bias, out_dtype)
    raise ValueError(f"unknown fp8 gemm backend {backend!r}; expected one of {FP8_BACKENDS}")


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
               x_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
               backend: str | None = None) -> torch.Tensor:
    """y = x @ dequant(w_fp8, w_scale)^T + bias, with x quantized per token on the fly.

    x [..., K] in bf16/fp16 (or already e4m3 with `x_scale` [..., 1], e.g. from a fused norm+quant kernel);
    w_fp8 [N, K] e4m3; w_scale [N, 1] fp32. Output dtype defaults to x's dtype (bf16 for pre-quantized x).
    """
    lead = x.shape[:-1]
    if x.dtype == FP8_DTYPE:
        if x_scale is None:
            raise ValueError("an fp8 input needs its per-token x_scale")
        xq, xs = x.reshape(-1, x.shape[-1]), x_scale.reshape(-1, 1)
        out_dtype = out_dtype or torch.bfloat16
    else:
        xq, xs = per_token_quant_fp8(x.reshape(-1, x.shape[-1]))
        out_dtype = out_dtype or x.dtype
    out = fp8_gemm(xq, xs, w_fp8, w_scale, bias, out_dtype, backend)
    return out.view(*lead, w_fp8.shape[0])
