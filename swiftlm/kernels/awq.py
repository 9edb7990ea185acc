"""AWQ W4A16 in AutoAWQ's GEMM layout: y = x @ W with W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].

Layout: `qweight` int32 [K, N / 8] and `qzeros` int32 [K / G, N / 8] pack 8 int4 values of consecutive output
columns per int32, in AutoAWQ's interleaved order: nibble i (bits 4i..4i+3) of word j holds column
8j + AWQ_ORDER[i]; `scales` fp16 [K / G, N]. Kernels: a dequantizing Triton GEMM (int4 tiles expanded in
registers feeding `tl.dot`, prefill), a GEMV-style kernel for M <= 8 with fp16 / bf16 activations (decode,
packed 16-bit FMAs, split-K), and a full dequantize used before cuBLAS for very large M. `AWQ_DISPATCH` holds
the measured M thresholds.

The GEMV's bit tricks run as inline PTX on the GPU; under TRITON_INTERPRET=1 (which cannot run PTX) the same
kernel uses plain-Triton twins of those helpers that produce the same packed values.
"""
from __future__ import annotations

import torch

from swiftlm.kernels.triton_support import split_counters, use_pdl
from swiftlm.kernels.quant import (HAS_TRITON, TRITON_INTERPRETED, can_use_triton, cdiv, choose_split_k,
                                   next_power_of_2, num_sms, reduce_split_k)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.gemv import store_tile
    from swiftlm.kernels.quant import store_split_k_tile
    from swiftlm.kernels.triton_support import release_dependents, swizzled_tile, wait_for_inputs

AWQ_PACK = 8
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column offset stored in nibble i
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble holding column offset j

# M <= gemv_max_m (fp16 / bf16 x): GEMV kernel; M >= dequant_mm_min_m: dequantize W then torch.mm; otherwise the
# Triton GEMM.
# The GEMV beat the Triton GEMM at M <= 4 on Qwen2.5-32B shapes and lost at M = 8 (awq_gemv_m248_h100_9a4ae88.json).
AWQ_DISPATCH: dict[str, int] = {"gemv_max_m": 4, "dequant_mm_min_m": 1 << 30}
_GEMV_LIMIT = 8
# Launch parameters of the decode GEMV per M bucket (1, 2, 4, 8): BLOCK_P packed int32 columns (8 outputs each)
# per program, BLOCK_K rows per step (a divisor of the group size), FLUSH groups between fp32 reductions of the fp16
# partial sums, NUM_STAGES-deep software pipeline. A thread keeps 4 * M partial-sum registers per word of its
# tile, so larger M takes smaller tiles. Measured on H100 80GB HBM3 (`benchmarks/bench_awq_gemv.py`,
# benchmarks/results/awq_gemv_*_9a4ae88.json): the best tiles summed over the Qwen2.5-32B shapes.
AWQ_GEMV_CONFIGS: dict[int, dict[str, int]] = {
    1: {"BLOCK_P": 32, "BLOCK_K": 32, "FLUSH": 4, "NUM_STAGES": 3, "num_warps": 4},
    2: {"BLOCK_P": 16, "BLOCK_K": 8, "FLUSH": 4, "NUM_STAGES": 3, "num_warps": 4},
    4: {"BLOCK_P": 32, "BLOCK_K": 8, "FLUSH": 4, "NUM_STAGES": 3, "num_warps": 4},
    8: {"BLOCK_P": 32, "BLOCK_K": 8, "FLUSH": 4, "NUM_STAGES": 3, "num_warps": 4},
}
# Per-shape overrides, (N, K, M bucket) -> tile and K split. The split decides how the programs fill the GPU's
# ~3 resident programs per SM and moved these shapes by up to 25% (`--grid split`, awq_gemv_split*_h100_*.json);
# comments: time vs the M bucket's default. Shapes: Qwen2.5-32B qkv, o, gate_up, down.
_P64 = {"BLOCK_P": 64, "BLOCK_K": 16}
_P32 = {"BLOCK_P": 32, "BLOCK_K": 32}
AWQ_GEMV_SHAPE_CONFIGS: dict[tuple[int, int, int], dict[str, int]] = {
    (5120, 5120, 1): dict(_P32, split_k=16),  # 13.6 vs 17.0 us
    (55296, 5120, 1): dict(_P64, split_k=12),  # 74.9 vs 97.1 us
    (5120, 27648, 1): dict(_P64, split_k=40),  # 43.3 vs 54.5 us
    (7168, 5120, 2): dict(_P32, split_k=8),  # 24.5 vs 37.9 us
    (5120, 5120, 2): dict(_P32, split_k=10),  # 18.4 vs 22.9 us
    (55296, 5120, 2): dict(_P64, split_k=2),  # 133.3 vs 176.3 us
    (5120, 27648, 2): dict(_P64, split_k=24),  # 69.4 vs 107.3 us
}
_GEMV_DTYPES = (torch.float16, torch.bfloat16)
AWQ_BACKENDS = ("gemv", "gemm", "dequant_mm", "torch")


