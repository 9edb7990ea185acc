"""SiLU-and-mul for the gate_up projection: x [T, 2I] = [gate | up] -> silu(gate) * up [T, I].

Fusing the activation avoids materializing silu(gate) and a second pass for the product; the FP8 variant
also quantizes per token so an FP8 down_proj reads 1 byte per element instead of re-reading bf16 twice.
Semantics (`*_ref`): computed in fp32, cast (or quantized per token) at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from swiftlm.kernels.quant import (FP8_DTYPE, FP8_MAX, FP8_MIN_SCALE, FP8_PRE_ROUND, HAS_TRITON, can_use_triton,
                                   cdiv, next_power_of_2, per_token_quant_fp8_ref)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.quant import to_fp8

    @triton.jit
    def _silu_mul(x_row, offs, mask, INTER):
        g = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(x_row + INTER + offs, mask=mask, other=0.0).to(tl.float32)
        return g * tl.sigmoid(g) * u

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, y_ptr, INTER, stride_x, stride_y, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < INTER
        y = _silu_mul(x_ptr + row * stride_x, offs, mask, INTER)
        tl.store(y_ptr + row * stride_y + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, INTER, stride_x, stride_q, FP8_MAX: tl.constexpr,
                                 MIN_SCALE: tl.constexpr, PRE_ROUND: tl.constexpr, BLOCK: tl.constexpr):
        """One program a row: pass 1 finds amax of silu(g) * u, pass 2 recomputes it (L2-hot) and quantizes."""
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        offs = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, INTER, BLOCK):
            amax = tl.maximum(amax, tl.abs(_silu_mul(x_row, i0 + offs, i0 + offs < INTER, INTER)))
        scale = tl.maximum(tl.max(amax, axis=0) / FP8_MAX, MIN_SCALE)
        for i0 in range(0, INTER, BLOCK):
            mask = i0 + offs < INTER
            y = tl.minimum(tl.maximum(_silu_mul(x_row, i0 + offs, mask, INTER) / scale, -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + row * stride_q + i0 + offs, to_fp8(y, q_ptr.dtype.element_ty, PRE_ROUND), mask=mask)
        tl.store(s_ptr + row, scale)


def _split_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dim (gate | up), got {x.shape[-1]}")
    x2 = x.reshape(-1, x.shape[-1])
    return (x2 if x2.stride(-1) == 1 else x2.contiguous()), x.shape[-1] // 2


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Unfused torch SiLU-and-mul: the CPU path and the kernel's oracle."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :I]) * x[..., I:] -> [..., I] in x's dtype."""
    if not can_use_triton(x):
        return silu_and_mul_ref(x)
    x2, inter = _split_rows(x)
    y = torch.empty((x2.shape[0], inter), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(1024, next_power_of_2(inter))
        _silu_and_mul_kernel[(x2.shape[0], cdiv(inter, block))](x2, y, inter, x2.stride(0), y.stride(0),
                                                                BLOCK=block, num_warps=4)
    return y.view(*x.shape[:-1], inter)


def silu_and_mul_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused torch SiLU-and-mul, then per-token FP8 quantization of the fp32 product."""
    gate, up = x.float().chunk(2, dim=-1)
    return per_token_quant_fp8_ref(F.silu(gate) * up)


def silu_and_mul_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [..., I], fp32 scales [..., 1]): per-token FP8 quantization of silu(gate) * up, from fp32."""
    if not can_use_triton(x):
        return silu_and_mul_fp8_ref(x)
    x2, inter = _split_rows(x)
    rows = x2.shape[0]
    q = torch.empty((rows, inter), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = min(4096, next_power_of_2(inter))
        _silu_and_mul_fp8_kernel[(rows,)](x2, q, scale, inter, x2.stride(0), q.stride(0), FP8_MAX=FP8_MAX,
                                          MIN_SCALE=FP8_MIN_SCALE, PRE_ROUND=FP8_PRE_ROUND, BLOCK=block,
                                          num_warps=8 if block >= 2048 else 4)
    return q.view(*x.shape[:-1], inter), scale.view(*x.shape[:-1], 1)
