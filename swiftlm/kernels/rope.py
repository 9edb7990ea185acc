"""RoPE fused with Qwen3's per-head Q/K RMSNorm and the paged KV-cache write.

After the QKV projection an attention layer would otherwise run q_norm, k_norm, two rotary passes and two
scatter copies into the cache: six kernels, each re-reading q/k. Here one program loads BLOCK_H heads of one
token once, normalizes them (optional), rotates them neox-style (rotate-half, as Qwen uses), writes q/k back
and stores the token's K and V rows into the cache slot `slot_mapping[t]` (-1 = padding, skipped).

cos/sin cache: [max_pos, rot_dim] fp32, row p = cat(cos(p * inv_freq), sin(p * inv_freq)) (see
`compute_cos_sin_cache`); rot_dim must equal head_dim (all Qwen2/Qwen3 models rotate the full head).
KV cache: `k_cache`, `v_cache` [num_blocks, block_size, num_kv_heads, head_dim] (docs/DESIGN.md), slot s at
`cache.view(-1, num_kv_heads, head_dim)[s]`; an e4m3 cache stores e4m3(clamp(x / scale)) (`quantize_kv_fp8`).
"""
from __future__ import annotations

import torch

from swiftlm.kernels.quant import (FP8_DTYPE, FP8_MAX, FP8_PRE_ROUND, HAS_TRITON, can_use_triton, cdiv,
                                   next_power_of_2, quantize_kv_fp8)
from swiftlm.kernels.triton_support import use_pdl

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.quant import to_fp8
    from swiftlm.kernels.triton_support import release_dependents, wait_for_inputs


