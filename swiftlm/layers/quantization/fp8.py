"""FP8 PTPC linear method: e4m3 weights with one scale per output channel, activations quantized per token.

Two ways in: compressed-tensors "FP8-dynamic" checkpoints store `weight` (e4m3 [out, in]) and `weight_scale`
([out, 1]); online mode (`--quantization fp8`) loads the 16-bit checkpoint and quantizes each output row in
`process_weights_after_loading`. Either way both parameters carry `output_dim=0`, so the merged QKV / gate-up
loaders place each shard's rows and scales at the same offset.

Batches that run the W8A8 GEMM (prefill) get their activations already quantized by the kernel before: the
decoder's add + RMSNorm and the MLP's SiLU-and-mul write e4m3 rows and per-token scales instead of 16-bit rows
that a separate pass would read back to quantize (an 8000-token Qwen3-8B prefill spent 7.7 ms in those passes).
"""
from __future__ import annotations

import torch
from torch import nn

from swiftlm.kernels.activation import silu_and_mul_fp8
from swiftlm.kernels.fused_norm import fused_add_rms_norm_fp8
from swiftlm.kernels.gemv import gemv, use_gemv
from swiftlm.kernels.quant import FP8_DTYPE, fp8_linear, per_token_quant_fp8
from swiftlm.layers.linear import GemvLinearMethod, LinearBase, set_weight_attrs
from swiftlm.layers.norm import RMSNorm


class Fp8LinearMethod(GemvLinearMethod):
    """`checkpoint_fp8=True`: parameters arrive quantized; False: a 16-bit weight is quantized after loading."""

    def __init__(self, checkpoint_fp8: bool) -> None:
        self.checkpoint_fp8 = checkpoint_fp8
        # Fused MoE experts can only quantize 16-bit expert weights online, so only online mode opts in.
        self.quant_name: str | None = None if checkpoint_fp8 else "fp8"

    def create_weights(self, layer: LinearBase, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        weight_dtype = FP8_DTYPE if self.checkpoint_fp8 else dtype
        weight = nn.Parameter(torch.empty(output_size, input_size, dtype=weight_dtype), requires_grad=False)
        set_weight_attrs(weight, output_dim=0, input_dim=1)
        layer.register_parameter("weight", weight)
        if self.checkpoint_fp8:
            scale = nn.Parameter(torch.empty(output_size, 1, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(scale, output_dim=0)
            layer.register_parameter("weight_scale", scale)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if self.checkpoint_fp8:
            return
        weight, scale = per_token_quant_fp8(layer.weight.data)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.weight.dtype != FP8_DTYPE:
            raise RuntimeError("FP8 layer used before process_weights_after_loading quantized its weight")
        if use_gemv(x, layer.weight):  # decode: W8A16 GEMV, the e4m3 weight streamed once, activations unquantized
            return gemv(x, layer.weight, layer.weight_scale, bias)
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)

    def apply_pre_norm(self, layer: LinearBase, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if use_gemv(x, layer.weight) or not self.gemv_ready(layer):
            return super().apply_pre_norm(layer, x, residual, norm, bias)
        q, scale, new_residual = fused_add_rms_norm_fp8(x, residual, norm.weight, norm.eps)
        y = fp8_linear(q, layer.weight, layer.weight_scale, bias, x_scale=scale, out_dtype=x.dtype)
        return y, new_residual if new_residual is not None else x

    def apply_silu_mul(self, layer: LinearBase, gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if use_gemv(gate_up, layer.weight) or not self.gemv_ready(layer):
            return super().apply_silu_mul(layer, gate_up, bias)
        q, scale = silu_and_mul_fp8(gate_up)
        return fp8_linear(q, layer.weight, layer.weight_scale, bias, x_scale=scale, out_dtype=gate_up.dtype)

    def gemv_scale(self, layer: LinearBase) -> torch.Tensor | None:
        return layer.weight_scale

    def gemv_ready(self, layer: LinearBase) -> bool:
        return layer.weight.dtype == FP8_DTYPE
