"""Benchmark workloads. Prompts are built from token ids wherever possible so their length is exact, not estimated."""
from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

# Token ids drawn when no tokenizer is given: inside every Qwen vocabulary and clear of special/control ids.
DEFAULT_ID_RANGE = (1000, 30000)

# Text fallback for chat endpoints without a tokenizer: common words, mostly one BPE token each after a space.
WORDS = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his",
    "they", "at", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what", "all",
    "were", "we", "when", "your", "can", "said", "there", "use", "an", "each", "which", "she", "do", "how", "their",
    "if", "will", "up", "other", "about", "out", "many", "then", "them", "these", "so", "some", "her", "would",
    "make", "like", "him", "into", "time", "has", "look", "two", "more", "write", "go", "see", "number", "no", "way",
    "could", "people", "my", "than", "first", "water", "been", "call", "who", "oil", "its", "now", "find", "long",
    "down", "day", "did", "get", "come", "made", "may", "part"
)


class Tokenizer(Protocol):
    """The slice of a Hugging Face tokenizer the datasets use."""

    vocab_size: int
    all_special_ids: list[int]

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class SampleRequest:
    """One benchmark request.

    `prompt` is token ids (exact length), text, or chat messages. `prompt_len` is None when the length is only
    known once the server reports `usage.prompt_tokens`.
    """

    prompt: list[int] | str | list[dict[str, Any]]
    prompt_len: int | None
    max_tokens: int


def sample_lengths(mean: int, range_ratio: float, num: int, rng: np.random.Generator) -> list[int]:
    """Lengths uniform in [mean*(1-r), mean*(1+r)] (vLLM's --random-range-ratio semantics), at least 1."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    low, high = max(1, math.floor(mean * (1 - range_ratio))), max(1, math.ceil(mean * (1 + range_ratio)))
    return [int(x) for x in rng.integers(low, high + 1, size=num)]


def token_pool(tokenizer: Tokenizer | None, vocab_size: int | None = None) -> np.ndarray:
    """Ids safe to put in a random prompt: the tokenizer's regular vocabulary, else DEFAULT_ID_RANGE."""
    if tokenizer is None:
        low, high = DEFAULT_ID_RANGE
        if vocab_size is not None:
            high = min(high, vocab_size)
            low = min(low, high // 2)
        return np.arange(low, high)
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(tokenizer.vocab_size) if i not in special])


def _random_ids(pool: np.ndarray, n: int, rng: np.random.Generator) -> list[int]:
    return [int(x) for x in rng.choice(pool, size=n)]


def _to_endpoint(ids: list[int], max_tokens: int, chat: bool, tokenizer: Tokenizer | None) -> SampleRequest:
    """Token ids go to /v1/completions as-is; chat needs text, decoded or, with no tokenizer, one word per id.

    The id -> word map is fixed so that shared prefixes stay shared after the conversion.
    """
    if not chat:
        return SampleRequest(prompt=ids, prompt_len=len(ids), max_tokens=max_tokens)
    if tokenizer is not None:
        text = tokenizer.decode(ids)
    else:
        text = " ".join(WORDS[i % len(WORDS)] for i in ids)
    return SampleRequest(prompt=[{"role": "user", "content": text}], prompt_len=None, max_tokens=max_tokens)


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float = 0.0, seed: int = 0,
                    tokenizer: Tokenizer | None = None, chat: bool = False,
                    vocab_size: int | None = None) -> list[SampleRequest]:
    """Prompts of uniformly random token ids (optionally varied in length) with fixed-budget outputs."""
    rng = np.random.default_rng(seed)
    pool = token_pool(tokenizer, vocab_size)
    in_lens = sample_lengths(input_len, range_ratio, num, rng)
    out_lens = sample_lengths(output_len, range_ratio, num, rng)
    return [_to_endpoint(_random_ids(pool, n_in, rng), n_out, chat, tokenizer)
            for n_in, n_out in zip(in_lens, out_lens, strict=True)]