def _dequant_asm() -> str:
    """PTX for `_dequant_h2`: one AWQ word ($4), packed fp16 scales ($5..$8) and negated zero terms ($9..$12) ->
    four packed fp16 weight pairs ($0..$3). Pair j's codes sit in bits 8 (j // 2) + 4 (j % 2) of both 16-bit
    halves: OR-ed under 0x6400 (1024.0) they read as 1024 + code, or 1024 + 16 code for a byte's upper nibble,
    which the first FMA scales by 1 or 1/16 while subtracting 1024 (or 64) and the zero point, exactly."""
    lines = [".reg .b32 h, u, one, sixteenth, nzero;", "mov.b32 one, 0x3c003c00;", "mov.b32 sixteenth, 0x2c002c00;",
             "mov.b32 nzero, 0x80008000;", "shr.u32 u, $4, 8;"]
    for j, (word, mask, mult) in enumerate((("$4", "0x000f000f", "one"), ("$4", "0x00f000f0", "sixteenth"),
                                            ("u", "0x000f000f", "one"), ("u", "0x00f000f0", "sixteenth"))):
        lines += [f"lop3.b32 h, {word}, {mask}, 0x64006400, 0xea;", f"fma.rn.f16x2 h, h, {mult}, ${9 + j};",
                  f"fma.rn.f16x2 ${j}, h, ${5 + j}, nzero;"]
    return "{\n" + "\n".join(lines) + "\n}"


def _neg_zeros_asm() -> str:
    """PTX for `_neg_zeros_h2`: a zero word ($4) -> the four packed negated zero terms ($0..$3)."""
    lines = [".reg .b32 u, sixteenth;", "mov.b32 sixteenth, 0x2c002c00;", "shr.u32 u, $4, 8;",
             "lop3.b32 $0, $4, 0x000f000f, 0xe400e400, 0xea;", "lop3.b32 $1, $4, 0x00f000f0, 0xe400e400, 0xea;",
             "mul.rn.f16x2 $1, $1, sixteenth;", "lop3.b32 $2, u, 0x000f000f, 0xe400e400, 0xea;",
             "lop3.b32 $3, u, 0x00f000f0, 0xe400e400, 0xea;", "mul.rn.f16x2 $3, $3, sixteenth;"]
    return "{\n" + "\n".join(lines) + "\n}"


if HAS_TRITON:
    _DEQUANT_ASM = tl.constexpr(_dequant_asm())
    _NEG_ZEROS_ASM = tl.constexpr(_neg_zeros_asm())
    _MAGIC = tl.constexpr(0x64006400)  # 1024.0 in both fp16 lanes
    _NEG_MAGIC = tl.constexpr(-0x1BFF1C00)  # 0xE400E400 as an int32: -1024.0 in both fp16 lanes


# ----------------------------------------------------------------------------------------------------------
# Packing and reference
# ----------------------------------------------------------------------------------------------------------

