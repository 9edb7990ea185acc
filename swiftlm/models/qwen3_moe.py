"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the dense Qwen3 decoder with sparse expert MLPs.

    tokens -> embed -> N x [ RMSNorm -> attention (as Qwen3) -> +residual
                             RMSNorm -> MoE: router gate -> softmax top-k -> fused experts  -> +residual ]
                    -> RMSNorm -> LM head

Layer i is sparse when `i not in mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0`; the others keep
the dense Qwen3 MLP (`intermediate_size`). Everything but the MLP is `swiftlm.models.qwen3`.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from swiftlm.layers.linear import ReplicatedLinear
from swiftlm.layers.moe import FusedMoE
from swiftlm.layers.norm import RMSNorm
from swiftlm.models.qwen3 import QuantFor, Qwen3ForCausalLM, QwenDecoderLayer, QwenModel

_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<shard>gate|up|down)_proj\."
                            r"(?P<kind>weight|weight_scale)$")


@dataclass
class MoeConfig:
    """The MoE fields of a Qwen3-MoE config.json."""

    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int
    mlp_only_layers: list[int]

    @classmethod
    def from_dict(cls, cfg: dict) -> "MoeConfig":
        # transformers 5 writes `num_local_experts` where the hub configs say `num_experts`.
        num_experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if not num_experts:
            raise ValueError("Qwen3-MoE config has neither num_experts nor num_local_experts")
        return cls(num_experts=int(num_experts), top_k=int(cfg["num_experts_per_tok"]),
                   moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
                   mlp_only_layers=list(cfg.get("mlp_only_layers") or []))

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0


def _moe_quant(quant_for: QuantFor, prefix: str) -> str | None:
    """The experts' quantization, from the linear method the model's quant config gives their prefix: a
    method opts into fused-MoE support by naming its scheme in `quant_name` (e.g. "fp8")."""
    method = quant_for(prefix)
    if method is None:
        return None
    if getattr(method, "checkpoint_fp8", False):
        return "fp8-checkpoint"
    name = getattr(method, "quant_name", None)
    if name is None:
        raise ValueError(f"{type(method).__name__} has no fused-MoE counterpart for {prefix}")
    return name


class Qwen3MoeSparseBlock(nn.Module):
    """Router gate (replicated, unquantized, no bias) + fused experts; `mlp.gate` / `mlp.experts` in checkpoints.
    The experts apply the gate themselves (`FusedMoE.forward` takes its weight) to fuse it with routing."""

    def __init__(self, hidden_size: int, moe: MoeConfig, prefix: str, dtype: torch.dtype, quant_for: QuantFor) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(hidden_size, moe.num_experts, False, None, dtype)
        self.experts = FusedMoE(moe.num_experts, moe.top_k, hidden_size, moe.moe_intermediate_size, dtype,
                                renormalize=moe.norm_topk_prob, quant=_moe_quant(quant_for, f"{prefix}.experts"))

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts of norm(hidden + residual) (the dense MLP's interface); returns (output, hidden + residual)."""
        return self.experts.forward_pre_norm(hidden, residual, norm, self.gate.weight)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    """Same constructor, forward and loading as the dense model; expert tensors are streamed into the stacked
    FusedMoE parameters. `enable_expert_stats()` / `expert_stats()` expose per-layer expert load."""

    def _build_model(self, dtype: torch.dtype, quant_for: QuantFor, max_position: int) -> QwenModel:
        cfg = self.config
        self.moe_config = moe = MoeConfig.from_dict(cfg.raw)

        def make_layer(i: int, prefix: str) -> nn.Module:
            sparse = moe.is_sparse(i)
            mlp = Qwen3MoeSparseBlock(cfg.hidden_size, moe, f"{prefix}.mlp", dtype, quant_for) if sparse else None
            return QwenDecoderLayer(cfg, prefix, dtype, quant_for, max_position, mlp=mlp)

        return QwenModel(cfg, dtype, quant_for, max_position, layer_factory=make_layer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Per-expert tensors go straight into their stacked parameters; everything else takes the dense path.

        A stacked parameter is reported as loaded only once every expert's shards arrived, so a checkpoint
        missing one expert fails the runner's completeness check instead of running on uninitialized memory.
        """
        params = dict(self.named_parameters())
        seen: dict[str, set[tuple[int, str]]] = defaultdict(set)

        def dense_only() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                match = _EXPERT_WEIGHT.match(name)
                if match is None:
                    yield name, tensor
                    continue
                expert, shard = int(match["expert"]), match["shard"]
                suffix = "scale" if match["kind"] == "weight_scale" else "weight"
                target = f"{match['prefix']}.{'w2' if shard == 'down' else 'w13'}_{suffix}"
                if target not in params:
                    raise KeyError(f"checkpoint tensor {name!r} has no matching parameter ({target!r})")
                param = params[target]
                param.weight_loader(param, tensor, expert, shard)
                seen[target].add((expert, shard))

        loaded = super().load_weights(dense_only())
        for target, shards in seen.items():
            per_expert = 1 if ".w2_" in target else 2
            if len(shards) == per_expert * self.moe_config.num_experts:
                loaded.add(target)
        return loaded

    def _sparse_blocks(self) -> list[Qwen3MoeSparseBlock | None]:
        return [layer.mlp if isinstance(layer.mlp, Qwen3MoeSparseBlock) else None for layer in self.model.layers]

    def enable_expert_stats(self) -> None:
        """Count tokens routed to each expert of every sparse layer, on device, from the next forward on."""
        for block in self._sparse_blocks():
            if block is not None:
                block.experts.enable_expert_stats()

    def reset_expert_stats(self) -> None:
        for block in self._sparse_blocks():
            if block is not None:
                block.experts.reset_expert_stats()

    def expert_stats(self) -> torch.Tensor:
        """`[num_hidden_layers, num_experts]` int64 tokens routed per expert since enabling (or the last reset);
        dense layers and layers with stats off are zero rows. Stays on device; reading it is the only sync."""
        device = self.model.embed_tokens.weight.device
        zeros = torch.zeros(self.moe_config.num_experts, dtype=torch.int64, device=device)
        return torch.stack([block.experts.expert_counts if block is not None and block.experts.expert_counts is not None
                            else zeros for block in self._sparse_blocks()])
