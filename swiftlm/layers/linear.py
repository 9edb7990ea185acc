"""Linear layers with two doors left open: a pluggable quantization method and tensor-parallel rank/size.

A layer owns its parameters through a `LinearMethod`, which creates them, tells the loader how a checkpoint
tensor maps onto them, and runs the matmul. Merged layers (QKV, gate+up) take several checkpoint tensors
into one parameter, each shard at its own offset along the output dimension.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from swiftlm.kernels.gemv import gemv, use_gemv
from swiftlm.layers.activation import SiluAndMul
from swiftlm.layers.norm import RMSNorm

WeightLoader = Callable[[nn.Parameter, torch.Tensor, "str | int | None"], None]


def set_weight_attrs(param: nn.Parameter, **attrs: object) -> None:
    """Attach loading metadata (output_dim, weight_loader, pack factors...) to a parameter."""
    for key, value in attrs.items():
        setattr(param, key, value)


class LinearMethod:
    """How a linear layer stores and applies its weight. Subclasses: unquantized, FP8 PTPC, AWQ."""

    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def apply_silu_mul(self, layer: "LinearBase", gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer applied to SiLU(gate) * up of a merged `[T, 2K]` gate|up projection (a SwiGLU MLP's down
        projection). Methods whose decode kernel can fuse the activation into its input load override this."""
        return self.apply(layer, SiluAndMul()(gate_up), bias)

    def apply_pre_norm(self, layer: "LinearBase", x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the layer applied to norm(x + residual), x + residual): a decoder's pre-norm and the projection after
        it. Methods whose decode kernel can fold the norm into its input load override this."""
        h, residual = norm.pre_norm(x, residual)
        return self.apply(layer, h, bias), residual

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        """Hook for repacking or quantizing once all shards are in (e.g. online FP8)."""


def gemv_pre_norm(x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm, weight: torch.Tensor,
                  w_scale: torch.Tensor | None, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`LinearMethod.apply_pre_norm` as one GEMV launch: the (add +) RMSNorm happens as the input is loaded."""
    new_residual = torch.empty_like(residual) if residual is not None else None
    y = gemv(x, weight, w_scale, bias, rms_weight=norm.weight, rms_eps=norm.eps, residual=residual,
             residual_out=new_residual)
    return y, new_residual if new_residual is not None else x