def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """int4 values [R, N] (0..15, any int dtype) -> int32 [R, N / 8] in AutoAWQ's interleaved nibble order."""
    if values.shape[-1] % AWQ_PACK:
        raise ValueError(f"AWQ packs 8 columns per int32; got {values.shape[-1]} columns")
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, AWQ_PACK)
    packed = torch.zeros(v.shape[:-1], dtype=torch.int64, device=values.device)
    for nibble, col in enumerate(AWQ_ORDER):
        packed |= (v[..., col] & 0xF) << (4 * nibble)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)  # same bits as uint32


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N / 8] -> int4 values [R, N] as int32 (exact inverse of `awq_pack`)."""
    shifts = torch.tensor([4 * n for n in AWQ_REVERSE_ORDER], dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & 0xF
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * AWQ_PACK)


def awq_dequantize_ref(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                       dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """W [K, N] = (q - z) * s in fp32, cast to dtype (the product of an int4 and an fp16 is exact in fp32)."""
    q = awq_unpack(qweight)
    z = awq_unpack(qzeros).repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - z).float() * s).to(dtype)


def awq_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ W [K, N] (+ bias): W dequantized into x's dtype, product accumulated in fp32, cast to x's dtype."""
    w = awq_dequantize_ref(qweight, qzeros, scales, group_size, x.dtype)
    out = x.float() @ w.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def awq_quantize_ref(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric int4 quantization of a linear weight w [N, K] (nn.Linear orientation).

    Returns (qweight [K, N/8], qzeros [K/G, N/8], scales fp16 [K/G, N]) with AutoAWQ's rule: s = (max - min) / 15,
    z = clamp(-round(min / s), 0, 15), q = clamp(round(w / s) + z, 0, 15). No activation-aware search: this
    makes valid checkpoints for tests and benchmarks, not accurate ones.
    """
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in features {k} are not divisible by group size {group_size}")
    g = w.float().t().reshape(k // group_size, group_size, n)
    wmax = g.amax(dim=1)
    wmin = g.amin(dim=1)
    scales = ((wmax - wmin).clamp(min=1e-5) / 15).to(torch.float16)
    s = scales.float()
    zeros = (-torch.round(wmin / s)).clamp(0, 15)
    q = (torch.round(g / s[:, None, :]) + zeros[:, None, :]).clamp(0, 15).reshape(k, n)
    return awq_pack(q.to(torch.int32)), awq_pack(zeros.to(torch.int32)), scales


if HAS_TRITON:

    @triton.jit
    def _unpack_shifts(offs_n):
        """Bit shift of column n inside its int32: 4 * AWQ_REVERSE_ORDER[n % 8] = 4 * (j // 2 + 4 * (j % 2))."""
        j = offs_n % 8
        return ((j // 2) + (j % 2) * 4) * 4

    @triton.jit
    def _expand8(packed):
        """Repeat each int32 8 times along the last dim ([.., C] -> [.., 8C]): one load per word, then registers."""
        packed = tl.interleave(packed, packed)
        packed = tl.interleave(packed, packed)
        return tl.interleave(packed, packed)

    @triton.jit
    def _dequant_tile(qw_ptr, qz_ptr, s_ptr, k, mask_k, group, pid_n, N, BLOCK_N: tl.constexpr):
        """fp32 W tile [len(k), BLOCK_N] of column tile pid_n, for rows k that all lie in quantization `group`."""
        packed_cols = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        mask_p = packed_cols < N // 8
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        shifts = _unpack_shifts(offs_n)
        q = tl.load(qw_ptr + k.to(tl.int64)[:, None] * (N // 8) + packed_cols[None, :],
                    mask=mask_k[:, None] & mask_p[None, :], other=0)
        q = (_expand8(q) >> shifts[None, :]) & 0xF
        z = tl.load(qz_ptr + group * (N // 8) + packed_cols, mask=mask_p, other=0)
        z = (_expand8(z) >> shifts) & 0xF
        s = tl.load(s_ptr + group * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        return (q - z[None, :]).to(tl.float32) * s[None, :]

    @triton.jit
    def _awq_gemm_kernel(a_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, K_PER_SPLIT, stride_am, stride_cm,
                         stride_cs, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         DOT_F32: tl.constexpr):
        """Tiled GEMM; BLOCK_K divides GROUP_SIZE so each K tile uses one row of zeros and scales."""
        pid = tl.program_id(0)
        pid_k = tl.program_id(1)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = swizzled_tile(pid, num_m, num_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        k_begin = pid_k * K_PER_SPLIT
        k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + offs_k
            mask_k = k < k_end
            a = tl.load(a_rows + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, k, mask_k, k0 // GROUP_SIZE, pid_n, N, BLOCK_N)
            if DOT_F32:
                acc = tl.dot(a.to(tl.float32), w.to(a.dtype).to(tl.float32), acc=acc, input_precision="ieee")
            else:
                acc = tl.dot(a, w.to(a.dtype), acc=acc)
        store_split_k_tile(acc, offs_m, offs_n, M, N, pid_k, bias_ptr, c_ptr, stride_cm, stride_cs, HAS_BIAS, SPLIT_K)

    @triton.jit
    def _pack_h2(lo, hi):
        """Two fp16 tensors -> int32 words holding lo in bits 0..15 and hi in bits 16..31 (one f16x2 register)."""
        lo_bits = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return lo_bits | (hi.to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def _unpack_h2(v):
        """Inverse of `_pack_h2`: the (lo, hi) fp16 lanes of int32 words."""
        return (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True), (v >> 16).to(tl.int16).to(tl.float16,
                                                                                                   bitcast=True)

    @triton.jit
    def _dequant_pair_ref(h, s, nz, mult):
        """Plain-Triton twin of one step of `_DEQUANT_ASM`: lanes (h * mult + nz) * s, rounded once to fp16."""
        h_lo, h_hi = _unpack_h2(h)
        s_lo, s_hi = _unpack_h2(s)
        z_lo, z_hi = _unpack_h2(nz)
        w_lo = (h_lo.to(tl.float32) * mult + z_lo.to(tl.float32)) * s_lo.to(tl.float32)
        w_hi = (h_hi.to(tl.float32) * mult + z_hi.to(tl.float32)) * s_hi.to(tl.float32)
        return _pack_h2(w_lo.to(tl.float16), w_hi.to(tl.float16))

    @triton.jit
    def _dequant_h2(q, s0, s1, s2, s3, nz0, nz1, nz2, nz3, ASM: tl.constexpr):
        """AWQ words -> 4 int32 tensors of dequantized fp16 weight pairs: pair j holds output columns 2j, 2j + 1
        of each word, which AutoAWQ's nibble order stores in nibbles j and j + 4, i.e. in the same bit position
        of the word's two 16-bit halves. One AND-OR (`lop3`) per pair turns both codes into fp16 (1024 + code,
        or 1024 + 16 code for a byte's upper nibble), one packed FMA subtracts 1024 and the zero point (`nz*`,
        exact), one packed FMA applies the scales: 13 instructions per 8 weights, each weight rounded once
        like `awq_dequantize_ref`."""
        if ASM:
            w0, w1, w2, w3 = tl.inline_asm_elementwise(
                _DEQUANT_ASM, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [q, s0, s1, s2, s3, nz0, nz1, nz2, nz3],
                dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            w0 = _dequant_pair_ref((q & 0x000F000F) | _MAGIC, s0, nz0, 1.0)
            w1 = _dequant_pair_ref((q & 0x00F000F0) | _MAGIC, s1, nz1, 0.0625)
            w2 = _dequant_pair_ref(((q >> 8) & 0x000F000F) | _MAGIC, s2, nz2, 1.0)
            w3 = _dequant_pair_ref(((q >> 8) & 0x00F000F0) | _MAGIC, s3, nz3, 0.0625)
        return w0, w1, w2, w3

    @triton.jit
    def _fma_h2(a, b, c, ASM: tl.constexpr):
        """Packed a * b + c on int32 words carrying two fp16 lanes (`fma.rn.f16x2`)."""
        if ASM:
            out = tl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                            is_pure=True, pack=1)
        else:
            a_lo, a_hi = _unpack_h2(a)
            b_lo, b_hi = _unpack_h2(b)
            c_lo, c_hi = _unpack_h2(c)
            lo = a_lo.to(tl.float32) * b_lo.to(tl.float32) + c_lo.to(tl.float32)
            hi = a_hi.to(tl.float32) * b_hi.to(tl.float32) + c_hi.to(tl.float32)
            out = _pack_h2(lo.to(tl.float16), hi.to(tl.float16))
        return out

    @triton.jit
    def _neg_zeros_h2(zw, ASM: tl.constexpr):
        """Zero words -> the `nz*` operands of `_dequant_h2`: -(1024 + z) for even pairs and -(64 + z) for odd
        pairs (whose codes read as 16 code), i.e. the zero nibbles OR-ed under 0xE400 (-1024.0), the odd pairs'
        then scaled by 1/16 (exact)."""
        if ASM:
            nz0, nz1, nz2, nz3 = tl.inline_asm_elementwise(
                _NEG_ZEROS_ASM, "=r,=r,=r,=r,r", [zw], dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
                is_pure=True, pack=1)
        else:
            nz0 = (zw & 0x000F000F) | _NEG_MAGIC
            nz1 = _scale_h2((zw & 0x00F000F0) | _NEG_MAGIC, 0.0625)
            nz2 = ((zw >> 8) & 0x000F000F) | _NEG_MAGIC
            nz3 = _scale_h2(((zw >> 8) & 0x00F000F0) | _NEG_MAGIC, 0.0625)
        return nz0, nz1, nz2, nz3

    @triton.jit
    def _scale_h2(v, factor):
        """Both fp16 lanes of v times factor (plain Triton; exact for the powers of two used here)."""
        lo, hi = _unpack_h2(v)
        return _pack_h2((lo.to(tl.float32) * factor).to(tl.float16), (hi.to(tl.float32) * factor).to(tl.float16))

    @triton.jit
    def _group_meta(qz_ptr, s_ptr, group, stride_q, offs_p, mask_p):
        """A group's zero words [1, 1, BLOCK_P] and scales as four [1, 1, BLOCK_P] tensors of fp16 pairs (columns
        8p + 2j, 8p + 2j + 1 for j = 0..3)."""
        zw = tl.load(qz_ptr + group * stride_q + offs_p, mask=mask_p, other=0)[None, None, :]
        s_row = s_ptr.to(tl.pointer_type(tl.int32)) + group * (4 * stride_q) + 4 * offs_p
        s0 = tl.load(s_row, mask=mask_p, other=0)[None, None, :]
        s1 = tl.load(s_row + 1, mask=mask_p, other=0)[None, None, :]
        s2 = tl.load(s_row + 2, mask=mask_p, other=0)[None, None, :]
        s3 = tl.load(s_row + 3, mask=mask_p, other=0)[None, None, :]
        return zw, s0, s1, s2, s3

    @triton.jit
    def _load_x2(ptrs, mask):
        """Activations at `ptrs` as fp16 duplicated into both lanes of an int32 (the x operand of `_fma_h2`);
        bf16 inputs are clamped to fp16's range first."""
        x = tl.load(ptrs, mask=mask, other=0.0)
        if x.dtype != tl.float16:
            x = tl.clamp(x.to(tl.float32), -65504.0, 65504.0)
        x = x.to(tl.float16)
        return _pack_h2(x, x)

    @triton.jit
    def _sum_h2(acc_lo, acc_hi, h):
        """Add the K sums (axis 1) of the two fp16 lanes of partial sums h [BLOCK_M, BLOCK_K, BLOCK_P] into fp32
        accumulators [BLOCK_M, BLOCK_P]."""
        lo, hi = _unpack_h2(h)
        return acc_lo + tl.sum(lo.to(tl.float32), axis=1), acc_hi + tl.sum(hi.to(tl.float32), axis=1)

    @triton.jit
    def _columns8(c0, c1, c2, c3, c4, c5, c6, c7):
        """[R, P] tensors c0..c7 -> [R, 8P] with column 8p + i taken from c_i. A join adds a last axis whose index
        varies fastest after the reshape, so each level pairs the halves that differ in the lowest column bit."""
        even = tl.join(tl.join(c0, c4), tl.join(c2, c6))
        odd = tl.join(tl.join(c1, c5), tl.join(c3, c7))
        both = tl.join(even, odd)
        return tl.reshape(both, (both.shape[0], 8 * both.shape[1]))

    @triton.jit(do_not_specialize=["M", "SPLIT_K"])
    def _awq_gemv_kernel(x_ptr, qw_ptr, qz_ptr, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, K_PER_SPLIT,
                         SPLIT_K, stride_xm, stride_om, stride_q, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, FLUSH: tl.constexpr,
                         NUM_STAGES: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr):
        """Decode kernel on packed fp16 pairs. A program owns BLOCK_P AWQ words per row (8 * BLOCK_P outputs) and
        one K split of whole quantization groups. Each word becomes 4 dequantized f16x2 weight pairs
        (`_dequant_h2`) and one packed FMA per pair and row adds w * x into fp16 partial sums (the sm_90 K loop:
        174 instructions per 64 weights and thread, loads and addressing included). Every FLUSH groups the
        partial sums are reduced over K into fp32 accumulators (fp16 partials of at most FLUSH * GROUP_SIZE /
        BLOCK_K products each). bf16 activations are computed in fp16 like the checkpoint's scales (clamped
        to its range). Split-K partials are combined in-kernel by the last split of each column tile
        (`store_tile`)."""
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < stride_q
        offs_m = tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        k_begin = tl.program_id(1) * K_PER_SPLIT
        k_stop = tl.minimum(k_begin + K_PER_SPLIT, K)
        # stride_q = N / 8 is a launch argument so that Triton sees its divisibility and vectorizes the word loads;
        # words past it re-read word p % stride_q (unmasked loads), whose columns are never stored
        q_base = qw_ptr + offs_k[None, :, None] * stride_q + (offs_p % stride_q)[None, None, :]
        x_base = x_ptr + offs_m[:, None, None] * stride_xm + offs_k[None, :, None]
        mask_x = offs_m[:, None, None] < M
        acc0 = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        acc4 = acc0
        acc5 = acc0
        acc6 = acc0
        acc7 = acc0
        # The next K step's activations and the next group's zeros and scales are loaded one step ahead (plain
        # loads of 2-byte elements are not software-pipelined, and a wait for them every step stalls the stream).
        zw, s0, s1, s2, s3 = _group_meta(qz_ptr, s_ptr, k_begin // GROUP_SIZE, stride_q, offs_p, mask_p)
        wait_for_inputs(PDL)
        x2 = _load_x2(x_base + k_begin, mask_x)
        for f0 in range(k_begin, k_stop, FLUSH * GROUP_SIZE):
            h0 = tl.zeros([BLOCK_M, BLOCK_K, BLOCK_P], dtype=tl.int32)  # +0.0 in both fp16 lanes
            h1 = h0
            h2 = h0
            h3 = h0
            for g0 in range(f0, tl.minimum(f0 + FLUSH * GROUP_SIZE, k_stop), GROUP_SIZE):
                nz0, nz1, nz2, nz3 = _neg_zeros_h2(zw, ASM)
                c0 = s0
                c1 = s1
                c2 = s2
                c3 = s3
                next_group = tl.minimum(g0 // GROUP_SIZE + 1, (k_stop - 1) // GROUP_SIZE)  # the last reloads itself
                zw, s0, s1, s2, s3 = _group_meta(qz_ptr, s_ptr, next_group, stride_q, offs_p, mask_p)
                for k0 in tl.range(g0, g0 + GROUP_SIZE, BLOCK_K, num_stages=NUM_STAGES):
                    q = tl.load(q_base + k0 * stride_q, eviction_policy="evict_first")
                    k_next = k0 + BLOCK_K
                    x2_next = _load_x2(x_base + k_next, mask_x & (k_next + offs_k[None, :, None] < k_stop))
                    w0, w1, w2, w3 = _dequant_h2(q, c0, c1, c2, c3, nz0, nz1, nz2, nz3, ASM)
                    h0 = _fma_h2(w0, x2, h0, ASM)
                    h1 = _fma_h2(w1, x2, h1, ASM)
                    h2 = _fma_h2(w2, x2, h2, ASM)
                    h3 = _fma_h2(w3, x2, h3, ASM)
                    x2 = x2_next
            acc0, acc1 = _sum_h2(acc0, acc1, h0)
            acc2, acc3 = _sum_h2(acc2, acc3, h1)
            acc4, acc5 = _sum_h2(acc4, acc5, h2)
            acc6, acc7 = _sum_h2(acc6, acc7, h3)
        release_dependents(PDL)
        acc = _columns8(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7)
        cols = tl.reshape(8 * offs_p[:, None] + tl.arange(0, 8)[None, :], (8 * BLOCK_P,))
        store_tile(acc, offs_m, cols, M, N, SPLIT_K, s_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, stride_om, False,
                   HAS_BIAS)

    @triton.jit
    def _awq_dequant_kernel(qw_ptr, qz_ptr, s_ptr, w_ptr, N, K, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        pid_k = tl.program_id(0)
        pid_n = tl.program_id(1)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_k = k < K
        w = _dequant_tile(qw_ptr, qz_ptr, s_ptr, k, mask_k, (pid_k * BLOCK_K) // GROUP_SIZE, pid_n, N, BLOCK_N)
        tl.store(w_ptr + k.to(tl.int64)[:, None] * N + offs_n[None, :], w.to(w_ptr.dtype.element_ty),
                 mask=mask_k[:, None] & mask_n[None, :])


def _check(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
           group_size: int) -> tuple[int, int, int]:
    m, k = x.shape
    n = qweight.shape[1] * AWQ_PACK
    if qweight.shape[0] != k or k % group_size or scales.shape != (k // group_size, n) \
            or qzeros.shape != (k // group_size, n // AWQ_PACK):
        raise ValueError(f"AWQ shapes do not agree: x {tuple(x.shape)}, qweight {tuple(qweight.shape)}, "
                         f"qzeros {tuple(qzeros.shape)}, scales {tuple(scales.shape)}, group {group_size}")
    if x.stride(1) != 1 or not (qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("AWQ kernels need x contiguous along K and contiguous packed tensors")
    return m, n, k


def _block_k(group_size: int, want: int) -> int:
    """Largest power of two <= want that divides the group size (one zeros/scales row per K tile)."""
    block = want
    while group_size % block:
        block //= 2
    return block


def _launch_split(kernel: triton.JITFunction, tiles: int, x: torch.Tensor, qweight: torch.Tensor,
                  qzeros: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                  block_k: int, split_k: int | None, **meta: int) -> torch.Tensor:
    """Shared launch for the GEMM/GEMV kernels: grid (tiles, split_k); split partials reduced deterministically."""
    m, k = x.shape
    n = qweight.shape[1] * AWQ_PACK
    split = split_k or choose_split_k(tiles, k, block_k, x.device)
    k_per_split = cdiv(cdiv(k, split), block_k) * block_k
    split = cdiv(k, k_per_split)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    kernel[(tiles, split)](
        x, qweight, qzeros, scales, bias if bias is not None else scales, target, m, n, k, k_per_split,
        x.stride(0), n, m * n, GROUP_SIZE=group_size, HAS_BIAS=bias is not None and split == 1, SPLIT_K=split,
        BLOCK_K=block_k, **meta)
    if split > 1:
        reduce_split_k(target, bias, out)
    return out


def awq_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None, split_k: int | None = None,
                    config: dict[str, int] | None = None) -> torch.Tensor:
    """Dequantizing tiled GEMM (tensor cores via tl.dot) for x [M, K] fp16/bf16."""
    m, n, k = _check(x, qweight, qzeros, scales, group_size)
    if m == 0:
        return torch.empty((0, n), dtype=x.dtype, device=x.device)
    if m <= 16:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    elif m <= 64:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    cfg.update(config or {})
    block_k = _block_k(group_size, cfg.pop("BLOCK_K"))
    tiles_m = cdiv(m, cfg["BLOCK_M"])
    if tiles_m > 1 and split_k is None:
        split_k = 1  # several row tiles already fill the GPU; split-K is for single-tile (small-M) launches
    # fp32 activations get exact IEEE dots; the interpreter multiplies bf16 dot operands as raw bit patterns,
    # so there bf16 tiles (already rounded to bf16) are widened to fp32, which keeps the GPU's numerics.
    dot_f32 = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and TRITON_INTERPRETED)
    return _launch_split(_awq_gemm_kernel, tiles_m * cdiv(n, cfg["BLOCK_N"]), x, qweight, qzeros, scales,
                         bias, group_size, block_k, split_k, DOT_F32=dot_f32, **cfg)


def awq_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int, bias: torch.Tensor | None = None, split_k: int | None = None,
                    config: dict[str, int] | None = None) -> torch.Tensor:
    """Decode GEMV for M <= 8 and fp16 / bf16 x: column tiles x K splits (whole groups per split) to fill the
    GPU, one launch. config (benchmarks) replaces the per-shape entry of `AWQ_GEMV_SHAPE_CONFIGS` over M's
    default in `AWQ_GEMV_CONFIGS`; split_k (or the entry's) overrides the launch heuristic."""
    m, n, k = _check(x, qweight, qzeros, scales, group_size)
    if m > _GEMV_LIMIT:
        raise ValueError(f"AWQ GEMV handles at most {_GEMV_LIMIT} rows, got {m}")
    if x.dtype not in _GEMV_DTYPES:
        raise ValueError(f"the AWQ GEMV computes in packed fp16 / bf16 pairs; got {x.dtype} activations")
    if group_size & (group_size - 1):
        raise ValueError(f"the AWQ GEMV needs a power-of-two group size, got {group_size}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bucket = next_power_of_2(m)
    cfg = dict(AWQ_GEMV_CONFIGS[bucket], **(AWQ_GEMV_SHAPE_CONFIGS.get((n, k, bucket), {}) if config is None
                                            else config))
    split_k = split_k or cfg.pop("split_k", None)
    if group_size % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} must divide the group size {group_size}")
    tiles = cdiv(n // AWQ_PACK, cfg["BLOCK_P"])
    groups = k // group_size
    split = split_k or min(groups, max(1, cdiv(4 * num_sms(x.device), tiles)))
    k_per_split = cdiv(groups, split) * group_size
    split = cdiv(k, k_per_split)
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    counters = split_counters(x.device, tiles) if split > 1 else out
    pdl = use_pdl(x)
    _awq_gemv_kernel[(tiles, split)](x, qweight, qzeros, scales, bias if bias is not None else out, out, ws,
                                     counters, m, n, k, k_per_split, split, x.stride(0), out.stride(0),
                                     n // AWQ_PACK, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
                                     BLOCK_M=bucket, ASM=not TRITON_INTERPRETED, PDL=pdl, launch_pdl=pdl, **cfg)
    return out


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Full W [K, N] in dtype (see `awq_dequantize_ref`); Triton when available."""
    if not can_use_triton(qweight):
        return awq_dequantize_ref(qweight, qzeros, scales, group_size, dtype)
    k = qweight.shape[0]
    n = qweight.shape[1] * AWQ_PACK
    w = torch.empty((k, n), dtype=dtype, device=qweight.device)
    block_k = _block_k(group_size, 32)
    _awq_dequant_kernel[(cdiv(k, block_k), cdiv(n, 128))](
        qweight, qzeros, scales, w, n, k, GROUP_SIZE=group_size, BLOCK_K=block_k, BLOCK_N=128, num_warps=4)
    return w


def select_awq_backend(x: torch.Tensor) -> str:
    """Backend `awq_gemm` uses for x [M, K], from `AWQ_DISPATCH` (see AWQ_BACKENDS)."""
    if not can_use_triton(x):
        return "torch"
    m = x.shape[0]
    if m <= min(AWQ_DISPATCH["gemv_max_m"], _GEMV_LIMIT) and x.dtype in _GEMV_DTYPES:
        return "gemv"
    if m >= AWQ_DISPATCH["dequant_mm_min_m"]:
        return "dequant_mm"
    return "gemm"


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bias: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """x [..., K] @ W [K, N] (+ bias) in x's dtype, with the backend picked per M unless given."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    backend = backend or select_awq_backend(x2)
    if backend == "gemv":
        out = awq_gemv_triton(x2, qweight, qzeros, scales, group_size, bias)
    elif backend == "gemm":
        out = awq_gemm_triton(x2, qweight, qzeros, scales, group_size, bias)
    elif backend == "dequant_mm":
        w = awq_dequantize(qweight, qzeros, scales, group_size, x.dtype)
        out = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
    elif backend == "torch":
        out = awq_gemm_ref(x2, qweight, qzeros, scales, group_size, bias)
    else:
        raise ValueError(f"unknown AWQ backend {backend!r}; expected one of {AWQ_BACKENDS}")
    return out.view(*lead, out.shape[-1])
