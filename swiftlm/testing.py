"""Random-weight HF checkpoints for any Qwen config, so tests and benchmarks need no downloaded weights.

Weights are written in the hub's tensor layout (per-expert MoE tensors, `lm_head` only when untied), which is
what real Qwen checkpoints look like and what the loader must read. transformers validates the config and
cross-checks the parameter count on the meta device; the tensors themselves come from `random_tensor`, a
platform-independent generator, and are produced one shard at a time so host RAM stays near one shard
(`max_shard_bytes`) even for very large configs.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

ARCHITECTURES: dict[str, str] = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "generation_config.json")

# The demo tokenizer's size and special ids (checked when swiftlm.demo builds it), here so tiny configs can share
# its vocabulary without building it. The special tokens come last, as in Qwen's vocabularies.
DEMO_VOCAB_SIZE = 1024
DEMO_ENDOFTEXT_ID = DEMO_VOCAB_SIZE - 3
DEMO_IM_END_ID = DEMO_VOCAB_SIZE - 1

_COMMON = {
    "vocab_size": DEMO_VOCAB_SIZE,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_sliding_window": False,
    "bos_token_id": DEMO_ENDOFTEXT_ID,
    "eos_token_id": DEMO_IM_END_ID,
    "torch_dtype": "bfloat16",
}

_TINY: dict[str, dict[str, Any]] = {
    # head_dim * heads != hidden on purpose: real Qwen3 models decouple them and kernels must not assume equality.
    "qwen3": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "attention_bias": False, "tie_word_embeddings": True,
              "sliding_window": None},
    "qwen2": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "tie_word_embeddings": False, "sliding_window": 4096},
    "qwen3_moe": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 32, "attention_bias": False, "tie_word_embeddings": False,
                  "sliding_window": None, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True,
                  "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": [],
                  "router_aux_loss_coef": 0.001, "output_router_logits": False},
}
TINY_ARCHS: tuple[str, ...] = tuple(_TINY)


def tiny_config(arch: str, **overrides: Any) -> dict[str, Any]:
    """A complete, hub-style config.json dict for a tiny model of `arch` ("qwen3", "qwen2", "qwen3_moe").

    The vocabulary matches the demo tokenizer, so `make_random_checkpoint(tiny_config(...), d)` yields a model
    that can be prompted with text. A smaller `vocab_size` override drops the demo's bos/eos ids, which would
    otherwise point past the embedding table.
    """
    if arch not in _TINY:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(_TINY)}")
    cfg: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, **_COMMON, **_TINY[arch]}
    cfg.update(overrides)
    cfg.setdefault("max_window_layers", cfg["num_hidden_layers"])
    for key in ("bos_token_id", "eos_token_id"):
        if key not in overrides and cfg[key] >= cfg["vocab_size"]:
            cfg[key] = None
    return cfg


def _head_dim(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def _is_sparse_layer(cfg: dict[str, Any], layer: int) -> bool:
    """Qwen3-MoE's rule for which decoder layers route through experts."""
    return (cfg.get("num_experts", 0) > 0 and layer not in cfg.get("mlp_only_layers", [])
            and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0)


