"""Paged attention: QK-norm + RoPE + KV-cache write in one kernel, then attention over the cache.

The model runner publishes one `AttentionMetadata` per forward through `forward_context`; every layer reads it,
so model code stays free of batching details. Decode-only steps use the split-K decode kernel (and are what
CUDA graphs capture). Mixed steps (running decodes plus prompt chunks, the bulk of offline throughput) send their
leading one-token rows to the same decode kernel and only the prompt rows to prefill attention: a prefill kernel
given a one-row query tile wastes all but one row of every tile it loads.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from swiftlm.kernels import attention as kernels
from swiftlm.kernels import rope

_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]

# cuDNN builds an execution plan for every new (length, layout) it sees: 50-140 ms on the first call of a length
# on the H100 (`benchmarks/bench_gqa_sdpa.py --cold`), against ~1 ms to run 8000 tokens. So it only ever sees
# multiples of FRESH_ALIGN rows (at most max_num_batched_tokens / FRESH_ALIGN plans per process); the last
# `n % FRESH_ALIGN` queries of a fresh prompt go to the paged kernel over the keys already in the cache.
FRESH_ALIGN = 256
# Query tile of the paged kernel when it only has those leftover queries: with its usual 128-row tiles a 64-query
# tail of an 8000-token prompt ran one program per head, each walking all 8000 keys.
TAIL_BLOCK_M = 16


def cudnn_rows(prompt_len: int) -> int:
    """How many leading queries of a fresh prompt cuDNN computes (the rest take the paged kernel)."""
    return prompt_len // FRESH_ALIGN * FRESH_ALIGN


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
                            scale: float, out: torch.Tensor | None = None,
                            rows: list[int] | None = None) -> torch.Tensor:
    """Causal attention of prompts with no cached prefix, straight on their new q `[T, Hq, D]` and k/v
    `[T, Hkv, D]` (sequences back to back, `lens` tokens each) with SDPA, one call per sequence.

    GQA without copies: batch = kv head, heads = that head's query group, and k/v expanded along the group
    with stride 0, all views of the QKV projection's output; cuDNN takes these strides as they are. On the
    H100 that beat repeating k/v to every query head by 20% at 8000 tokens and 40% at 1024
    (`benchmarks/bench_gqa_sdpa.py`, output reshape included). The output is reshaped back to token-major
    `[T, Hq, D]`: a view when the backend returns q's layout, so one sequence without `out` costs no copy.
    With `out` ([T, Hq, D]) each sequence's result is written into its rows there; `rows` (needs `out`) limits
    sequence i to its first rows[i] queries, which attend only to each other (causal), so they are exact."""
    _, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    outs = []
    starts = [sum(lens[:i]) for i in range(len(lens))]
    for start, n in zip(starts, rows if rows is not None else lens):
        if n == 0:
            continue
        qi = q[start:start + n].view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        ki = k[start:start + n].permute(1, 0, 2)[:, None].expand(num_kv_heads, group, n, head_dim)
        vi = v[start:start + n].permute(1, 0, 2)[:, None].expand(num_kv_heads, group, n, head_dim)
        oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale).permute(2, 0, 1, 3)
        if out is not None:
            out[start:start + n].view(n, num_kv_heads, group, head_dim).copy_(oi)
        else:
            outs.append(oi.reshape(n, num_heads, head_dim))
    if out is not None:
        return out
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def warm_fresh_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
                         device: torch.device, max_tokens: int) -> int:
    """Build cuDNN's plans for every aligned fresh-prompt length up to `max_tokens` now, at start-up, on q/k/v
    laid out as the QKV projection hands them over (the plan cache keys on strides too), so no request pays a
    plan build. Returns how many lengths were warmed."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.zeros(FRESH_ALIGN * (max_tokens // FRESH_ALIGN), width, dtype=dtype, device=device)
    lengths = list(range(FRESH_ALIGN, qkv.shape[0] + 1, FRESH_ALIGN))
    with sdpa_kernel(_SDPA_BACKENDS, set_priority=True):
        for n in lengths:
            q, k, v = qkv[:n].split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
            fresh_prefill_attention(q.view(n, num_heads, head_dim), k.view(n, num_kv_heads, head_dim),
                                    v.view(n, num_kv_heads, head_dim), [n], scale)
    return len(lengths)


