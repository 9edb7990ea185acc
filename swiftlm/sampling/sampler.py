"""The sampler: logits [B, V] + SamplingBatch -> one token per row (+ logprobs), with no host sync.

Per step: penalties -> min_tokens mask -> (all greedy: argmax) -> temperature -> top-k -> top-p -> min-p ->
seeded Gumbel-max draw. Every filter is reduced to one logit threshold per row (keep `logit >= thresh`, so tokens
tied at the boundary are always kept together and the kept set does not depend on how a sort orders ties); the
draw then applies temperature, threshold and noise in a single pass over the vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from swiftlm.sampling.batch import SamplingBatch
from swiftlm.sampling.gumbel import gumbel_argmax


@dataclass(slots=True)
class SamplerOutput:
    """Sampled tokens, on the logits' device (the engine moves them with one `.tolist()`).

    Logprobs are present when any row asked for them and come from the raw model logits (before penalties,
    temperature and filters). `top_ids`/`top_logprobs` are [B, K] with K the largest request, sorted by descending
    logprob; a row that asked for k uses its first k columns, rows that asked for none ignore theirs.
    """

    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None = None  # [B] float32, logprob of the sampled token
    top_ids: Tensor | None = None  # [B, K] int64
    top_logprobs: Tensor | None = None  # [B, K] float32


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Repetition (HF: divide positive / multiply negative logits of tokens seen in prompt or output), then
    presence and frequency (OpenAI: subtract per output occurrence). Returns a new tensor."""
    counts = batch.output_counts
    in_output = counts > 0
    if batch.repetition_penalty is not None:
        rep = batch.repetition_penalty
        seen = in_output | batch.prompt_mask
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    if batch.presence_penalty is not None:
        logits = logits - counts * batch.frequency_penalty - in_output * batch.presence_penalty
    return logits


def filter_thresholds(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[B] float32 logit threshold combining top-k, top-p and min-p (-inf where a row filters nothing).

    top-k keeps logits >= the k-th largest. top-p walks the top-k set in descending order and keeps the shortest
    prefix whose probability mass (after temperature) reaches p; the threshold is the last kept logit. min-p keeps
    tokens with prob >= min_p * max prob, i.e. logit >= max + log(min_p) * T. The top-p mass is summed in float64
    from one prefix scan.
    """
    rows, vocab = logits.shape
    thresh = torch.full((rows,), float("-inf"), device=logits.device, dtype=torch.float32)
    width = batch.candidate_width
    top = None
    if width:
        # Sorted candidates: a partial top-k when every filtered row has top-k, else a full sort.
        vals = logits.sort(-1, descending=True).values if width == vocab else logits.topk(width, -1).values
        top = vals[:, 0]
        k = batch.top_k
        kth_pos = (k.clamp(max=width) - 1)[:, None]
        kth = vals.gather(1, kth_pos).squeeze(1)
        if batch.any_top_k:
            thresh = torch.where(k < vocab, kth, thresh)
        if batch.any_top_p:
            x = vals * batch.inv_temperature[:, None]
            valid = torch.arange(width, device=logits.device)[None, :] < k[:, None]
            e = torch.where(valid, torch.exp((x - x[:, :1]).double()), 0.0)
            csum = e.cumsum(-1)
            mass = csum.gather(1, kth_pos).squeeze(1)
            if batch.count_top_k_ties:
                # Tokens tied with the k-th logit beyond the candidate list still belong to the top-k set.
                tied = (logits >= thresh[:, None]).sum(-1) - k
                mass = mass + tied * e.gather(1, kth_pos).squeeze(1)
            before = F.pad(csum[:, :-1], (1, 0))
            kept = ((before < (batch.top_p * mass)[:, None]) & valid).sum(-1)
            last = vals.gather(1, (kept - 1).clamp(min=0)[:, None]).squeeze(1)
            thresh = torch.where(batch.top_p < 1.0, torch.maximum(thresh, last), thresh)
    if batch.any_min_p:
        if top is None:
            top = logits.amax(-1)
        thresh = torch.maximum(thresh, top + batch.min_p_offset)
    return thresh


class Sampler:
    """Stateless: all per-request state (seed, step, history) arrives in the SamplingBatch."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        """Sample one token per row of fp32 `logits` [B, V]; `logits` itself is never modified."""
        if tuple(logits.shape) != (batch.num_rows, batch.vocab_size):
            raise ValueError(f"logits shape {tuple(logits.shape)} does not match the batch "
                             f"({batch.num_rows}, {batch.vocab_size})")
        raw = logits
        if batch.any_penalty:
            logits = apply_penalties(logits, batch)
        if batch.min_tokens_index is not None:
            if logits is raw:
                logits = logits.clone()
            logits[batch.min_tokens_index[0], batch.min_tokens_index[1]] = float("-inf")
        if batch.all_greedy:
            token_ids = logits.argmax(-1)
        else:
            thresh = filter_thresholds(logits, batch) if batch.any_filter else None
            token_ids = gumbel_argmax(logits, batch.inv_temperature, thresh, batch.keys, batch.random)
        out = SamplerOutput(token_ids=token_ids)
        if batch.any_logprobs:
            logprobs = torch.log_softmax(raw.float(), dim=-1)
            out.logprobs = logprobs.gather(1, token_ids[:, None]).squeeze(1)
            out.top_logprobs, out.top_ids = logprobs.topk(batch.max_logprobs, dim=-1)
        return out
