"""Fused RMSNorm (+ residual, + FP8 quant), RoPE + QK-norm + KV-cache write, and SiLU-and-mul kernels.

Each Triton kernel is checked against its `*_ref`, and each reference against an independent formula. Without
CUDA the kernels run under TRITON_INTERPRET=1 (set before triton is imported), whose fp32 -> bf16 cast
truncates instead of rounding, so bf16 comparisons allow a couple of bf16 ulps.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from swiftlm.kernels import activation, fused_norm, quant, rope  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (quant.HAS_TRITON and (CUDA or quant.TRITON_INTERPRETED)),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
FP8 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def _fp8_close(q: torch.Tensor, scale: torch.Tensor, q_ref: torch.Tensor, scale_ref: torch.Tensor) -> None:
    """Per-token FP8 outputs agree: scales to fp32 accuracy, codes exactly or (where fp32 math differs by an
    ulp, e.g. the GPU's approximate rsqrt/division) one e4m3 step on a small fraction of elements."""
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    mismatched = (q.float() != q_ref.float()).float().mean().item()
    assert mismatched <= (0.0 if quant.TRITON_INTERPRETED else 0.01)
    torch.testing.assert_close(q.float(), q_ref.float(), rtol=0.13, atol=2.0 ** -9)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm family
# ---------------------------------------------------------------------------------------------------------

def test_rms_norm_ref_is_the_textbook_formula() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(3, 40, dtype=torch.float64), torch.randn(40, dtype=torch.float64)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(fused_norm.rms_norm_ref(x.float(), w.float(), 1e-6).double(), expected,
                               rtol=1e-6, atol=1e-6)
    y, r = fused_norm.fused_add_rms_norm_ref(x.float(), 2 * x.float(), w.float(), 1e-6)
    torch.testing.assert_close(r.double(), 3 * x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y.double(), (3 * x) / torch.sqrt((9 * x * x).mean(-1, keepdim=True) + 1e-6) * w,
                               rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [96, 200])  # power-of-two-free widths exercise the row mask
def test_rms_norm_kernel(dtype: torch.dtype, hidden: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, hidden, device=DEVICE).to(dtype)
    w = torch.randn(hidden, device=DEVICE).to(dtype)
    out = fused_norm.rms_norm(x, w, 1e-6)
    assert out.shape == x.shape and out.dtype == dtype
    _close(out, fused_norm.rms_norm_ref(x, w, 1e-6), dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_kernel(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, r = (torch.randn(7, 160, device=DEVICE).to(dtype) for _ in range(2))
    w = torch.randn(160, device=DEVICE).to(dtype)
    y_ref, r_ref = fused_norm.fused_add_rms_norm_ref(x, r, w, 1e-6)
    x0, r0 = x.clone(), r.clone()
    y, r_new = fused_norm.fused_add_rms_norm(x, r, w, 1e-6)
    _close(y, y_ref, dtype)
    _close(r_new, r_ref, dtype)
    assert torch.equal(x, x0) and torch.equal(r, r0)  # out of place leaves the inputs alone
    y_in, r_in = fused_norm.fused_add_rms_norm(x, r, w, 1e-6, inplace=True)
    assert y_in.data_ptr() == x.data_ptr() and r_in.data_ptr() == r.data_ptr()
    _close(x, y_ref, dtype)
    _close(r, r_ref, dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_add_rms_norm_fp8_kernel(dtype: torch.dtype, with_residual: bool) -> None:
    torch.manual_seed(0)
    x = (torch.randn(6, 192, device=DEVICE) * 4).to(dtype)
    r = torch.randn(6, 192, device=DEVICE).to(dtype) if with_residual else None
    w = torch.randn(192, device=DEVICE).to(dtype)
    normed = fused_norm.rms_norm_ref(x.float() + r.float() if with_residual else x.float(), w.float(), 1e-6)
    q_ref, s_ref, r_ref = fused_norm.fused_add_rms_norm_fp8_ref(x, r, w, 1e-6)
    q, s, r_new = fused_norm.fused_add_rms_norm_fp8(x, r, w, 1e-6)
    assert q.dtype == FP8 and s.shape == (6, 1)
    _fp8_close(q, s, q_ref, s_ref)
    if with_residual:
        _close(r_new, r_ref, dtype)
        _, _, r_in = fused_norm.fused_add_rms_norm_fp8(x, r, w, 1e-6, inplace=True)
        assert r_in is r
        _close(r, r_ref, dtype)
    else:
        assert r_new is None
    # The quantized output dequantizes to the normalized row within e4m3's half-step (2^-4 relative).
    assert torch.all((q.float() * s - normed).abs() <= normed.abs() * 2.0 ** -4 + s * 2.0 ** -9)


@needs_kernels
def test_norm_quant_feeds_fp8_linear_like_the_unfused_sequence() -> None:
    """The fused norm + per-token quant output, fed to fp8_linear, matches the exact fp32 math of norm -> linear as
    closely as the unfused sequence (bf16 norm, then fp8_linear quantizing it) does. Both carry e4m3 activation
    rounding (2^-4 relative per element), so they are compared by relative Frobenius error, not elementwise: one
    element rounding the other way between the two paths is legitimate."""
    torch.manual_seed(0)
    x, r = (torch.randn(4, 128, device=DEVICE).to(torch.bfloat16) for _ in range(2))
    w = torch.ones(128, device=DEVICE).to(torch.bfloat16)
    wq, ws = quant.quantize_weight_fp8_ref(torch.randn(64, 128, device=DEVICE) * 0.05)
    q, s, _ = fused_norm.fused_add_rms_norm_fp8(x, r, w, 1e-6)
    fused = quant.fp8_linear(q, wq, ws, x_scale=s).float()
    normed = fused_norm.fused_add_rms_norm_ref(x, r, w, 1e-6)[0].float()
    unfused = quant.fp8_linear(normed, wq, ws, out_dtype=torch.bfloat16).float()
    exact = normed @ (wq.float() * ws.float()).t()

    def rel(a: torch.Tensor) -> float:
        return ((a - exact).norm() / exact.norm()).item()
    assert rel(fused) < 3e-2 and rel(unfused) < 3e-2
    assert rel(fused) < 2 * rel(unfused) + 1e-3


# ---------------------------------------------------------------------------------------------------------
# RoPE + QK-norm + KV-cache write
# ---------------------------------------------------------------------------------------------------------

def test_cos_sin_cache_and_rope_ref_rotate_pairs_i_and_i_plus_half() -> None:
    d, base = 8, 10000.0
    cache = rope.compute_cos_sin_cache(d, 16, base)
    assert cache.shape == (16, d)
    torch.manual_seed(0)
    q = torch.randn(3, 2, d)
    k = torch.randn(3, 1, d)
    positions = torch.tensor([0, 5, 11])
    q_out, k_out = rope.rope_qk_norm_cache_ref(q, k, k, positions, cache)
    torch.testing.assert_close(q_out[0], q[0])  # position 0 is the identity
    for t, p in enumerate(positions.tolist()):
        for i in range(d // 2):
            theta = p * base ** (-2 * i / d)
            pair = torch.complex(q[t, :, i], q[t, :, i + d // 2]) * complex(math.cos(theta), math.sin(theta))
            torch.testing.assert_close(q_out[t, :, i], pair.real, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(q_out[t, :, i + d // 2], pair.imag, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_out.norm(dim=-1), k.norm(dim=-1))  # rotations keep norms


def _qkv_views(t: int, hq: int, hkv: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v as strided views into one [T, (Hq + 2 Hkv) * D] projection output, as attention gets them."""
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=DEVICE).to(dtype)
    q = qkv[:, :hq * d].view(t, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    return q, k, v


_SMALL = [(dtype, norm, fp8, 5, 4, 2, 64) for dtype in DTYPES for norm in (True, False) for fp8 in (False, True)]
# 70 tokens switch to wide head blocks; head_dim 80 pads the rotary half (40 -> 64 lanes); 3 heads mask a block.
_WIDE = [(torch.bfloat16, True, True, 70, 3, 1, 80), (torch.float32, False, False, 70, 3, 1, 80)]


@needs_kernels
@pytest.mark.parametrize("dtype,qk_norm,cache_fp8,t,hq,hkv,d", _SMALL + _WIDE)
def test_rope_qk_norm_cache_kernel(dtype: torch.dtype, qk_norm: bool, cache_fp8: bool, t: int, hq: int, hkv: int,
                                   d: int) -> None:
    torch.manual_seed(0)
    q, k, v = _qkv_views(t, hq, hkv, d, dtype)
    positions = torch.randint(0, 512, (t,), device=DEVICE)
    cos_sin = rope.compute_cos_sin_cache(d, 512, 1e6, DEVICE)
    num_blocks, block_size = 8, 16
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:t]
    slots[1] = -1  # padding token: nothing written
    cache_dtype = FP8 if cache_fp8 else dtype
    sentinel = torch.full((num_blocks, block_size, hkv, d), 7.0, device=DEVICE).to(cache_dtype)
    k_cache, v_cache, k_cache_ref, v_cache_ref = (sentinel.clone() for _ in range(4))
    norms = [torch.randn(d, device=DEVICE).to(dtype) for _ in range(2)] if qk_norm else [None, None]
    scales = (0.5, 2.0) if cache_fp8 else (1.0, 1.0)
    q_ref, k_ref = rope.rope_qk_norm_cache_ref(q, k, v, positions, cos_sin, k_cache_ref, v_cache_ref, slots,
                                               *norms, 1e-6, *scales)
    q_new, k_new = rope.rope_qk_norm_cache(q, k, v, positions, cos_sin, k_cache, v_cache, slots, *norms, 1e-6,
                                           *scales)
    assert q_new.data_ptr() == q.data_ptr() and k_new.data_ptr() == k.data_ptr()  # in place into the QKV buffer
    _close(q, q_ref, dtype)
    _close(k, k_ref, dtype)
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    for cache, cache_ref in ((k_cache, k_cache_ref), (v_cache, v_cache_ref)):
        flat, flat_ref = cache.view(-1, hkv, d).float(), cache_ref.view(-1, hkv, d).float()
        assert torch.all(flat[~written] == 7.0)  # padding and untouched slots keep the sentinel
        if cache_fp8:
            # Codes agree except where the fp32 rotation differs by an ulp across a rounding boundary.
            torch.testing.assert_close(flat[written], flat_ref[written], rtol=0.13, atol=2.0 ** -9)
            assert (flat[written] != flat_ref[written]).float().mean() < 0.01
        else:
            _close(flat[written], flat_ref[written], dtype)


@needs_kernels
def test_rope_out_of_place_and_without_cache() -> None:
    torch.manual_seed(0)
    q, k, v = _qkv_views(3, 2, 1, 32, torch.float32)
    q0, k0 = q.clone(), k.clone()
    positions = torch.tensor([1, 2, 3], device=DEVICE)
    cos_sin = rope.compute_cos_sin_cache(32, 8, 1e4, DEVICE)
    q_new, k_new = rope.rope_qk_norm_cache(q, k, v, positions, cos_sin, inplace=False)
    assert torch.equal(q, q0) and torch.equal(k, k0) and q_new.is_contiguous()
    q_ref, k_ref = rope.rope_qk_norm_cache_ref(q, k, v, positions, cos_sin)
    _close(q_new, q_ref, torch.float32)
    _close(k_new, k_ref, torch.float32)
    with pytest.raises(ValueError, match="both"):
        rope.rope_qk_norm_cache(q, k, v, positions, cos_sin, q_norm_weight=torch.ones(32, device=DEVICE))


# ---------------------------------------------------------------------------------------------------------
# SiLU-and-mul
# ---------------------------------------------------------------------------------------------------------

def test_silu_and_mul_ref_formula() -> None:
    x = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    expected = torch.tensor([[1.0 / (1 + math.exp(-1.0)) * 3.0, -2.0 / (1 + math.exp(2.0)) * 0.5]])
    torch.testing.assert_close(activation.silu_and_mul_ref(x), expected)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [96, 4500])  # 4500: several column blocks / a two-block quant row
def test_silu_and_mul_kernels(dtype: torch.dtype, inter: int) -> None:
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 2 * inter, device=DEVICE) * 3).to(dtype)
    out = activation.silu_and_mul(x)
    assert out.shape == (2, 3, inter)
    _close(out, activation.silu_and_mul_ref(x), dtype)
    q, s = activation.silu_and_mul_fp8(x)
    q_ref, s_ref = activation.silu_and_mul_fp8_ref(x)
    assert q.shape == (2, 3, inter) and s.shape == (2, 3, 1)
    _fp8_close(q, s, q_ref, s_ref)
    torch.testing.assert_close((q.float() * s), F.silu(x.float()[..., :inter]) * x.float()[..., inter:],
                               rtol=2.0 ** -4, atol=s.max().item() * 2.0 ** -9)
