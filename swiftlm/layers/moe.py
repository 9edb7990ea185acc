"""Fused mixture-of-experts layer: stacked expert weights, a streaming per-expert loader, optional load statistics.

Checkpoints store each expert as three linears (`experts.M.{gate,up,down}_proj.weight`); the layer keeps them
stacked as `w13_weight [E, 2I, H]` (gate rows first, then up) and `w2_weight [E, H, I]`, the layout the fused
kernels read, and `weight_loader` copies each checkpoint tensor straight into its slice (no per-expert modules,
no second copy of the weights).

Tensor parallelism (door only, tp_size 1 today): a rank holds every expert's `I / tp_size` slice of the
intermediate dim, so the output is a partial sum that would be all-reduced, as for `RowParallelLinear`.
"""
from __future__ import annotations

import torch
from torch import nn

from swiftlm.kernels.fused_moe import FP8_DTYPE, fused_moe, gate_route, norm_gate_route
from swiftlm.layers.attention import current_forward_context
from swiftlm.layers.linear import set_weight_attrs
from swiftlm.layers.norm import RMSNorm

SHARDS = ("gate", "up", "down")


class MoeQuantMethod:
    """How the experts are stored; the model runner calls `process_weights_after_loading(layer)` on every
    module's `quant_method` once the checkpoint is in."""

    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        """Unquantized experts need nothing after loading."""


class Fp8MoeMethod(MoeQuantMethod):
    """Online FP8 PTPC: the checkpoint's 16-bit experts are quantized after loading to float8_e4m3fn with one
    fp32 scale per (expert, output channel); activations are quantized per token inside `fused_moe`."""

    def process_weights_after_loading(self, layer: "FusedMoE") -> None:
        if layer.w13_weight.dtype == FP8_DTYPE:
            return
        from swiftlm.kernels.quant import quantize_weight_fp8_ref  # needs Triton; only fp8 models import it
        for name in ("w13", "w2"):
            weight = getattr(layer, f"{name}_weight")
            quantized = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
            scale = torch.empty(weight.shape[0], weight.shape[1], 1, dtype=torch.float32, device=weight.device)
            for expert in range(weight.shape[0]):  # one expert at a time bounds the fp32 temporary
                quantized[expert], scale[expert] = quantize_weight_fp8_ref(weight.data[expert])
            setattr(layer, f"{name}_weight", nn.Parameter(quantized, requires_grad=False))
            setattr(layer, f"{name}_scale", nn.Parameter(scale, requires_grad=False))


def moe_quant_method(name: str | None) -> MoeQuantMethod:
    """None/"none" -> unquantized; "fp8" -> online FP8 PTPC; "fp8-checkpoint" -> FP8 experts as stored in a
    compressed-tensors FP8-dynamic checkpoint (loaded as they are, nothing to do afterwards)."""
    if name in (None, "none", "fp8-checkpoint"):
        return MoeQuantMethod()
    if name == "fp8":
        return Fp8MoeMethod()
    raise ValueError(f"unsupported MoE quantization {name!r} (supported: fp8, fp8-checkpoint)")