class GemvLinearMethod(LinearMethod):
    """A method whose decode-sized batches can run swiftlm's GEMV on `layer.weight` (times `gemv_scale`): the
    fused-input modes (SiLU-and-mul, pre-norm) go there where `FUSED_GEMV_CONFIGS` lists the shape."""

    def gemv_scale(self, layer: "LinearBase") -> torch.Tensor | None:
        """Per-output-channel weight scale for the GEMV, or None for a 16-bit weight."""
        return None

    def gemv_ready(self, layer: "LinearBase") -> bool:
        """Whether the weight is in its final form (online quantization happens after loading)."""
        return True

    def apply_silu_mul(self, layer: "LinearBase", gate_up: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.gemv_ready(layer) and use_gemv(gate_up, layer.weight, "silu"):
            return gemv(gate_up, layer.weight, w_scale=self.gemv_scale(layer), bias=bias, silu_mul=True)
        return super().apply_silu_mul(layer, gate_up, bias)

    def apply_pre_norm(self, layer: "LinearBase", x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                       bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gemv_ready(layer) and use_gemv(x, layer.weight, "norm"):
            return gemv_pre_norm(x, residual, norm, layer.weight, self.gemv_scale(layer), bias)
        return super().apply_pre_norm(layer, x, residual, norm, bias)


class UnquantizedLinearMethod(GemvLinearMethod):
    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int, dtype: torch.dtype) -> None:
        weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        set_weight_attrs(weight, output_dim=0, input_dim=1)
        layer.register_parameter("weight", weight)

    def apply(self, layer: "LinearBase", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if use_gemv(x, layer.weight):  # decode-sized batches: a GEMV that streams the weight faster than cuBLAS
            return gemv(x, layer.weight, bias=bias)
        return F.linear(x, layer.weight, bias)


class LinearBase(nn.Module):
    """Common state: logical sizes, this rank's slice of them, the quant method and the bias."""

    def __init__(self, input_size: int, output_size: int, bias: bool, quant_method: LinearMethod | None,
                 dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.local_input_size, self.local_output_size = self._local_sizes()
        self.quant_method.create_weights(self, self.local_input_size, self.local_output_size, dtype)
        for param in self.parameters(recurse=False):
            set_weight_attrs(param, weight_loader=self.weight_loader)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.local_output_size, dtype=dtype), requires_grad=False)
            set_weight_attrs(self.bias, output_dim=0, weight_loader=self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def _local_sizes(self) -> tuple[int, int]:
        return self.input_size, self.output_size

    def forward(self, x: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
        """silu_mul: x is a merged `[T, 2K]` gate|up projection and the layer's input is SiLU(gate) * up."""
        if silu_mul:
            return self.quant_method.apply_silu_mul(self, x, self.bias)
        return self.quant_method.apply(self, x, self.bias)

    def forward_pre_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual); residual None means norm(x) and x. The quant method may fold
        the norm into its kernel (decode GEMVs do)."""
        return self.quant_method.apply_pre_norm(self, x, residual, norm, self.bias)

    def _shard_offset(self, param: nn.Parameter, shard_id: str | int | None) -> tuple[int, int]:
        """(offset, size) of `shard_id` along the parameter's output dim, in the parameter's own units."""
        dim = getattr(param, "output_dim", None)
        return 0, (param.shape[dim] if dim is not None else 0)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        """Copy a checkpoint tensor (full, unsharded) into this rank's slice of `param`."""
        out_dim = getattr(param, "output_dim", None)
        in_dim = getattr(param, "input_dim", None)
        target = param.data
        if out_dim is not None:
            offset, size = self._shard_offset(param, shard_id)
            target = target.narrow(out_dim, offset, size)
            if self.tp_size > 1 and self._split_output():
                loaded = loaded.narrow(out_dim, self.tp_rank * size, size)
        if in_dim is not None and self.tp_size > 1 and not self._split_output():
            size = target.shape[in_dim]
            loaded = loaded.narrow(in_dim, self.tp_rank * size, size)
        if target.shape != loaded.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit parameter slice "
                             f"{tuple(target.shape)} (shard {shard_id!r})")
        target.copy_(loaded)

    def _split_output(self) -> bool:
        return True


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole (e.g. a router gate)."""

    def _split_output(self) -> bool:
        return False

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if param.shape != loaded.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(loaded)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice."""

    def _local_sizes(self) -> tuple[int, int]:
        if self.output_size % self.tp_size:
            raise ValueError(f"output size {self.output_size} is not divisible by tp size {self.tp_size}")
        return self.input_size, self.output_size // self.tp_size


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one matrix (gate_proj + up_proj); shard ids are 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool, quant_method: LinearMethod | None,
                 dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quant_method, dtype, tp_rank, tp_size)

    def _shard_offset(self, param: nn.Parameter, shard_id: str | int | None) -> tuple[int, int]:
        pack = getattr(param, "pack_factor", 1)
        local = [s // self.tp_size // pack for s in self.output_sizes]
        index = int(shard_id)  # type: ignore[arg-type]
        return sum(local[:index]), local[index]


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix; shard ids "q", "k", "v". KV heads are split like query heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 quant_method: LinearMethod | None, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1) -> None:
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        output = (num_heads + 2 * num_kv_heads) * head_dim
        super().__init__(hidden_size, output, bias, quant_method, dtype, tp_rank, tp_size)

    def _shard_offset(self, param: nn.Parameter, shard_id: str | int | None) -> tuple[int, int]:
        pack = getattr(param, "pack_factor", 1)
        q = self.num_heads * self.head_dim // self.tp_size // pack
        kv = self.num_kv_heads * self.head_dim // self.tp_size // pack
        return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[str(shard_id)]


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial sums would be all-reduced when tp_size > 1."""

    def _local_sizes(self) -> tuple[int, int]:
        if self.input_size % self.tp_size:
            raise ValueError(f"input size {self.input_size} is not divisible by tp size {self.tp_size}")
        return self.input_size // self.tp_size, self.output_size

    def _split_output(self) -> bool:
        return False
