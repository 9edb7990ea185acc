"""The embedded demo model: a tiny Qwen3 with deterministic random weights and a tokenizer built locally.

It lets `swiftlm` run, serve and be tested with no download. Everything is generated from data shipped in the
package (a small English corpus) and fixed seeds, so every machine builds byte-identical files; the result is
cached and written atomically (temp dir + rename), so concurrent first uses are safe.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from typing import Any

import torch

from swiftlm.testing import DEMO_ENDOFTEXT_ID, DEMO_IM_END_ID, DEMO_VOCAB_SIZE, write_random_weights

DEMO_NAME = "demo-v1"
SEED = 20240601
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = DEMO_ENDOFTEXT_ID, DEMO_ENDOFTEXT_ID + 1, DEMO_IM_END_ID

# The pre-tokenizer split Qwen2/Qwen3 use: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines and whitespace. No NFC normaliser (unlike Qwen), so any UTF-8 text round-trips.
_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = (message['content'] or []) | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

DEMO_CONFIG: dict[str, Any] = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": DEMO_VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": 2,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "torch_dtype": "float32",
}


def _default_cache_root() -> str:
    return os.environ.get("SWIFTLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "swiftlm")


def demo_model_path(cache_dir: str | None = None) -> str:
    """Directory of the demo checkpoint, `<cache_dir>/demo-v1`, built on first use.

    `cache_dir` defaults to `$SWIFTLM_CACHE`, else `~/.cache/swiftlm`. The version suffix changes whenever the
    generated files would, so a stale cache is never reused.
    """
    root = cache_dir or _default_cache_root()
    final = os.path.join(root, DEMO_NAME)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{DEMO_NAME}.tmp-", dir=root)
    try:
        build_demo_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its build into place first; its files are identical to ours.
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_demo_tokenizer() -> Any:
    """Train the demo's byte-level BPE on the shipped corpus; training is deterministic for a fixed corpus."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = resources.files("swiftlm").joinpath("demo_corpus.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB_SIZE - len(SPECIAL_TOKENS), min_frequency=0,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if tok.get_vocab_size() != DEMO_VOCAB_SIZE or ids != [ENDOFTEXT_ID, IM_START_ID, IM_END_ID]:
        raise RuntimeError(f"demo tokenizer came out with {tok.get_vocab_size()} tokens and special ids {ids}")
    return tok


def _tokenizer_config() -> dict[str, Any]:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True}
             for i, t in zip((ENDOFTEXT_ID, IM_START_ID, IM_END_ID), SPECIAL_TOKENS)}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": DEMO_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def build_demo_model(out_dir: str) -> None:
    """Write the demo checkpoint (config, weights, tokenizer, generation config) into an existing directory."""
    build_demo_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config())
    _write_json(os.path.join(out_dir, "config.json"), DEMO_CONFIG)
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": ENDOFTEXT_ID, "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
                 "pad_token_id": ENDOFTEXT_ID})
    write_random_weights(DEMO_CONFIG, out_dir, dtype=torch.float32, seed=SEED)