class FusedMoE(nn.Module):
    """The experts of one sparse block: `forward(hidden [T, H], gate_weight [E, H]) -> [T, H]`.

    Routing is softmax over the gate's logits then top-k (renormalized to sum 1 when `renormalize`, Qwen3's
    `norm_topk_prob`); the layer takes the gate's weight rather than its logits so that decode can compute the
    logits and route in one kernel (`gate_route`).
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 renormalize: bool = True, quant: str | None = None, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(f"moe intermediate size {intermediate_size} is not divisible by tp size {tp_size}")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.local_intermediate = intermediate_size // tp_size
        stored = FP8_DTYPE if quant == "fp8-checkpoint" else dtype
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.local_intermediate, hidden_size, dtype=stored),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, self.local_intermediate, dtype=stored),
                                      requires_grad=False)
        # FP8 scales per (expert, output channel): [E, 2I, 1] and [E, H, 1]; from the checkpoint, or made by online
        # quantization after loading.
        if quant == "fp8-checkpoint":
            self.w13_scale = nn.Parameter(torch.empty(num_experts, 2 * self.local_intermediate, 1), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(num_experts, hidden_size, 1), requires_grad=False)
        else:
            self.register_parameter("w13_scale", None)
            self.register_parameter("w2_scale", None)
        for param in (self.w13_weight, self.w2_weight, self.w13_scale, self.w2_scale):
            if param is not None:
                set_weight_attrs(param, weight_loader=self.weight_loader)
        self.quant_method = moe_quant_method(quant)
        self.expert_counts: torch.Tensor | None = None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, expert_id: int, shard: str) -> None:
        """Copy one expert's checkpoint tensor (`gate`/`up`: `[I, H]`, `down`: `[H, I]`, unsharded; their FP8
        scales `[I, 1]` / `[H, 1]`) into this rank's slice of the stacked parameter."""
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} out of range [0, {self.num_experts})")
        full, local = self.intermediate_size, self.local_intermediate
        is_scale = param is not None and (param is self.w13_scale or param is self.w2_scale)
        if shard in ("gate", "up"):
            expected, split_dim = (full, 1 if is_scale else self.hidden_size), 0
            target = self.w13_scale if is_scale else self.w13_weight
        elif shard == "down":
            expected, split_dim = ((self.hidden_size, 1), None) if is_scale else ((self.hidden_size, full), 1)
            target = self.w2_scale if is_scale else self.w2_weight
        else:
            raise ValueError(f"shard must be one of {SHARDS}, got {shard!r}")
        if param is not target:
            owner = ("w2" if shard == "down" else "w13") + ("_scale" if is_scale else "_weight")
            raise ValueError(f"shard {shard!r} belongs to {owner}")
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expert {expert_id} {shard}: checkpoint shape {tuple(loaded.shape)}, expected {expected}")
        source = loaded if split_dim is None else loaded.narrow(split_dim, self.tp_rank * local, local)
        rows = param.data[expert_id]
        if shard != "down":
            rows = rows.narrow(0, 0 if shard == "gate" else local, local)
        rows.copy_(source)

    def enable_expert_stats(self) -> None:
        """Start counting tokens routed to each expert (device atomics in the routing kernel, no host sync).

        Enable before CUDA graphs are captured: a graph replays whatever its capture did, so graphs captured
        without the counter never count. There is no disable: a captured graph keeps writing to the counter.
        """
        if self.expert_counts is None:
            self.expert_counts = torch.zeros(self.num_experts, dtype=torch.int64, device=self.w13_weight.device)

    def reset_expert_stats(self) -> None:
        if self.expert_counts is not None:
            self.expert_counts.zero_()

    def _count_limit(self) -> torch.Tensor | None:
        if self.expert_counts is None:
            return None
        meta = current_forward_context()
        return meta.num_real_tokens if meta is not None else None

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return fused_moe(x, self.w13_weight, self.w2_weight, weights, ids, self.w13_scale, self.w2_scale)

    def forward(self, hidden: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
        weights, ids = gate_route(hidden, gate_weight, self.top_k, self.renormalize, self.expert_counts,
                                  self._count_limit())
        return self._experts(hidden, weights, ids)

    def forward_pre_norm(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm,
                         gate_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts(norm(hidden + residual)), hidden + residual); the norm runs inside the gate's launch where
        that is fused (`norm_gate_route`)."""
        if residual is None:
            x, residual = norm.pre_norm(hidden, None)
            return self(x, gate_weight), residual
        x, residual, weights, ids = norm_gate_route(hidden, residual, norm.weight, norm.eps, gate_weight, self.top_k,
                                                    self.renormalize, self.expert_counts, self._count_limit())
        return self._experts(x, weights, ids), residual

