"""RMSNorm kernels: plain, fused with the residual add, and fused with add + per-token FP8 quantization.

One program owns one row held whole in registers: the residual sum, its variance, the normalized output and
(for FP8) the row's amax all come from a single read, so `add + norm (+ quant)` costs one pass over memory
instead of three to five separate torch ops. Semantics (the `*_ref` twins): s = x + residual in fp32; the new
residual is s cast to residual's dtype; y = s * rsqrt(mean(s^2) + eps) * weight in fp32, cast at the end (or
quantized per token from fp32 for the FP8 variant).
"""
from __future__ import annotations

import torch

from swiftlm.kernels.quant import (FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, FP8_PRE_ROUND, HAS_TRITON, can_use_triton,
                                   next_power_of_2, per_token_quant_fp8_ref)
from swiftlm.kernels.triton_support import use_pdl

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.quant import to_fp8
    from swiftlm.kernels.triton_support import release_dependents, wait_for_inputs

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, r_out_ptr, s_ptr, N, stride_x, stride_r, stride_y, stride_ro,
                         eps, HAS_RESIDUAL: tl.constexpr, QUANT_FP8: tl.constexpr, FP8_MAX: tl.constexpr,
                         MIN_SCALE: tl.constexpr, PRE_ROUND: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        wait_for_inputs(PDL)
        release_dependents(PDL)
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(r_out_ptr + row * stride_ro + offs, x.to(r_out_ptr.dtype.element_ty), mask=mask)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        y = x * rstd * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if QUANT_FP8:
            scale = tl.maximum(tl.max(tl.abs(y), axis=0) / FP8_MAX, MIN_SCALE)
            q = tl.minimum(tl.maximum(y / scale, -FP8_MAX), FP8_MAX)
            tl.store(y_ptr + row * stride_y + offs, to_fp8(q, y_ptr.dtype.element_ty, PRE_ROUND), mask=mask)
            tl.store(s_ptr + row, scale)
        else:
            tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """2-D view [rows, hidden] with a unit last stride (copying only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, y: torch.Tensor,
            r_out: torch.Tensor | None, scale: torch.Tensor | None) -> None:
    rows, n = x.shape
    if rows == 0:
        return
    block = next_power_of_2(n)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    pdl = use_pdl(x)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, y, r_out if r_out is not None else x,
        scale if scale is not None else weight, n, x.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0), r_out.stride(0) if r_out is not None else 0,
        eps, HAS_RESIDUAL=residual is not None, QUANT_FP8=scale is not None, FP8_MAX=FP8_MAX,
        MIN_SCALE=FP8_MIN_SCALE, PRE_ROUND=FP8_PRE_ROUND, BLOCK=block, num_warps=warps,
        PDL=pdl, launch_pdl=pdl)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Unfused torch RMSNorm: the CPU path and the kernel's oracle."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., H] (weight [H]); returns a new tensor of x's dtype."""
    if not can_use_triton(x):
        return rms_norm_ref(x, weight, eps)
    x2 = _rows(x)
    y = torch.empty_like(x2)
    _launch(x2, None, weight, eps, y, None, None)
    return y.view(x.shape)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused torch add + RMSNorm: the CPU path and the kernel's oracle."""
    s = x.float() + residual.float()
    y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    return y.to(x.dtype), s.to(residual.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                       inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass.

    With `inplace=True` (x and residual contiguous) the normalized rows overwrite x and the new residual
    overwrites residual, so a decoder layer allocates nothing; each row is fully read before it is written.
    """
    if not can_use_triton(x):
        y, r = fused_add_rms_norm_ref(x, residual, weight, eps)
        if inplace:
            x.copy_(y)
            residual.copy_(r)
            return x, residual
        return y, r
    if inplace:
        if not (x.is_contiguous() and residual.is_contiguous()):
            raise ValueError("in-place fused_add_rms_norm needs contiguous x and residual")
        x2, r2 = x.view(-1, x.shape[-1]), residual.view(-1, residual.shape[-1])
        _launch(x2, r2, weight, eps, x2, r2, None)
        return x, residual
    x2, r2 = _rows(x), _rows(residual)
    y = torch.empty_like(x2)
    r_out = torch.empty_like(r2)
    _launch(x2, r2, weight, eps, y, r_out, None)
    return y.view(x.shape), r_out.view(residual.shape)


def fused_add_rms_norm_fp8_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unfused torch add + RMSNorm + per-token FP8 quantization (from the fp32 normalized row)."""
    s = x.float() + residual.float() if residual is not None else x.float()
    y = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.float()
    q, scale = per_token_quant_fp8_ref(y)
    return q, scale, s.to(residual.dtype) if residual is not None else None


def fused_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(e4m3 [..., H], fp32 scales [..., 1], new residual) = per-token FP8 quant of rms_norm(x + residual).

    Feeds an FP8 linear directly (`fp8_linear(q, ..., x_scale=scale)`). residual=None normalizes x alone and
    returns None as the residual; `inplace=True` writes the new residual into `residual`.
    """
    if not can_use_triton(x):
        q, scale, r = fused_add_rms_norm_fp8_ref(x, residual, weight, eps)
        if inplace and residual is not None:
            residual.copy_(r)
            r = residual
        return q, scale, r
    x2 = _rows(x)
    rows = x2.shape[0]
    q = torch.empty(x2.shape, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    r2 = r_out = None
    if residual is not None:
        if inplace and not residual.is_contiguous():
            raise ValueError("in-place fused_add_rms_norm_fp8 needs a contiguous residual")
        r2 = residual.view(-1, residual.shape[-1]) if inplace else _rows(residual)
        r_out = r2 if inplace else torch.empty_like(r2)
    _launch(x2, r2, weight, eps, q, r_out, scale)
    new_residual = None
    if residual is not None:
        new_residual = residual if inplace else r_out.view(residual.shape)
    return q.view(x.shape), scale.view(*x.shape[:-1], 1), new_residual
