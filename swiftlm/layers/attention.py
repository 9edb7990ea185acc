"""Paged attention layer: writes this step's K/V into the cache, then attends over the cache.

The model runner publishes one `AttentionMetadata` per forward through `forward_context`; every layer reads it,
so model code stays free of batching details. Decode-only steps use the split-K decode kernel (and are what
CUDA graphs capture); steps with any prefill tokens use the varlen prefill kernel, where a decode is a query
of length one.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from swiftlm.kernels import attention as kernels


@dataclass
class AttentionMetadata:
    """Batch layout for one forward. Tensors live on the model's device.

    slot_mapping: [T] cache slot of each new token. block_tables: [B, max_blocks] int32. seq_lens: [B] int32,
    tokens in the cache per sequence after this step. cu_seqlens_q: [B+1] int32 offsets of each sequence's new
    tokens (None on decode-only steps, where every sequence has exactly one).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    max_seqlen_q: int = 1
    decode_num_splits: int | None = None

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


class Attention(nn.Module):
    """Attention over the paged KV cache. The runner binds `k_cache`/`v_cache` after allocating them."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
        meta = get_forward_context()
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not bound"
        kc = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)
        vc = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)
        kc.index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        on_gpu = q.is_cuda
        if meta.decode_only:
            fn = kernels.paged_decode_attention if on_gpu else kernels.paged_decode_attention_ref
            extra = {"num_splits": meta.decode_num_splits} if on_gpu else {}
            return fn(q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, self.scale, **extra)
        fn = kernels.paged_prefill_attention if on_gpu else kernels.paged_prefill_attention_ref
        return fn(q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, self.scale,
                  meta.max_seqlen_q)
