"""Counter-based Gumbel-max sampling.

A row samples `argmax(logits * inv_temperature - log(E))` with `E ~ Exp(1)` per vocabulary entry (the exponential
race, equivalent to sampling from the softmax). `E` comes from a hash of (row key, token id), where the row key is
derived on the host from (seed, step). A draw therefore depends only on the row's own seed, step, logits and
settings: never on its batch neighbours, the batch size or its position. No generator state, no host sync.

Two implementations share one definition: a vectorised torch version (CPU, and the reference) and a fused Triton
kernel for CUDA that reads the logits once. Both use the same 32-bit hash bit for bit; only the last ulp of `log`
may differ between them.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is Linux-only; the torch path covers everything else
    triton = None

M32 = 0xFFFFFFFF
M64 = 0xFFFFFFFFFFFFFFFF
_GOLDEN32 = 0x9E3779B1
_FMIX_C1 = 0x85EBCA6B
_FMIX_C2 = 0xC2B2AE35
_INV_2_32 = 2.0 ** -32
# Below this, -log1p(-w) is computed by its cubic Taylor polynomial (relative error < 2^-26) because 1 - w
# would round away the small exponentials that decide which low-probability token wins.
_TAYLOR_CUTOFF = 2.0 ** -8
_THIRD = 1.0 / 3.0
_BLOCK = 4096


def splitmix64(x: int) -> int:
    """One splitmix64 output for state `x` (host side; Python ints, so wrap-around is explicit)."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


@lru_cache(maxsize=65536)
def _seed_state(seed: int) -> int:
    return splitmix64(seed & M64)


def row_key(seed: int, step: int) -> tuple[int, int]:
    """(low, high) 32-bit halves of the key that drives a row's noise at one decoding step."""
    key = splitmix64(_seed_state(seed) ^ (step & M64))
    return key & M32, key >> 32


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for int64 `x` in [0, 2^32), split in 16-bit halves so nothing overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, _FMIX_C1)
    x = x ^ (x >> 13)
    x = _mul32(x, _FMIX_C2)
    return x ^ (x >> 16)


def hash_bits(key_lo: Tensor, key_hi: Tensor, token_ids: Tensor) -> Tensor:
    """32 pseudo-random bits (as int64) per (key, token id); broadcasts like the arguments."""
    x = _fmix32((_mul32(token_ids, _GOLDEN32) + key_lo) & M32)
    return _fmix32(x ^ key_hi)


def gumbel_noise(keys: Tensor, vocab_size: int) -> Tensor:
    """[B, V] float32 noise `-log(E)`, `E ~ Exp(1)`, for `keys` [2, B] int64 (low and high key halves)."""
    ids = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = hash_bits(keys[0][:, None], keys[1][:, None], ids)
    w = (bits.to(torch.float32) + 0.5) * _INV_2_32
    e = torch.where(w < _TAYLOR_CUTOFF, w * (1.0 + w * (0.5 + w * _THIRD)), -torch.log(1.0 - w))
    return -torch.log(e)


def gumbel_argmax_torch(logits: Tensor, inv_temperature: Tensor, thresh: Tensor | None, keys: Tensor,
                        random: Tensor) -> Tensor:
    """Reference sampler: rows where `random` is False take the plain argmax; `logits < thresh` are excluded."""
    x = logits * inv_temperature[:, None]
    score = torch.where(random[:, None], x + gumbel_noise(keys, logits.shape[1]), x)
    if thresh is not None:
        score = score.masked_fill(logits < thresh[:, None], float("-inf"))
    return score.argmax(-1)


if triton is not None:

    @triton.jit
    def _fmix32_tl(x):
        # uint32 arithmetic wraps natively here; constants are those of _fmix32 and hash_bits.
        x ^= x >> 16
        x *= 0x85EBCA6B
        x ^= x >> 13
        x *= 0xC2B2AE35
        x ^= x >> 16
        return x

    @triton.jit(do_not_specialize=["num_rows"])
    def _gumbel_argmax_kernel(logits_ptr, row_stride, inv_t_ptr, thresh_ptr, keys_ptr, random_ptr,
                              best_val_ptr, best_idx_ptr, num_rows, vocab_size, num_blocks,
                              HAS_THRESH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        blk = tl.program_id(1)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        inside = offs < vocab_size
        logit = tl.load(logits_ptr + row.to(tl.int64) * row_stride + offs, mask=inside, other=float("-inf"))
        x = logit * tl.load(inv_t_ptr + row)
        key_lo = tl.load(keys_ptr + row).to(tl.uint32)
        key_hi = tl.load(keys_ptr + num_rows + row).to(tl.uint32)
        bits = _fmix32_tl(offs.to(tl.uint32) * 0x9E3779B1 + key_lo)
        bits = _fmix32_tl(bits ^ key_hi)
        w = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        e = tl.where(w < 0.00390625, w * (1.0 + w * (0.5 + w * 0.3333333333333333)), -tl.log(1.0 - w))
        is_random = tl.load(random_ptr + row) != 0
        score = tl.where(is_random, x - tl.log(e), x)
        keep = inside
        if HAS_THRESH:
            keep = keep & (logit >= tl.load(thresh_ptr + row))
        score = tl.where(keep, score, float("-inf"))
        best = tl.max(score, axis=0)
        # Lowest index among equal scores, so ties resolve exactly like torch.argmax.
        idx = tl.min(tl.where(score == best, offs, 2147483647), axis=0)
        tl.store(best_val_ptr + row * num_blocks + blk, best)
        tl.store(best_idx_ptr + row * num_blocks + blk, idx)


def gumbel_argmax_triton(logits: Tensor, inv_temperature: Tensor, thresh: Tensor | None, keys: Tensor,
                         random: Tensor) -> Tensor:
    """Same result as `gumbel_argmax_torch`, fused: one pass over the logits plus a tiny per-block reduction."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_rows, vocab = logits.shape
    num_blocks = triton.cdiv(vocab, _BLOCK)
    best_val = torch.empty((num_rows, num_blocks), device=logits.device, dtype=torch.float32)
    best_idx = torch.empty((num_rows, num_blocks), device=logits.device, dtype=torch.int32)
    _gumbel_argmax_kernel[(num_rows, num_blocks)](
        logits, logits.stride(0), inv_temperature, thresh if thresh is not None else inv_temperature,
        keys.contiguous(), random.view(torch.uint8), best_val, best_idx, num_rows, vocab, num_blocks,
        HAS_THRESH=thresh is not None, BLOCK=_BLOCK, num_warps=8)
    # argmax picks the first block on ties, and each block already holds its lowest tied index.
    return best_idx.gather(1, best_val.argmax(1, keepdim=True)).squeeze(1).to(torch.int64)


def gumbel_argmax(logits: Tensor, inv_temperature: Tensor, thresh: Tensor | None, keys: Tensor,
                  random: Tensor) -> Tensor:
    """Sample one token per row ([B] int64 on the logits' device): the Triton kernel on CUDA, torch elsewhere.

    `inv_temperature` [B] float32 (1 for greedy rows), `thresh` [B] float32 or None (tokens whose logit is below
    it are excluded), `keys` [2, B] int64 from `row_key`, `random` [B] bool (False: greedy argmax).
    """
    if logits.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if logits.is_cuda and triton is not None:
        return gumbel_argmax_triton(logits, inv_temperature, thresh, keys, random)
    return gumbel_argmax_torch(logits, inv_temperature, thresh, keys, random)