def compute_cos_sin_cache(rot_dim: int, max_position: int, base: float,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """Plain (unscaled) RoPE table [max_position, rot_dim] in fp32: cos half then sin half."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64, device=device) / rot_dim))
    freqs = torch.arange(max_position, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def _rope_norm_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, weight: torch.Tensor | None,
                   eps: float) -> torch.Tensor:
    xf = x.float()
    if weight is not None:
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    half = xf.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_qk_norm_cache_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor, k_cache: torch.Tensor | None = None,
                           v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                           q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                           eps: float = 1e-6, k_scale: float = 1.0,
                           v_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused torch sequence: (optional) per-head RMSNorm, rotate-half RoPE in fp32, scatter K/V into the cache.

    Returns new (q, k) tensors [T, H, D] in the input dtypes; the caches are written in place.
    """
    cs = cos_sin_cache[positions.long()].float()
    half = cs.shape[-1] // 2
    cos, sin = cs[:, None, :half], cs[:, None, half:]
    q_out = _rope_norm_ref(q, cos, sin, q_norm_weight, eps)
    k_out = _rope_norm_ref(k, cos, sin, k_norm_weight, eps)
    if k_cache is not None and v_cache is not None and slot_mapping is not None:
        valid = slot_mapping >= 0
        slots = slot_mapping[valid].long()
        heads, dim = k_cache.shape[-2], k_cache.shape[-1]
        for cache, rows, scale in ((k_cache, k_out, k_scale), (v_cache, v.float(), v_scale)):
            flat = cache.view(-1, heads, dim)
            rows = rows[valid]
            flat[slots] = quantize_kv_fp8(rows, scale) if cache.dtype == FP8_DTYPE else rows.to(cache.dtype)
    return q_out.to(q.dtype), k_out.to(k.dtype)


if HAS_TRITON:

    @triton.jit
    def store_kv(ptr, x, scale, mask, FP8_CACHE: tl.constexpr, FP8_MAX: tl.constexpr, PRE_ROUND: tl.constexpr):
        """Store fp32 rows into the cache: cast, or e4m3(clamp(x / scale)) for an FP8 cache."""
        if FP8_CACHE:
            x = to_fp8(tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX), ptr.dtype.element_ty, PRE_ROUND)
        tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def norm_rope(x1, x2, w_ptr, offs, w_mask, cos, sin, eps, HEAD_DIM: tl.constexpr, HAS_NORM: tl.constexpr):
        """Heads of one token as fp32 halves `[R, HEAD_DIM / 2]` (`offs` the half's columns, `w_mask` the real
        ones): optional RMSNorm with the weight at `w_ptr`, then rotate-half RoPE with `cos`/`sin` `[1, half]`."""
        if HAS_NORM:
            rstd = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
            x1 = x1 * rstd * tl.load(w_ptr + offs, mask=w_mask, other=0.0).to(tl.float32)[None, :]
            x2 = x2 * rstd * tl.load(w_ptr + HEAD_DIM // 2 + offs, mask=w_mask, other=0.0).to(tl.float32)[None, :]
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @triton.jit
    def _rope_qk_norm_cache_kernel(
            q_ptr, k_ptr, v_ptr, qo_ptr, ko_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, kc_ptr, vc_ptr, slot_ptr,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_qot, stride_qoh, stride_kot,
            stride_koh, stride_cs, stride_cslot, stride_ch, num_q_heads, num_kv_heads, q_blocks, eps, k_scale, v_scale,
            HEAD_DIM: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
            HAS_NORM: tl.constexpr, WRITE_CACHE: tl.constexpr, FP8_CACHE: tl.constexpr, FP8_MAX: tl.constexpr,
            PRE_ROUND: tl.constexpr, PDL: tl.constexpr):
        """Program (t, b): b < q_blocks handles query heads [b*BLOCK_H, ...), otherwise a block of KV heads."""
        t = tl.program_id(0).to(tl.int64)
        b = tl.program_id(1)
        offs_d = tl.arange(0, HALF_PAD)
        mask_d = offs_d < HALF
        wait_for_inputs(PDL)
        release_dependents(PDL)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cs_ptr + pos * stride_cs + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        sin = tl.load(cs_ptr + pos * stride_cs + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        is_q = b < q_blocks
        if is_q:
            h = b * BLOCK_H + tl.arange(0, BLOCK_H)
            mask_h = h < num_q_heads
            src = q_ptr + t * stride_qt + h[:, None] * stride_qh
            dst = qo_ptr + t * stride_qot + h[:, None] * stride_qoh
            w_ptr = qw_ptr
        else:
            h = (b - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            mask_h = h < num_kv_heads
            src = k_ptr + t * stride_kt + h[:, None] * stride_kh
            dst = ko_ptr + t * stride_kot + h[:, None] * stride_koh
            w_ptr = kw_ptr
        mask = mask_h[:, None] & mask_d[None, :]
        x1 = tl.load(src + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        o1, o2 = norm_rope(x1, x2, w_ptr, offs_d, mask_d, cos, sin, eps, HEAD_DIM, HAS_NORM)
        tl.store(dst + offs_d[None, :], o1.to(dst.dtype.element_ty), mask=mask)
        tl.store(dst + HALF + offs_d[None, :], o2.to(dst.dtype.element_ty), mask=mask)
        if WRITE_CACHE:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if (b >= q_blocks) & (slot >= 0):
                kc = kc_ptr + slot * stride_cslot + h[:, None] * stride_ch + offs_d[None, :]
                vc = vc_ptr + slot * stride_cslot + h[:, None] * stride_ch + offs_d[None, :]
                v_src = v_ptr + t * stride_vt + h[:, None] * stride_vh + offs_d[None, :]
                v1 = tl.load(v_src, mask=mask, other=0.0).to(tl.float32)
                v2 = tl.load(v_src + HALF, mask=mask, other=0.0).to(tl.float32)
                store_kv(kc, o1, k_scale, mask, FP8_CACHE, FP8_MAX, PRE_ROUND)
                store_kv(kc + HALF, o2, k_scale, mask, FP8_CACHE, FP8_MAX, PRE_ROUND)
                store_kv(vc, v1, v_scale, mask, FP8_CACHE, FP8_MAX, PRE_ROUND)
                store_kv(vc + HALF, v2, v_scale, mask, FP8_CACHE, FP8_MAX, PRE_ROUND)


def rope_qk_norm_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, k_cache: torch.Tensor | None = None,
                       v_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                       q_norm_weight: torch.Tensor | None = None, k_norm_weight: torch.Tensor | None = None,
                       eps: float = 1e-6, k_scale: float = 1.0, v_scale: float = 1.0,
                       inplace: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused (q_norm/k_norm ->) RoPE -> KV-cache write; semantics of `rope_qk_norm_cache_ref`.

    q [T, Hq, D], k/v [T, Hkv, D] may be strided views of the QKV output (unit stride along D). Returns the
    rotated (q, k): written over the inputs when `inplace` (no allocation), else into new contiguous tensors.
    Pass both norm weights (Qwen3) or neither (Qwen2); pass caches and slot_mapping to store K/V.
    """
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q_norm_weight and k_norm_weight, or neither")
    t, hq, d = q.shape
    hkv = k.shape[1]
    if cos_sin_cache.shape[-1] != d or d % 2:
        raise ValueError(f"rotary dim {cos_sin_cache.shape[-1]} must equal the (even) head dim {d}")
    write_cache = k_cache is not None and v_cache is not None and slot_mapping is not None
    if not can_use_triton(q):
        q_out, k_out = rope_qk_norm_cache_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
                                              q_norm_weight, k_norm_weight, eps, k_scale, v_scale)
        if inplace:
            q.copy_(q_out)
            k.copy_(k_out)
            return q, k
        return q_out, k_out
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v must have unit stride along head_dim")
    q_out = q if inplace else torch.empty((t, hq, d), dtype=q.dtype, device=q.device)
    k_out = k if inplace else torch.empty((t, hkv, d), dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    if write_cache:
        if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
            raise ValueError("k_cache and v_cache must share shape, strides and dtype")
        kc, vc = k_cache.view(-1, hkv, d), v_cache.view(-1, hkv, d)
        stride_slot, stride_ch = kc.stride(0), kc.stride(1)
    else:
        kc = vc = q
        stride_slot = stride_ch = 0
    half = d // 2
    # Few tokens (decode): small head blocks for more CTAs; many tokens: up to 2K elements a program.
    block_h = min(next_power_of_2(max(hq, hkv)), max(1, (2048 if t > 64 else 256) // d))
    q_blocks = cdiv(hq, block_h)
    grid = (t, q_blocks + cdiv(hkv, block_h))
    pdl = use_pdl(q)
    _rope_qk_norm_cache_kernel[grid](
        q, k, v, q_out, k_out, positions, cos_sin_cache,
        q_norm_weight if q_norm_weight is not None else cos_sin_cache,
        k_norm_weight if k_norm_weight is not None else cos_sin_cache,
        kc, vc, slot_mapping if write_cache else positions,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), q_out.stride(0),
        q_out.stride(1), k_out.stride(0), k_out.stride(1), cos_sin_cache.stride(0), stride_slot, stride_ch,
        hq, hkv, q_blocks, eps, k_scale, v_scale, HEAD_DIM=d, HALF=half, HALF_PAD=next_power_of_2(half),
        BLOCK_H=block_h, HAS_NORM=q_norm_weight is not None, WRITE_CACHE=write_cache,
        FP8_CACHE=write_cache and k_cache.dtype == FP8_DTYPE, FP8_MAX=FP8_MAX, PRE_ROUND=FP8_PRE_ROUND,
        num_warps=4 if block_h * d >= 1024 else 2, PDL=pdl, launch_pdl=pdl)
    return q_out, k_out
