"""AWQ W4A16 linear method for AutoAWQ "gemm" checkpoints (4-bit, zero point, group size 128 by default).

Parameters keep the checkpoint layout, transposed relative to nn.Linear: `qweight` int32 [in, out/8],
`qzeros` int32 [in/group, out/8], `scales` fp16 [in/group, out]. The output dim is 1 for all three, and the
packed ones carry `pack_factor=8`, so the merged QKV / gate-up loaders divide each shard's offset by 8 for
the int32 tensors and place the scales unpacked.
"""
from __future__ import annotations

import torch
from torch import nn

from swiftlm.kernels.awq import AWQ_PACK, awq_gemm
from swiftlm.layers.linear import LinearBase, LinearMethod, set_weight_attrs


class AWQLinearMethod(LinearMethod):
    """y = x @ ((q - z) * s) (+ bias), dequantizing inside the GEMM/GEMV kernels of `swiftlm.kernels.awq`."""

    pack_factor = AWQ_PACK
    quant_name: str | None = None  # no fused-MoE AWQ kernels

    def __init__(self, group_size: int = 128) -> None:
        self.group_size = group_size

    def create_weights(self, layer: LinearBase, input_size: int, output_size: int, dtype: torch.dtype) -> None:
        if input_size % self.group_size:
            raise ValueError(f"AWQ: input size {input_size} is not a multiple of the group size {self.group_size}")
        if output_size % AWQ_PACK:
            raise ValueError(f"AWQ: output size {output_size} is not a multiple of the pack factor {AWQ_PACK}")
        groups = input_size // self.group_size
        packed = output_size // AWQ_PACK
        for name, shape, param_dtype, pack in (("qweight", (input_size, packed), torch.int32, AWQ_PACK),
                                               ("qzeros", (groups, packed), torch.int32, AWQ_PACK),
                                               ("scales", (groups, output_size), torch.float16, 1)):
            param = nn.Parameter(torch.empty(shape, dtype=param_dtype), requires_grad=False)
            set_weight_attrs(param, input_dim=0, output_dim=1, pack_factor=pack)
            layer.register_parameter(name, param)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return awq_gemm(x, layer.qweight, layer.qzeros, layer.scales, self.group_size, bias)
