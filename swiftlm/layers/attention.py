"""Paged attention: QK-norm + RoPE + KV-cache write in one kernel, then attention over the cache.

The model runner publishes one `AttentionMetadata` per forward through `forward_context`; every layer reads it,
so model code stays free of batching details. Decode-only steps use the split-K decode kernel (and are what
CUDA graphs capture); on the GPU it also does the QK-norm, RoPE and cache write of the new token itself. Mixed
steps (running decodes plus prompt chunks, the bulk of offline throughput) send their leading one-token rows to
the same decode kernel and only the prompt rows to prefill attention: a prefill kernel given a one-row query
tile wastes all but one row of every tile it loads.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from swiftlm.kernels import attention as kernels
from swiftlm.kernels import rope

# cuDNN builds an execution plan for every new (length, layout) it sees: 50-140 ms on the first call of a length
# on the H100 (`benchmarks/bench_gqa_sdpa.py --cold`), against ~1 ms to run 8000 tokens. So it only ever sees
# multiples of FRESH_ALIGN rows (at most max_num_batched_tokens / FRESH_ALIGN plans per process, all built at
# start-up); the last `n % FRESH_ALIGN` queries of a fresh prompt go to FlashAttention, which builds nothing.
FRESH_ALIGN = 256


def cudnn_rows(prompt_len: int) -> int:
    """How many leading queries of a fresh prompt cuDNN computes (the rest take FlashAttention)."""
    return prompt_len // FRESH_ALIGN * FRESH_ALIGN


def _by_kv_head(x: torch.Tensor, num_kv_heads: int, group: int) -> torch.Tensor:
    """Token-major `[n, Hq, D]` queries as `[Hkv, group, n, D]` (a view)."""
    n, _, head_dim = x.shape
    return x.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)


def _shared_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """Token-major `[n, Hkv, D]` keys or values as `[Hkv, group, n, D]`, the group axis of stride 0 (a view)."""
    n, num_kv_heads, head_dim = x.shape
    return x.permute(1, 0, 2)[:, None].expand(num_kv_heads, group, n, head_dim)


def fresh_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
                            scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of prompts with no cached prefix, straight on their new q `[T, Hq, D]` and k/v
    `[T, Hkv, D]` (sequences back to back, `lens` tokens each) with SDPA, into `out` (`[T, Hq, D]`, made when
    not given).

    GQA without copies: batch = kv head, heads = that head's query group, and k/v expanded along the group
    with stride 0, all views of the QKV projection's output; cuDNN and FlashAttention take these strides as they
    are. On the H100 that beat repeating k/v to every query head by 20% at 8000 tokens and 40% at 1024
    (`benchmarks/bench_gqa_sdpa.py`). Each prompt of n tokens takes two calls on the GPU: its first
    `cudnn_rows(n)` queries, which attend only to each other (causal), as a square cuDNN problem; then its last
    queries over all n keys with the causal mask aligned bottom-right, which FlashAttention splits over the keys
    (a 64-query tail of an 8000-token prompt would otherwise keep one program per head walking 8000 keys)."""
    num_kv_heads = k.shape[1]
    group = q.shape[1] // num_kv_heads
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    start = 0
    for n in lens:
        aligned = cudnn_rows(n)
        if aligned:
            rows = slice(start, start + aligned)
            o = _causal_square(_by_kv_head(q[rows], num_kv_heads, group), _shared_kv(k[rows], group),
                               _shared_kv(v[rows], group), scale)
            _by_kv_head(out[rows], num_kv_heads, group).copy_(o)
        if aligned < n:
            rows, keys = slice(start + aligned, start + n), slice(start, start + n)
            o = _causal_tail(_by_kv_head(q[rows], num_kv_heads, group), _shared_kv(k[keys], group),
                             _shared_kv(v[keys], group), scale)
            _by_kv_head(out[rows], num_kv_heads, group).copy_(o)
        start += n
    return out