def checkpoint_layout(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a hub checkpoint of this config holds, in file order."""
    model_type = cfg["model_type"]
    if model_type not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {sorted(ARCHITECTURES)}")
    h, hd = cfg["hidden_size"], _head_dim(cfg)
    q_out, kv_out = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    qkv_bias = model_type == "qwen2" or cfg.get("attention_bias", False)
    o_bias = model_type != "qwen2" and cfg.get("attention_bias", False)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, rows in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            out.append((f"{p}.self_attn.{name}.weight", (rows, h)))
            if qkv_bias:
                out.append((f"{p}.self_attn.{name}.bias", (rows,)))
        out.append((f"{p}.self_attn.o_proj.weight", (h, q_out)))
        if o_bias:
            out.append((f"{p}.self_attn.o_proj.bias", (h,)))
        if model_type != "qwen2":
            out += [(f"{p}.self_attn.q_norm.weight", (hd,)), (f"{p}.self_attn.k_norm.weight", (hd,))]
        if model_type == "qwen3_moe" and _is_sparse_layer(cfg, i):
            inter = cfg["moe_intermediate_size"]
            out.append((f"{p}.mlp.gate.weight", (cfg["num_experts"], h)))
            for e in range(cfg["num_experts"]):
                out += [(f"{p}.mlp.experts.{e}.gate_proj.weight", (inter, h)),
                        (f"{p}.mlp.experts.{e}.up_proj.weight", (inter, h)),
                        (f"{p}.mlp.experts.{e}.down_proj.weight", (h, inter))]
        else:
            inter = cfg["intermediate_size"]
            out += [(f"{p}.mlp.gate_proj.weight", (inter, h)), (f"{p}.mlp.up_proj.weight", (inter, h)),
                    (f"{p}.mlp.down_proj.weight", (h, inter))]
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    return out


# Std of a random model's logits (embedding std * sqrt(hidden)): peaked enough that greedy argmax is robust to
# bf16 rounding, flat enough that sampling still varies.
_LOGIT_STD = 4.0


def _tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed, so a tensor's values depend only on (seed, name), not on shard order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def random_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                  device: str = "cpu") -> torch.Tensor:
    """Deterministic init that keeps a random model's output context-dependent rather than degenerate.

    Values are uniform with a chosen std: torch's CPU `rand` and the affine maps below are exact or correctly
    rounded IEEE operations, so every machine writes the same bytes (a normal sampler goes through
    platform-specific vectorised log/cos). Projections get std 1/sqrt(fan_in), the residual writers (o_proj,
    down_proj) twice that, and q/k norms weights near 2 so attention is selective and the output depends on
    context. The final norm's weights get random signs: the residual stream still holds the input token's own
    embedding, and with tied (or merely similar) embeddings that term makes the argmax echo the input token;
    random signs cancel it. Other norm weights are near, not exactly, 1 so an engine that ignores them disagrees
    with the reference. `device="cuda"` draws on the GPU (an 8B checkpoint in seconds rather than minutes); its
    values then differ from the CPU's.
    """
    gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
    centred = torch.rand(shape, generator=gen, dtype=torch.float32, device=device) - 0.5
    leaf = name.split(".")[-2]
    if name == "model.norm.weight":
        t = torch.where(centred < 0, -1.0, 1.0) * (0.8 + 0.8 * centred.abs())
    elif leaf in ("q_norm", "k_norm"):
        t = 2.0 + 0.4 * centred
    elif "norm" in leaf:
        t = 1.0 + 0.2 * centred
    elif name.endswith(".bias"):
        t = centred * (0.1 * math.sqrt(12.0))
    elif leaf in ("embed_tokens", "lm_head"):
        t = centred * (_LOGIT_STD * math.sqrt(12.0 / shape[-1]))
    elif leaf in ("o_proj", "down_proj"):
        t = centred * (2.0 * math.sqrt(12.0 / shape[-1]))
    else:
        t = centred * math.sqrt(12.0 / shape[-1])
    return t.to(dtype)


def _plan_shards(layout: list[tuple[str, tuple[int, ...]]], itemsize: int,
                 max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy split in file order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_random_weights(cfg: dict[str, Any], out_dir: str, *, dtype: torch.dtype, seed: int,
                         max_shard_bytes: int = 2 * 1024**3, device: str = "cpu") -> list[str]:
    """Write `model.safetensors` (or numbered shards plus the index) and return the file names written."""
    from safetensors.torch import save_file

    layout = checkpoint_layout(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(layout, itemsize, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        tensors = {name: random_tensor(name, shape, seed, dtype, device).cpu() for name, shape in shard}
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update((name, fname) for name in tensors)
        del tensors
    if len(shards) > 1:
        total = sum(math.prod(shape) for _, shape in layout) * itemsize
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        names.append("model.safetensors.index.json")
    return names


# Fields the layout and the engine read; filled from transformers' defaults when a config leaves them out, so the
# written config.json means the same thing to us as to the reference implementation.
_FILLED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
           "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
_FILLED_QWEN3 = ("attention_bias",)
_FILLED_MOE = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
               "decoder_sparse_step", "mlp_only_layers")


def _complete_config(cfg: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Validate with transformers and fill missing fields, keeping the hub spelling (rope_theta, num_experts)."""
    from transformers import AutoConfig

    hf = AutoConfig.for_model(**cfg)
    if cfg["model_type"] == "qwen3_moe" and hf.num_experts_per_tok > hf.num_experts:
        raise ValueError(f"num_experts_per_tok ({hf.num_experts_per_tok}) exceeds num_experts ({hf.num_experts})")
    out = dict(cfg)
    keys = _FILLED + (_FILLED_QWEN3 if cfg["model_type"] != "qwen2" else ()) + (
        _FILLED_MOE if cfg["model_type"] == "qwen3_moe" else ())
    for key in keys:
        if key not in out:
            value = getattr(hf, key)
            out[key] = list(value) if isinstance(value, (list, tuple)) else value
    if "head_dim" not in out and cfg["model_type"] != "qwen2":
        out["head_dim"] = hf.head_dim
    if "rope_theta" not in out:
        rope = getattr(hf, "rope_parameters", None) or {}
        out["rope_theta"] = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    return out, hf


def _check_param_count(hf_config: Any, cfg: dict[str, Any]) -> None:
    """Build the transformers model on the meta device (no memory) and compare parameter counts with our layout.

    transformers stores MoE experts fused, so names differ; counts must still agree, which catches a layout that
    forgot a tensor (e.g. a bias) for some config flag.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    theirs = sum(p.numel() for p in model.parameters())
    ours = sum(math.prod(shape) for _, shape in checkpoint_layout(cfg))
    if theirs != ours:
        raise RuntimeError(f"checkpoint layout has {ours} parameters but transformers' model has {theirs}")


def _tokenizer_vocab_size(tok_dir: str) -> int | None:
    path = os.path.join(tok_dir, "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path).get_vocab_size(with_added_tokens=True)


def fill_tokenizer_vocab(src_dir: str, out_dir: str, vocab_size: int) -> str:
    """Copy `src_dir`'s tokenizer files into `out_dir`, padded with plain tokens " w<id>" up to `vocab_size`.

    A random-weight model samples ids anywhere in its vocabulary; with the demo tokenizer (1024 tokens) on a
    151,936-token config most ids would decode to nothing, so text-level checks (stop strings, streamed text) on a
    full-size model need every id to decode to text. Returns out_dir.
    """
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(os.path.join(src_dir, "tokenizer.json"))
    have = tok.get_vocab_size(with_added_tokens=True)
    if have > vocab_size:
        raise ValueError(f"tokenizer in {src_dir} has {have} tokens, more than vocab_size {vocab_size}")
    tok.add_tokens([AddedToken(f" w{i}", special=False, normalized=False) for i in range(have, vocab_size)])
    os.makedirs(out_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        if name != "tokenizer.json" and os.path.exists(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return out_dir


def make_random_checkpoint(config: str | dict[str, Any], out_dir: str, *, dtype: str = "bfloat16", seed: int = 0,
                           tokenizer_from: str | None = None, overrides: dict[str, Any] | None = None,
                           max_shard_bytes: int = 2 * 1024**3, device: str = "cpu") -> str:
    """Write a random-weight checkpoint for a Qwen config.json (path or dict) into `out_dir` and return it.

    `overrides` replace config fields (e.g. fewer layers). Tokenizer files are copied from `tokenizer_from`; by
    default the demo tokenizer is used when its vocabulary fits the config's (bos/eos ids are then set to the
    demo's unless `overrides` sets them) and no tokenizer is written when it does not fit. An explicit
    `tokenizer_from` whose vocabulary exceeds the model's is an error. Host RAM stays near one shard
    (`max_shard_bytes`) plus one tensor, so even a 235B MoE config can be written; disk needs the full size.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if isinstance(config, str):
        path = os.path.join(config, "config.json") if os.path.isdir(config) else config
        with open(path) as f:
            cfg: dict[str, Any] = json.load(f)
    else:
        cfg = dict(config)
    cfg.update(overrides or {})
    if "model_type" not in cfg:
        arch = (cfg.get("architectures") or [None])[0]
        matches = [m for m, a in ARCHITECTURES.items() if a == arch]
        if not matches:
            raise ValueError(f"config names neither a known model_type nor architecture: {arch!r}")
        cfg["model_type"] = matches[0]
    if cfg["model_type"] not in ARCHITECTURES:
        raise ValueError(f"unsupported model_type {cfg['model_type']!r}; expected one of {sorted(ARCHITECTURES)}")
    if cfg.get("quantization_config"):
        raise ValueError("random checkpoints are unquantized; pass overrides={'quantization_config': None} for an "
                         "unquantized model of the same shape")
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [ARCHITECTURES[cfg["model_type"]]]
    cfg["torch_dtype"] = dtype
    cfg, hf_config = _complete_config(cfg)
    _check_param_count(hf_config, cfg)

    tok_dir = tokenizer_from
    if tok_dir is None:
        from swiftlm.demo import demo_model_path  # not at module level: demo imports this module's writer

        demo_dir = demo_model_path()
        if (_tokenizer_vocab_size(demo_dir) or 0) <= cfg["vocab_size"]:
            tok_dir = demo_dir
            for key, value in (("bos_token_id", DEMO_ENDOFTEXT_ID), ("eos_token_id", DEMO_IM_END_ID)):
                if key not in (overrides or {}):
                    cfg[key] = value
    else:
        tok_vocab = _tokenizer_vocab_size(tok_dir)
        if tok_vocab is not None and tok_vocab > cfg["vocab_size"]:
            raise ValueError(f"tokenizer in {tok_dir} has {tok_vocab} tokens but the model's vocab_size is "
                             f"{cfg['vocab_size']}")

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if tok_dir is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tok_dir, name)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    write_random_weights(cfg, out_dir, dtype=DTYPES[dtype], seed=seed, max_shard_bytes=max_shard_bytes, device=device)
    return out_dir


def fp8_dynamic_quant_config(ignore: list[str]) -> dict[str, Any]:
    """`quantization_config` of a compressed-tensors FP8-dynamic checkpoint (e4m3 weights with per-channel scales,
    per-token dynamic activations); modules named in `ignore` stay 16-bit."""
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False, "symmetric": True},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True,
                                  "symmetric": True}}},
        "ignore": list(ignore),
    }
