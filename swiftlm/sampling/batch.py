"""Per-step sampling inputs: the host gathers every row's settings into a few packed tensors, copies each to the
device once (non-blocking, from pinned memory on CUDA), and records which stages any row needs so the sampler
skips the rest."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from swiftlm.sampling.gumbel import row_key
from swiftlm.sampling_params import SamplingParams

# Temperatures below this sample greedily: 1/T would overflow the logits long before the draw stops being argmax.
GREEDY_TEMPERATURE = 1e-5

# Rows of the packed float tensor.
_INV_T, _TOP_P, _MIN_P_OFFSET, _REPETITION, _PRESENCE, _FREQUENCY = range(6)


@dataclass(slots=True)
class SamplingRow:
    """One sequence that samples a token this step.

    `seed` is always set (the request's seed or one the engine drew at arrival); `step` counts the tokens the
    request has generated so far; `eos_token_ids` come from the tokenizer/generation config and are masked,
    together with `params.stop_token_ids`, while `step < params.min_tokens` (EOS is left alone with `ignore_eos`).
    All token ids must be below the vocabulary size.
    """

    params: SamplingParams
    seed: int
    step: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SamplingBatch:
    """Device tensors and host flags for one sampler call; tensors a batch does not need are None.

    Filter settings are normalised so that a disabled filter is a no-op: greedy rows carry `inv_temperature=1`,
    `top_k=V`, `top_p=1` and `min_p_offset=-inf`.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    # Width of the sorted candidate list the filters need: 0 (none), max top-k, or V (full sort for top-p rows
    # without top-k).
    candidate_width: int
    # Some row has both top-k and top-p: the top-p mass must count tokens tied with the k-th logit.
    count_top_k_ties: bool
    max_logprobs: int | None
    inv_temperature: Tensor | None = None  # [B] float32
    random: Tensor | None = None  # [B] bool, False for greedy rows
    keys: Tensor | None = None  # [2, B] int64 noise key halves (gumbel.row_key)
    top_k: Tensor | None = None  # [B] int64 in [1, V]
    top_p: Tensor | None = None  # [B] float64
    min_p_offset: Tensor | None = None  # [B] float32: log(min_p) * temperature, a logit-space offset from the max
    repetition_penalty: Tensor | None = None  # [B, 1] float32, only when some row sets it
    presence_penalty: Tensor | None = None  # [B, 1] float32, only with presence/frequency penalties
    frequency_penalty: Tensor | None = None  # [B, 1] float32
    output_counts: Tensor | None = None  # [B, V] float32 occurrences of each token in the output
    prompt_mask: Tensor | None = None  # [B, V] bool, token occurs in the prompt (repetition penalty only)
    min_tokens_index: Tensor | None = None  # [2, N] int64 (row, token) pairs masked by min_tokens

    @property
    def any_filter(self) -> bool:
        return self.any_top_k or self.any_top_p or self.any_min_p

    @property
    def any_penalty(self) -> bool:
        return self.output_counts is not None

    @property
    def any_logprobs(self) -> bool:
        return self.max_logprobs is not None

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device) -> SamplingBatch:
        """Gather `rows` into device tensors with at most three host-to-device copies."""
        device = torch.device(device)
        n = len(rows)
        vocab = vocab_size
        inv_t, top_p, min_p_off, rep, pres, freq = ([0.0] * n for _ in range(6))
        key_lo, key_hi, top_k, random = ([0] * n for _ in range(4))
        any_top_k = any_top_p = any_min_p = any_rep = any_pres_freq = False
        full_sort = count_ties = False
        max_k = 0
        max_logprobs: int | None = None
        min_tok_pairs: list[tuple[int, int]] = []
        for i, row in enumerate(rows):
            p = row.params
            if p.logprobs is not None:
                max_logprobs = p.logprobs if max_logprobs is None else max(max_logprobs, p.logprobs)
            rep[i], pres[i], freq[i] = p.repetition_penalty, p.presence_penalty, p.frequency_penalty
            any_rep |= p.repetition_penalty != 1.0
            any_pres_freq |= p.presence_penalty != 0.0 or p.frequency_penalty != 0.0
            if row.step < p.min_tokens:
                banned = p.stop_token_ids if p.ignore_eos else chain(p.stop_token_ids, row.eos_token_ids)
                min_tok_pairs.extend((i, t) for t in set(banned) if t < vocab)
            if p.temperature < GREEDY_TEMPERATURE:
                inv_t[i], top_k[i], top_p[i], min_p_off[i] = 1.0, vocab, 1.0, -math.inf
                continue
            random[i] = 1
            key_lo[i], key_hi[i] = row_key(row.seed, row.step)
            inv_t[i] = 1.0 / p.temperature
            k = p.top_k if 0 < p.top_k < vocab else vocab
            top_k[i], top_p[i] = k, p.top_p
            min_p_off[i] = math.log(p.min_p) * p.temperature if p.min_p > 0.0 else -math.inf
            has_k, has_p = k < vocab, p.top_p < 1.0
            any_top_k |= has_k
            any_top_p |= has_p
            any_min_p |= p.min_p > 0.0
            if has_k:
                max_k = max(max_k, k)
            full_sort |= has_p and not has_k
            count_ties |= has_p and has_k
        all_greedy = not any(random)
        any_penalty = any_rep or any_pres_freq
        batch = cls(
            num_rows=n, vocab_size=vocab, all_greedy=all_greedy, any_top_k=any_top_k, any_top_p=any_top_p,
            any_min_p=any_min_p, candidate_width=vocab if full_sort else max_k, count_top_k_ties=count_ties,
            max_logprobs=max_logprobs)

        if not all_greedy or any_penalty:
            floats = _to_device(torch.tensor([inv_t, top_p, min_p_off, rep, pres, freq], dtype=torch.float64),
                                device)
            floats32 = floats.to(torch.float32)
            if not all_greedy:
                ints = _to_device(torch.tensor([key_lo, key_hi, top_k, random], dtype=torch.int64), device)
                batch.inv_temperature = floats32[_INV_T]
                batch.min_p_offset = floats32[_MIN_P_OFFSET]
                batch.top_p = floats[_TOP_P]
                batch.keys = ints[:2]
                batch.top_k = ints[2]
                batch.random = ints[3].bool()
            if any_rep:
                batch.repetition_penalty = floats32[_REPETITION][:, None]
            if any_pres_freq:
                batch.presence_penalty = floats32[_PRESENCE][:, None]
                batch.frequency_penalty = floats32[_FREQUENCY][:, None]

        out_flat, prompt_flat = _penalty_token_index(rows, vocab, any_penalty, any_rep)
        min_tok = np.asarray(min_tok_pairs, dtype=np.int64).reshape(-1, 2).T.reshape(-1)
        if any_penalty or min_tok.size:
            index = _to_device(torch.from_numpy(np.concatenate([out_flat, prompt_flat, min_tok])), device)
            n_out, n_prompt = out_flat.size, prompt_flat.size
            if any_penalty:
                counts = torch.zeros(n * vocab, device=device, dtype=torch.float32)
                counts.scatter_add_(0, index[:n_out], torch.ones(n_out, device=device, dtype=torch.float32))
                batch.output_counts = counts.view(n, vocab)
            if any_rep:
                mask = torch.zeros(n * vocab, device=device, dtype=torch.bool)
                mask[index[n_out:n_out + n_prompt]] = True
                batch.prompt_mask = mask.view(n, vocab)
            if min_tok.size:
                batch.min_tokens_index = index[n_out + n_prompt:].view(2, -1)
        return batch


def _penalty_token_index(rows: list[SamplingRow], vocab: int, any_penalty: bool,
                         any_rep: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flat `row * V + token` indices of output tokens (rows with any penalty) and prompt tokens (rows with a
    repetition penalty); rows without penalties contribute nothing, so unpenalised batches cost nothing here."""
    empty = np.empty(0, dtype=np.int64)
    if not any_penalty:
        return empty, empty
    out_rows = [i for i, r in enumerate(rows) if r.params.penalized]
    prompt_rows = [i for i in out_rows if rows[i].params.repetition_penalty != 1.0] if any_rep else []
    return (_flat_index([rows[i].output_token_ids for i in out_rows], out_rows, vocab),
            _flat_index([rows[i].prompt_token_ids for i in prompt_rows], prompt_rows, vocab))


def _flat_index(id_lists: list[list[int]], row_ids: list[int], vocab: int) -> np.ndarray:
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    tokens = np.fromiter(chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum()))
    return np.repeat(np.asarray(row_ids, dtype=np.int64) * vocab, lengths) + tokens


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """One non-blocking copy; pinned staging on CUDA so the copy is truly asynchronous."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