@lru_cache(maxsize=None)
def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def _direct(q: torch.Tensor, max_head_dim: int) -> bool:
    """Whether a backend is called directly: 16-bit operands on an sm90+ GPU and a head size it takes (every Qwen
    model's: 64 or 128). Elsewhere SDPA picks a backend."""
    head_dim = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and head_dim % 8 == 0
            and head_dim <= max_head_dim and _hopper(q.device))


def _causal_square(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of `[B, H, n, D]` views, n queries over the same n keys: cuDNN on an H100, called
    directly rather than through SDPA's backend selection and `sdpa_kernel`: their host time made a long prefill
    wait on the host (`profile_engine.py`'s host report)."""
    if _direct(q, 128):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True, False,
                                                                   scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _causal_tail(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The last queries of a prompt over all its keys (the causal mask aligned bottom-right): FlashAttention on
    the GPU, whose causal flag means bottom-right alignment when there are fewer queries than keys (what
    `causal_lower_right` dispatches to, without that dispatch's host time)."""
    if _direct(q, 256):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, scale=scale,
                                          attn_mask=causal_lower_right(q.shape[-2], k.shape[-2]))


def warm_fresh_attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, dtype: torch.dtype,
                         device: torch.device, max_tokens: int) -> int:
    """Build cuDNN's plans for every aligned fresh-prompt length up to `max_tokens` now, at start-up, on q/k/v
    laid out as the QKV projection hands them over (the plan cache keys on strides too), so no request pays a
    plan build. Returns how many lengths were warmed."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.zeros(FRESH_ALIGN * (max_tokens // FRESH_ALIGN), width, dtype=dtype, device=device)
    lengths = list(range(FRESH_ALIGN, qkv.shape[0] + 1, FRESH_ALIGN))
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
    lengths of the trailing sequences that start at position 0 (no cached prefix), which SDPA computes on their
    new K/V directly (`fresh_prefill_attention`); the paged kernel takes the prompts before them.
    padded_tokens: the flat batch ends with tokens of no sequence (prefill CUDA graphs); their attention output
    is zeroed so no NaN reaches later layers (e.g. an MoE router).
    num_real_tokens: [1] int32, set on CUDA-graph steps whose batch ends with padding tokens (decode rows or
    prefill tokens of no sequence): how many leading tokens are real, for MoE expert statistics.
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 1
    num_decodes: int = 0
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

    def forward_rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos_sin_cache: torch.Tensor, q_norm_weight: torch.Tensor | None,
                     k_norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """Attention of the raw projections q [T, Hq, D], k/v [T, Hkv, D]: (Q/K RMSNorm,) RoPE and the cache write
        first. Decode-only steps on the GPU do all of it inside the decode kernel (`kernels.DecodeRope`: one
        launch fewer per layer); other steps run the fused rope kernel, then `forward`."""
        meta = get_forward_context()
        if meta.decode_only and q.is_cuda:
            rope = kernels.DecodeRope(k, v, cos_sin_cache, meta.slot_mapping, q_norm_weight, k_norm_weight, eps)
            return kernels.paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens,
                                                  self.scale, meta.decode_num_splits, rope=rope,
                                                  **self._cache_scales())
        q, k = rope_and_store_kv(self, positions, q, k, v, cos_sin_cache, q_norm_weight, k_norm_weight, eps)
        return self(q, k, v)

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
        """The prompt rows (those after the step's decodes): the paged kernel for prompts that continue a cached
        prefix (all of them without `fresh_prefill_lens`), SDPA on their new K/V for the trailing fresh ones."""
        d = meta.num_decodes
        fn = kernels.paged_prefill_attention if q.is_cuda else kernels.paged_prefill_attention_ref
        fresh = meta.fresh_prefill_lens or []
        continued = meta.cu_seqlens_q.numel() - 1 - len(fresh)
        start = q.shape[0] - sum(fresh)
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if continued:
            fn(q[:start], self.k_cache, self.v_cache, meta.block_tables[d:d + continued],
               meta.cu_seqlens_q[:continued + 1], meta.seq_lens[d:d + continued], self.scale, meta.max_seqlen_q,
               out[:start], **self._cache_scales())
        if fresh:
            fresh_prefill_attention(q[start:], k[start:], v[start:], fresh, self.scale, out[start:])
        return out
