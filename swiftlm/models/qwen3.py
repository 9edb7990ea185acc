"""Qwen3 and Qwen2 (Qwen2.5, QwQ) dense decoders.

    tokens -> embed -> N x [ RMSNorm -> attention(QKV, QK-norm*, RoPE, paged attn, O) -> +residual
                             RMSNorm -> MLP(gate|up -> SiLU*up -> down) -> +residual ] -> RMSNorm -> LM head
    (* Qwen3 only; Qwen2 instead has biases on Q/K/V)

Each pre-norm (with the residual add before it) is handed to the projection that follows it, QKV or gate|up, so a
decode GEMV can apply it while loading its input.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from swiftlm.layers.attention import Attention
from swiftlm.layers.embedding import LMHead, VocabEmbedding
from swiftlm.layers.linear import LinearMethod, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from swiftlm.layers.norm import RMSNorm
from swiftlm.layers.rotary import RotaryEmbedding

QuantFor = Callable[[str], "LinearMethod | None"]

# Per-tensor FP8 KV-cache scales as checkpoints store them (`self_attn.k_scale`, or `k_proj.output_scale`).
_KV_SCALE = re.compile(r"^(?P<layer>model\.layers\.\d+)\.self_attn\.(?:(?P<kind>[kv])_scale|"
                       r"(?P<proj>[kv])_proj\.output_scale)$")


def no_quant(prefix: str) -> None:
    """The quant_for of an unquantized model: every linear layer keeps its 16-bit weight."""
    return None


@dataclass
class QwenConfig:
    """The fields of an HF Qwen2/Qwen3 config.json that inference needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    raw: dict

    @classmethod
    def from_dict(cls, cfg: dict) -> "QwenConfig":
        is_qwen2 = cfg.get("model_type") == "qwen2" or "Qwen2ForCausalLM" in cfg.get("architectures", [])
        rope_params = cfg.get("rope_parameters") or {}
        scaled = rope_params.get("rope_type", "default") != "default"
        scaling = cfg.get("rope_scaling") or (rope_params if scaled else None)
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
            rope_scaling=scaling, max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else bool(cfg.get("attention_bias", False)),
            o_bias=False if is_qwen2 else bool(cfg.get("attention_bias", False)),
            qk_norm=not is_qwen2, raw=cfg)


class QwenAttention(nn.Module):
    def __init__(self, cfg: QwenConfig, prefix: str, dtype: torch.dtype, quant_for: QuantFor,
                 max_position: int) -> None:
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.num_heads, self.num_kv_heads, self.head_dim = hq, hkv, d
        self.eps = cfg.rms_norm_eps
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, hq, hkv, cfg.qkv_bias, quant_for(f"{prefix}.qkv_proj"),
                                          dtype)
        self.o_proj = RowParallelLinear(hq * d, cfg.hidden_size, cfg.o_bias, quant_for(f"{prefix}.o_proj"), dtype)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.rotary = RotaryEmbedding(d, max_position, cfg.rope_theta, cfg.rope_scaling, dtype)
        self.attn = Attention(hq, hkv, d, d ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of norm(hidden + residual); returns (output, hidden + residual)."""
        t = hidden.shape[0]
        qkv, residual = self.qkv_proj.forward_pre_norm(hidden, residual, norm)
        q, k, v = qkv.split([self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                             self.num_kv_heads * self.head_dim], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = self.attn.forward_rope(positions, q, k, v, self.rotary.cos_sin_cache,
                                     self.q_norm.weight if self.q_norm is not None else None,
                                     self.k_norm.weight if self.k_norm is not None else None, self.eps)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim)), residual


class QwenMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, prefix: str, dtype: torch.dtype,
                 quant_for: QuantFor) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, False,
                                                       quant_for(f"{prefix}.gate_up_proj"), dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, False, quant_for(f"{prefix}.down_proj"),
                                           dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, norm: RMSNorm
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """SwiGLU of norm(x + residual): down(SiLU(gate) * up); returns (output, x + residual). The down projection
        applies the activation itself, so a decode GEMV computes it while loading its input."""
        gate_up, residual = self.gate_up_proj.forward_pre_norm(x, residual, norm)
        return self.down_proj(gate_up, silu_mul=True), residual


class QwenDecoderLayer(nn.Module):
    def __init__(self, cfg: QwenConfig, prefix: str, dtype: torch.dtype, quant_for: QuantFor, max_position: int,
                 mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = QwenAttention(cfg, f"{prefix}.self_attn", dtype, quant_for, max_position)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp or QwenMLP(cfg.hidden_size, cfg.intermediate_size, f"{prefix}.mlp", dtype, quant_for)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.self_attn(positions, hidden, residual, self.input_layernorm)
        return self.mlp(hidden, residual, self.post_attention_layernorm)


class QwenModel(nn.Module):
    def __init__(self, cfg: QwenConfig, dtype: torch.dtype, quant_for: QuantFor, max_position: int,
                 layer_factory: Callable[[int, str], nn.Module] | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype)
        make = layer_factory or (lambda i, p: QwenDecoderLayer(cfg, p, dtype, quant_for, max_position))
        self.layers = nn.ModuleList(make(i, f"model.layers.{i}") for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Qwen3ForCausalLM(nn.Module):
    """Causal LM wrapper: forward returns final hidden states; `compute_logits` runs the head on chosen rows."""

    # checkpoint name -> (our merged parameter name, shard id)
    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, hf_config: dict, dtype: torch.dtype, quant_for: QuantFor = no_quant,
                 max_position: int | None = None) -> None:
        super().__init__()
        self.config = QwenConfig.from_dict(hf_config)
        max_position = max(max_position or 0, self.config.max_position_embeddings)
        self.model = self._build_model(dtype, quant_for, max_position)
        tied = self.model.embed_tokens if self.config.tie_word_embeddings else None
        self.lm_head = LMHead(self.config.vocab_size, self.config.hidden_size, dtype, tied_to=tied)

    def _build_model(self, dtype: torch.dtype, quant_for: QuantFor, max_position: int) -> QwenModel:
        return QwenModel(self.config, dtype, quant_for, max_position)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(hidden, out)

    def attention_layers(self) -> list[Attention]:
        return [m for m in self.modules() if isinstance(m, Attention)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Stream (name, tensor) pairs into parameters; returns the parameter names that were filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            kv_scale = _KV_SCALE.match(name)
            if kv_scale is not None:
                attn = self.get_submodule(f"{kv_scale['layer']}.self_attn.attn")
                kind = kv_scale["kind"] or kv_scale["proj"]
                setattr(attn, f"{kind}_scale", float(tensor.float().reshape(-1)[0]))
                continue
            target, shard = self._map_name(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter ({target!r})")
            param = params[target]
            loader = getattr(param, "weight_loader", None)
            if loader is not None:
                loader(param, tensor, shard)
            else:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.data.copy_(tensor)
            loaded.add(target)
        return loaded

    def _map_name(self, name: str) -> tuple[str, str | int | None]:
        for ckpt, (ours, shard) in self.packed_modules.items():
            if f".{ckpt}." in name:
                return name.replace(f".{ckpt}.", f".{ours}."), shard
        return name, None


class Qwen2ForCausalLM(Qwen3ForCausalLM):
    """Qwen2/Qwen2.5/QwQ: same graph, Q/K/V biases and no QK-norm (QwenConfig reads that from the config)."""