@dataclass
class AttentionMetadata:
    """Batch layout for one forward. Tensors live on the model's device.

    slot_mapping: [T] cache slot of each new token. block_tables: [B, max_blocks] int32. seq_lens: [B] int32,
    tokens in the cache per sequence after this step. num_decodes: on steps with prefill tokens, how many
    leading sequences have exactly one new token (tokens 0..num_decodes-1); they run the decode kernel.
    cu_seqlens_q: [B-num_decodes+1] int32 offsets of the other sequences' new tokens, counted from token
    num_decodes (None on decode-only steps, where every sequence has exactly one). fresh_prefill_lens: host-side
    lengths of the trailing sequences that start at position 0 (no cached prefix), whose `cudnn_rows` leading
    queries SDPA computes on their new K/V directly. paged_q_starts / paged_cu_seqlens / paged_max_q (set with
    fresh_prefill_lens): the rows the paged kernel computes for each sequence after the decodes, i.e. all of a
    continued prompt's and the unaligned last queries of a fresh one (counts from the cumulative offsets).
    padded_tokens: the flat batch ends with tokens of no sequence (prefill
    CUDA graphs); their attention output is zeroed so no NaN reaches later layers (e.g. an MoE router).
    num_real_tokens: [1] int32, set on CUDA-graph steps whose batch ends with padding tokens (decode rows or
    prefill tokens of no sequence): how many leading tokens are real, for MoE expert statistics.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 1
    num_decodes: int = 0
    paged_q_starts: torch.Tensor | None = None
    paged_cu_seqlens: torch.Tensor | None = None
    paged_max_q: int = 0
    decode_num_splits: int | None = None
    fresh_prefill_lens: list[int] | None = None
    padded_tokens: bool = False
    num_real_tokens: torch.Tensor | None = None

    @property
    def decode_only(self) -> bool:
        return self.cu_seqlens_q is None


_context: AttentionMetadata | None = None


@contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[None]:
    global _context
    previous, _context = _context, meta
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> AttentionMetadata:
    if _context is None:
        raise RuntimeError("attention called outside forward_context(); the model runner sets it")
    return _context


def current_forward_context() -> AttentionMetadata | None:
    """The metadata of the forward in progress, if any (layers usable outside the engine, e.g. MoE, ask this)."""
    return _context


def rope_and_store_kv(attn: "Attention", positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, cos_sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None,
                      k_norm_weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Optional per-head RMSNorm of q/k, RoPE, and the write of k/v into `attn`'s cache slots, as one kernel."""
    fn = rope.rope_qk_norm_cache if q.is_cuda else rope.rope_qk_norm_cache_ref
    return fn(q, k, v, positions, cos_sin_cache, attn.k_cache, attn.v_cache, get_forward_context().slot_mapping,
              q_norm_weight, k_norm_weight, eps, attn.k_scale, attn.v_scale)


class Attention(nn.Module):
    """Attention over the paged KV cache. The runner binds `k_cache`/`v_cache` after allocating them.

    `k_scale`/`v_scale` are the per-tensor scales of an FP8 cache (stored value = x / scale): 1.0 unless the
    checkpoint provides them; a 16-bit cache ignores them.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale = 1.0
        self.v_scale = 1.0

    def _cache_scales(self) -> dict[str, float]:
        assert self.k_cache is not None
        if self.k_cache.dtype.itemsize == 1:
            return {"k_scale": self.k_scale, "v_scale": self.v_scale}
        return {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (already in the cache) -> [T, Hq, D]."""
        meta = get_forward_context()
        if meta.decode_only:
            return self._decode(q, meta.block_tables, meta.seq_lens, meta.decode_num_splits)
        d = meta.num_decodes
        if not (d or meta.padded_tokens):
            return self._prefill(q, k, v, meta, None)
        alloc = torch.zeros if meta.padded_tokens else torch.empty
        out = alloc(q.shape, dtype=q.dtype, device=q.device)
        if d:
            self._decode(q[:d], meta.block_tables[:d], meta.seq_lens[:d], None, out[:d])
        if d < q.shape[0]:
            self._prefill(q[d:], k[d:], v[d:], meta, out[d:])
        return out

    def _decode(self, q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, num_splits: int | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        if q.is_cuda:
            return kernels.paged_decode_attention(q, self.k_cache, self.v_cache, block_tables, seq_lens, self.scale,
                                                  num_splits, out, **self._cache_scales())
        return kernels.paged_decode_attention_ref(q, self.k_cache, self.v_cache, block_tables, seq_lens, self.scale,
                                                  out, **self._cache_scales())

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 out: torch.Tensor | None) -> torch.Tensor:
        """The prompt rows (those after the step's decodes). Without fresh prompts, the paged kernel does all.
        With them, the paged kernel takes the continued prompts and each fresh prompt's unaligned last queries
        (`paged_*` in the metadata), and SDPA (cuDNN on the GPU) the fresh prompts' aligned leading queries."""
        d = meta.num_decodes
        fn = kernels.paged_prefill_attention if q.is_cuda else kernels.paged_prefill_attention_ref
        fresh = meta.fresh_prefill_lens
        if not fresh:
            return fn(q, self.k_cache, self.v_cache, meta.block_tables[d:], meta.cu_seqlens_q, meta.seq_lens[d:],
                      self.scale, meta.max_seqlen_q, out, **self._cache_scales())
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.paged_max_q:
            extra = {"q_starts": meta.paged_q_starts}
            if q.is_cuda and meta.paged_max_q < FRESH_ALIGN:  # only short tails over long keys: more programs
                extra["block_m"] = TAIL_BLOCK_M
            fn(q, self.k_cache, self.v_cache, meta.block_tables[d:], meta.paged_cu_seqlens, meta.seq_lens[d:],
               self.scale, meta.paged_max_q, out, **self._cache_scales(), **extra)
        start = q.shape[0] - sum(fresh)
        with sdpa_kernel(_SDPA_BACKENDS, set_priority=True) if q.is_cuda else nullcontext():
            fresh_prefill_attention(q[start:], k[start:], v[start:], fresh, self.scale, out[start:],
                                    [cudnn_rows(n) for n in fresh])
        return out