def shared_prefix_requests(num: int, prefix_len: int, num_prefixes: int, input_len: int, output_len: int,
                           range_ratio: float = 0.0, seed: int = 0, tokenizer: Tokenizer | None = None,
                           chat: bool = False) -> list[SampleRequest]:
    """`num_prefixes` random prefixes shared round-robin, each followed by a unique random suffix.

    Exercises prefix caching: request i reuses prefix i % num_prefixes, so every prefix recurs num/num_prefixes times.
    """
    if num_prefixes < 1 or prefix_len < 0:
        raise ValueError("num_prefixes must be >= 1 and prefix_len >= 0")
    rng = np.random.default_rng(seed)
    pool = token_pool(tokenizer)
    prefixes = [_random_ids(pool, prefix_len, rng) for _ in range(num_prefixes)]
    suffix_lens = sample_lengths(input_len, range_ratio, num, rng)
    out_lens = sample_lengths(output_len, range_ratio, num, rng)
    return [_to_endpoint(prefixes[i % num_prefixes] + _random_ids(pool, suffix_lens[i], rng), out_lens[i], chat,
                         tokenizer) for i in range(num)]


def read_jsonl(path: str | Path) -> list[tuple[str | list[dict[str, Any]], int | None]]:
    """Lines `{"prompt": str}` or `{"messages": [...]}`, each with an optional `"max_tokens"`; blank lines skipped."""
    rows: list[tuple[str | list[dict[str, Any]], int | None]] = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        max_tokens = int(item["max_tokens"]) if "max_tokens" in item else None
        if "messages" in item:
            rows.append((list(item["messages"]), max_tokens))
        elif "prompt" in item:
            rows.append((str(item["prompt"]), max_tokens))
        else:
            raise ValueError(f"{path}:{lineno}: expected a 'prompt' or 'messages' field")
    if not rows:
        raise ValueError(f"{path} holds no requests")
    return rows


def jsonl_requests(path: str | Path, num: int, default_max_tokens: int, chat: bool,
                   tokenizer: Tokenizer | None = None) -> list[SampleRequest]:
    """Requests for an endpoint from a JSONL file, cycled to reach `num`.

    Text prompts sent to a chat endpoint become one user message; message lists need the chat endpoint, since
    turning them into a completion prompt would need the server's chat template.
    """
    out: list[SampleRequest] = []
    rows = read_jsonl(path)
    for i in range(num):
        prompt, max_tokens = rows[i % len(rows)]
        budget = default_max_tokens if max_tokens is None else max_tokens
        if isinstance(prompt, list):
            if not chat:
                raise ValueError(f"{path}: 'messages' lines need --endpoint /v1/chat/completions")
            out.append(SampleRequest(prompt=prompt, prompt_len=None, max_tokens=budget))
        elif chat:
            out.append(SampleRequest(prompt=[{"role": "user", "content": prompt}], prompt_len=None, max_tokens=budget))
        else:
            prompt_len = len(tokenizer.encode(prompt, add_special_tokens=False)) if tokenizer is not None else None
            out.append(SampleRequest(prompt=prompt, prompt_len=prompt_len, max_tokens=budget))
    return out


def load_tokenizer(path: str | None) -> Tokenizer | None:
    """Hugging Face tokenizer from a local path or hub id; imported lazily so `bench serve` works without it."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def build_requests(dataset: str, num: int, *, chat: bool, tokenizer: Tokenizer | None, seed: int,
                   input_len: int, output_len: int, range_ratio: float, dataset_path: str | None = None,
                   prefix_len: int = 0, num_prefixes: int = 1) -> list[SampleRequest]:
    """Dispatch on the dataset name the CLI was given."""
    if dataset in ("random", "shared-prefix") and chat and tokenizer is None:
        print("note: chat endpoint without --tokenizer: random prompts are words, so input length is taken "
              "from the server's usage.prompt_tokens", file=sys.stderr)
    if dataset == "random":
        return random_requests(num, input_len, output_len, range_ratio, seed, tokenizer, chat)
    if dataset == "shared-prefix":
        return shared_prefix_requests(num, prefix_len, num_prefixes, input_len, output_len, range_ratio, seed,
                                      tokenizer, chat)
    if dataset == "jsonl":
        if not dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        return jsonl_requests(dataset_path, num, output_len, chat, tokenizer)
    raise ValueError(f"unknown dataset {dataset!r}")
