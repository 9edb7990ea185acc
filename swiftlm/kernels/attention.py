"""Paged attention over the block-table KV cache: split-K decode and varlen (chunked) prefill.

Cache layout (docs/DESIGN.md): `k_cache`/`v_cache` are `[num_blocks, block_size, num_kv_heads, head_dim]`;
token `p` of a sequence with block table `bt` lives in slot `bt[p // block_size] * block_size + p % block_size`.

Each Triton kernel sits beside a plain PyTorch reference (`*_ref`) that is the CPU path and the test oracle.
The public wrappers run Triton on CUDA tensors, and on CPU tensors only when the kernels were built under
`TRITON_INTERPRET=1` (the tests); otherwise they fall back to the reference.

The decode kernel can also take the raw query and the new token's raw k/v (`DecodeRope`): it then applies
Q/K RMSNorm and RoPE and stores the token's K/V itself, the work of `rope.rope_qk_norm_cache`, saving that
launch in every layer of a decode step.

An FP8 (e4m3/e5m2) cache is read by widening each loaded tile to fp16, in which the dots then run (one
conversion per pair of elements); the per-tensor scales are folded into the softmax scale (k) and applied once
to the output (v), so dequantising costs no extra multiply per element.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from swiftlm.kernels.quant import FP8_DTYPE, FP8_MAX, FP8_PRE_ROUND
from swiftlm.kernels.rope import rope_qk_norm_cache_ref
from swiftlm.kernels.triton_support import HAS_TRITON, TRITON_INTERPRETED, can_use_triton, use_pdl

if HAS_TRITON:
    import triton
    import triton.language as tl

    from swiftlm.kernels.rope import norm_rope, store_kv
    from swiftlm.kernels.triton_support import release_dependents, wait_for_inputs

__all__ = [
    "DecodeRope",
    "decode_num_splits",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
]


_LOG2E = 1.4426950408889634
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# Split-K heuristic: aim for about two programs per SM, but give each split at least this many tokens of
# context capacity and never more than _MAX_SPLITS splits (the merge kernel holds all splits in registers).
_MIN_SPLIT_TOKENS = 256
_MAX_SPLITS = 64
_DEFAULT_NUM_SMS = 132  # H100 SXM; used when not on CUDA (interpreter) so choices match the GPU.


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int = _DEFAULT_NUM_SMS) -> int:
    """Number of sequence splits for decode, from shapes only so a CUDA graph's grid never depends on data.

    Small batches (one program per (sequence, kv head) cannot fill the GPU) split the context so that about
    `2 * num_sms` programs run; `max_context` (block-table capacity) bounds how many splits can hold work.
    """
    programs = batch * num_kv_heads
    if batch >= 32 or programs >= num_sms:
        return 1
    target = -(-2 * num_sms // programs)
    capacity = max(1, -(-max_context // _MIN_SPLIT_TOKENS))
    return max(1, min(target, capacity, _MAX_SPLITS))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass
class DecodeRope:
    """What the decode kernel needs to apply Q/K RMSNorm + RoPE itself and store the new token's K/V (the work of
    `rope.rope_qk_norm_cache`, one launch fewer per layer): the new token's raw k/v `[B, Hkv, D]` (views of the
    QKV output), the cos/sin table, each row's cache slot, and the norm weights (both, or neither for Qwen2).
    The token's position is `seq_lens[b] - 1`."""

    k: torch.Tensor
    v: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor
    q_norm_weight: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    eps: float = 1e-6


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k/v caches must share shape [blocks, block_size, kv_heads, dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if q.shape[-1] != head_dim or q.shape[-2] % num_kv_heads:
        raise ValueError(f"q heads/dim {tuple(q.shape[-2:])} do not fit cache kv_heads={num_kv_heads} "
                         f"dim={head_dim}")
    if block_size & (block_size - 1) or head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"block_size and head_dim must be powers of two (head_dim >= 16), got {block_size}, "
                         f"{head_dim}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype and cache.dtype not in _FP8_DTYPES:
            raise ValueError(f"{name} dtype {cache.dtype} must equal q dtype {q.dtype} or be fp8")
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
    if q.stride(-1) != 1 or block_tables.dtype != torch.int32 or block_tables.stride(-1) != 1:
        raise ValueError("q must be contiguous in head_dim and block_tables int32 with contiguous rows")


def _check_rope(q: torch.Tensor, k_cache: torch.Tensor, rope: DecodeRope) -> None:
    batch, _, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if (rope.q_norm_weight is None) != (rope.k_norm_weight is None):
        raise ValueError("pass both norm weights, or neither")
    for name, x in (("k", rope.k), ("v", rope.v)):
        if x.shape != (batch, num_kv_heads, head_dim) or x.stride(-1) != 1:
            raise ValueError(f"rope.{name} must be [{batch}, {num_kv_heads}, {head_dim}] with unit stride along D, "
                             f"got {tuple(x.shape)}")
    if rope.cos_sin_cache.shape[-1] != head_dim or rope.cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"the cos/sin table must be fp32 with {head_dim} columns")
    if rope.slot_mapping.shape != (batch,):
        raise ValueError(f"rope.slot_mapping must hold one slot per row ({batch})")


def _gather_kv(cache: torch.Tensor, block_tables: torch.Tensor, length: int, scale: float | None) -> torch.Tensor:
    """Rows `[B, length, kv_heads, dim]` (fp32) of positions 0..length-1; table entries past a row's end are
    whatever the table holds, so they are clamped to block 0 and must be masked by the caller."""
    block_size = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    blocks = block_tables[:, pos // block_size].long().clamp(0, cache.shape[0] - 1)
    slots = blocks * block_size + pos % block_size
    rows = cache.reshape(-1, cache.shape[2], cache.shape[3])[slots].float()
    return rows * scale if scale is not None else rows


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               out: torch.Tensor | None = None, k_scale: float | None = None,
                               v_scale: float | None = None) -> torch.Tensor:
    """PyTorch decode attention (fp32 math): q `[B, Hq, D]` attends to the first `seq_lens[b]` cached tokens.

    Rows with `seq_len == 0` produce zeros. Syncs on `seq_lens.max()`, so it is not graph-capturable.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    length = int(seq_lens.max()) if batch else 0
    result = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    if length > 0:
        k = _gather_kv(k_cache, block_tables, length, k_scale)
        v = _gather_kv(v_cache, block_tables, length, v_scale)
        qg = q.float().view(batch, num_kv_heads, group, head_dim)
        scores = torch.einsum("bhgd,blhd->bhgl", qg, k) * scale
        valid = torch.arange(length, device=q.device)[None, :] < seq_lens[:, None].long()
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows (seq_len 0) -> zeros
        result = torch.einsum("bhgl,blhd->bhgd", probs, v).reshape(batch, num_heads, head_dim)
    if out is None:
        return result.to(q.dtype)
    out.copy_(result)
    return out


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                                scale: float, max_seqlen_q: int, out: torch.Tensor | None = None,
                                k_scale: float | None = None, v_scale: float | None = None) -> torch.Tensor:
    """PyTorch varlen causal attention (fp32 math), bottom-right aligned: new query j of sequence i sees
    cache positions `<= seq_lens[i] - q_len_i + j`. `max_seqlen_q` is unused (kept for a shared signature)."""
    del max_seqlen_q
    group = q.shape[1] // k_cache.shape[2]
    result = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if out is None else out
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = cu[i], cu[i + 1]
        if end == start:
            continue
        k = _gather_kv(k_cache, block_tables[i:i + 1], seq_len, k_scale)[0].repeat_interleave(group, dim=1)
        v = _gather_kv(v_cache, block_tables[i:i + 1], seq_len, v_scale)[0].repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        q_pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        result[start:end] = torch.einsum("hqk,khd->qhd", probs, v)
    return result.to(q.dtype) if out is None else out


if HAS_TRITON:

    @triton.jit
    def _rope_prologue(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr, b, kvh, heads, g_mask,
                       pos, owner, stride_qb, stride_qh, stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cs,
                       stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, eps, k_store_scale,
                       v_store_scale, HEAD_DIM: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       HAS_NORM: tl.constexpr, FP8_CACHE: tl.constexpr, FP8_MAX: tl.constexpr,
                       PRE_ROUND: tl.constexpr, IN_DTYPE: tl.constexpr):
        """Normalize and rotate the query heads of this kv head ([GROUP_PAD, HEAD_DIM], rounded to the activation
        dtype as the unfused kernel's q would be); the `owner` program (its split holds position `pos`) also
        rotates the new key and stores it and the new value into the cache, visible to its own loads after."""
        HALF: tl.constexpr = HEAD_DIM // 2
        offs_h = tl.arange(0, HALF)
        whole = offs_h < HALF
        row = cs_ptr + tl.maximum(pos, 0) * stride_cs  # pos is -1 in an empty row (seq_len 0): no owner there
        cos = tl.load(row + offs_h)[None, :]
        sin = tl.load(row + HALF + offs_h)[None, :]
        q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_h[None, :]
        q1 = tl.load(q_rows, mask=g_mask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF, mask=g_mask[:, None], other=0.0).to(tl.float32)
        q1, q2 = norm_rope(q1, q2, qw_ptr, offs_h, whole, cos, sin, eps, HEAD_DIM, HAS_NORM)
        q = tl.reshape(tl.permute(tl.join(q1.to(IN_DTYPE), q2.to(IN_DTYPE)), (0, 2, 1)), (GROUP_PAD, HEAD_DIM))
        if owner:
            k_row = kn_ptr + b * stride_knb + kvh * stride_knh + offs_h[None, :]
            k1, k2 = norm_rope(tl.load(k_row).to(tl.float32), tl.load(k_row + HALF).to(tl.float32), kw_ptr, offs_h,
                               whole, cos, sin, eps, HEAD_DIM, HAS_NORM)
            slot = tl.load(slot_ptr + b).to(tl.int64)
            k_dst = k_ptr + (slot // BLOCK_SIZE) * stride_kb + (slot % BLOCK_SIZE) * stride_kt + kvh * stride_kh
            v_dst = v_ptr + (slot // BLOCK_SIZE) * stride_vb + (slot % BLOCK_SIZE) * stride_vt + kvh * stride_vh
            row_mask = whole[None, :]
            store_kv(k_dst + offs_h[None, :], k1, k_store_scale, row_mask, FP8_CACHE, FP8_MAX, PRE_ROUND)
            store_kv(k_dst + HALF + offs_h[None, :], k2, k_store_scale, row_mask, FP8_CACHE, FP8_MAX, PRE_ROUND)
            v_row = vn_ptr + b * stride_vnb + kvh * stride_vnh + offs_h[None, :]
            store_kv(v_dst + offs_h[None, :], tl.load(v_row).to(tl.float32), v_store_scale, row_mask, FP8_CACHE,
                     FP8_MAX, PRE_ROUND)
            store_kv(v_dst + HALF + offs_h[None, :], tl.load(v_row + HALF).to(tl.float32), v_store_scale, row_mask,
                     FP8_CACHE, FP8_MAX, PRE_ROUND)
            tl.debug_barrier()  # the stores are made before any thread of this program loads that slot
        return q

    # The block tables and lengths are slices of the runner's packed step buffer, whose 16-byte alignment differs
    # between decode-only and mixed steps: specializing on it compiled a new variant inside the first throughput run.
    # Integers that vary with the split count (the lse strides) or between start-up's warm-up and the runner's
    # buffers (the block-table row stride) are not specialized: a new divisibility class would compile a variant
    # inside a request (1.1 s on the H100 host).
    @triton.jit(do_not_specialize=["num_splits", "stride_btb", "stride_lb", "stride_lh"],
                do_not_specialize_on_alignment=["bt_ptr", "seq_lens_ptr", "slot_ptr"])
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, lse_ptr,
        qk_scale, v_scale,
        stride_qb, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_btb,
        stride_ob, stride_oh, stride_os,
        stride_lb, stride_lh, num_splits,
        kn_ptr, vn_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr,
        stride_knb, stride_knh, stride_vnb, stride_vnh, stride_cs, eps, k_store_scale, v_store_scale,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
        IN_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        PDL: tl.constexpr, ROPE: tl.constexpr, HAS_NORM: tl.constexpr, FP8_CACHE: tl.constexpr, FP8_MAX: tl.constexpr,
        PRE_ROUND: tl.constexpr,
    ):
        """One (sequence, kv head, split): all GROUP query heads (padded to GROUP_PAD rows for tl.dot) attend
        to this split's tiles. Splits partition whole tiles of the *device-side* seq_len, so an empty split
        (or seq_len 0) runs no iterations and emits a neutral partial (zeros, lse=-inf). With ROPE, q is the
        raw projection and the kernel first does Q/K-norm, RoPE and the new token's cache write
        (`_rope_prologue`)."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        wait_for_inputs(PDL)
        seq_len = tl.load(seq_lens_ptr + b)
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
        start = split * tiles_per_split * BLOCK_N
        end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)
        heads = kvh * GROUP + offs_g
        g_mask = offs_g < GROUP
        if ROPE:
            new_pos = seq_len - 1
            q = _rope_prologue(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr, b, kvh, heads,
                               g_mask, new_pos, (new_pos >= start) & (new_pos < end), stride_qb, stride_qh, stride_knb,
                               stride_knh, stride_vnb, stride_vnh, stride_cs, stride_kb, stride_kt, stride_kh,
                               stride_vb, stride_vt, stride_vh, eps, k_store_scale, v_store_scale, HEAD_DIM,
                               GROUP_PAD, BLOCK_SIZE, HAS_NORM, FP8_CACHE, FP8_MAX, PRE_ROUND,
                               IN_DTYPE).to(OP_DTYPE).to(DOT_DTYPE)
        else:
            q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                        mask=g_mask[:, None], other=0.0).to(OP_DTYPE).to(DOT_DTYPE)

        m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        bt_row = bt_ptr + b * stride_btb
        k_head = k_ptr + kvh * stride_kh
        v_head = v_ptr + kvh * stride_vh
        for n in range(start, end, BLOCK_N):
            pos = n + offs_n
            valid = pos < end
            block = tl.load(bt_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            tok = pos % BLOCK_SIZE
            k = tl.load(k_head + block[:, None] * stride_kb + tok[:, None] * stride_kt + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            v = tl.load(v_head + block[:, None] * stride_vb + tok[:, None] * stride_vt + offs_d[None, :],
                        mask=valid[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(OP_DTYPE).to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(OP_DTYPE).to(DOT_DTYPE), v.to(OP_DTYPE).to(DOT_DTYPE), acc * alpha[:, None],
                         input_precision=DOT_PRECISION)
            m_i = m_new

        release_dependents(PDL)
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc * (v_scale / l_safe)[:, None]
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        if DIRECT:
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        else:
            tl.store(o_ptrs + split * stride_os, o, mask=g_mask[:, None])
            # Empty split: m_i = -inf and l_safe = 1, so lse = -inf and the merge gives it zero weight.
            tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_safe), mask=g_mask)

    @triton.jit(do_not_specialize=["num_splits", "stride_lb", "stride_lh"])
    def _decode_merge_kernel(
        part_ptr, lse_ptr, out_ptr,
        stride_pb, stride_ph, stride_ps,
        stride_lb, stride_lh,
        stride_ob, stride_oh, num_splits,
        SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
    ):
        """Combine split partials of one (sequence, q head) by their log2-sum-exp weights; all-empty -> 0."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        s_mask = offs_s < num_splits
        wait_for_inputs(PDL)
        release_dependents(PDL)
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
        m = tl.max(lse, 0)
        w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
        denom = tl.sum(w, 0)
        parts = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                        mask=s_mask[:, None], other=0.0)
        o = tl.sum(parts * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _prefill_tile(
        acc, l_i, m_i, q, q_pos, n, kv_end, bt_row, k_head, v_head,
        stride_kb, stride_kt, stride_vb, stride_vt, qk_scale,
        offs_n, offs_d, OP_DTYPE: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
        DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """Online-softmax update with keys n..n+BLOCK_N; MASKED applies the causal/bounds mask (diagonal
        tiles only: tiles wholly below the diagonal skip all mask work)."""
        pos = n + offs_n
        if MASKED:
            in_range = pos < kv_end
            block = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        else:
            block = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        tok = pos % BLOCK_SIZE
        k_ptrs = k_head + block[:, None] * stride_kb + tok[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_head + block[:, None] * stride_vb + tok[:, None] * stride_vt + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k.to(OP_DTYPE).to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where((pos[None, :] <= q_pos[:, None]) & in_range[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = tl.dot(p.to(OP_DTYPE).to(DOT_DTYPE), v.to(OP_DTYPE).to(DOT_DTYPE), acc * alpha[:, None],
                     input_precision=DOT_PRECISION)
        return acc, l_i, m_new

    @triton.jit(do_not_specialize=["stride_btb"],
                do_not_specialize_on_alignment=["bt_ptr", "cu_q_ptr", "seq_lens_ptr"])
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, cu_q_ptr, seq_lens_ptr, out_ptr,
        qk_scale, v_scale,
        stride_qt, stride_qh,
        stride_kb, stride_kt, stride_kh,
        stride_vb, stride_vt, stride_vh,
        stride_btb,
        stride_ot, stride_oh,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        OP_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One (q head, query tile, sequence). Heads vary fastest in launch order so the GROUP heads sharing
        a kv head run together and reuse its K/V tiles from L2; query tiles are walked last-first so the
        longest causal tiles start earliest."""
        h = tl.program_id(0)
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        b = tl.program_id(2)
        q_start = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q_start
        m_start = pid_m * BLOCK_M
        if m_start >= q_len:
            return
        prefix = tl.load(seq_lens_ptr + b) - q_len  # cached tokens before this chunk's first query
        kvh = h // GROUP

        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < q_len
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None], other=0.0).to(OP_DTYPE).to(DOT_DTYPE)
        q_pos = prefix + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        bt_row = bt_ptr + b * stride_btb
        k_head = k_ptr + kvh * stride_kh
        v_head = v_ptr + kvh * stride_vh
        # Keys < prefix + m_start are visible to every row of the tile: whole tiles of them need no mask.
        # Every row's own diagonal key lies in the masked range, so no row is all -inf when it is reached.
        full_end = (prefix + m_start) // BLOCK_N * BLOCK_N
        kv_end = prefix + tl.minimum(m_start + BLOCK_M, q_len)
        for n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, q_pos, n, kv_end, bt_row, k_head, v_head,
                                          stride_kb, stride_kt, stride_vb, stride_vt, qk_scale,
                                          offs_n, offs_d, OP_DTYPE, BLOCK_SIZE, False, DOT_DTYPE, DOT_PRECISION)
        for n in range(full_end, kv_end, BLOCK_N):
            acc, l_i, m_i = _prefill_tile(acc, l_i, m_i, q, q_pos, n, kv_end, bt_row, k_head, v_head,
                                          stride_kb, stride_kt, stride_vb, stride_vt, qk_scale,
                                          offs_n, offs_d, OP_DTYPE, BLOCK_SIZE, True, DOT_DTYPE, DOT_PRECISION)

        o = acc * (v_scale / tl.where(l_i > 0.0, l_i, 1.0))[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])

    _TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_args(dtype: torch.dtype) -> tuple:
    """(DOT_DTYPE, DOT_PRECISION): fp32 runs exact IEEE dots (tests expect ~1e-5); 16-bit stays native on GPU.

    The Triton interpreter multiplies bf16 dot operands as raw uint16 bit patterns, so there bf16 operands
    are widened to fp32 after being rounded to bf16, which keeps the GPU's numerics.
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and TRITON_INTERPRETED):
        return tl.float32, "ieee"
    return _TL_DTYPES[dtype], "tf32"


def _operand_args(dtype: torch.dtype, cache_dtype: torch.dtype) -> tuple:
    """(OP_DTYPE, DOT_DTYPE, DOT_PRECISION): the dtype the dot operands are rounded to, then `_dot_args`.

    A 16-bit query over an fp8 cache runs its dots in fp16: e4m3/e5m2 widen to fp16 exactly in one conversion
    per pair of elements, where bf16 operands took a second conversion per element; q and the probabilities
    lose nothing that matters (a normalized query and p in [0, 1] sit well inside fp16's range)."""
    if cache_dtype in _FP8_DTYPES and dtype in (torch.float16, torch.bfloat16):
        return (tl.float16, *_dot_args(torch.float16))
    return (_TL_DTYPES[dtype], *_dot_args(dtype))


def _decode_config(head_dim: int, dtype: torch.dtype, cache_dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages): ~16 KB K and V tiles per step keep enough bytes in flight for HBM, so
    an fp8 cache takes twice the tokens per tile (H100, B=256 x 1280 tokens: 285 us with 128 against 361 us with
    64, `attention_decode_kv_h100_d0c33e3.json`). fp32 (exact FMA dots, a correctness path) uses small tiles to
    limit register spills."""
    if dtype == torch.float32:
        return max(16, 2048 // head_dim), 4, 2
    tile_bytes = 16384 // (1 if cache_dtype in _FP8_DTYPES else 2)
    return max(16, min(128, tile_bytes // head_dim)), 4, 3


def _prefill_config(head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): FA2-style tiles sized for H100 shared memory.

    D=128 bf16 on an H100 (benchmarks/bench_attention.py --sweep): 128x128 tiles ran 375 TFLOP/s on one
    8000-token prompt against 313 for 128x64, 224 for 128x32 and 162 for 64x64.
    """
    if dtype == torch.float32:
        return 32, 16, 4, 2
    if head_dim <= 64:
        return 128, 64, 4, 3
    if head_dim <= 128:
        return 128, 128, 8, 3
    return 64, 32, 8, 2


def _kernel_scales(k_cache: torch.Tensor, k_scale: float | None, v_scale: float | None) -> tuple[float, float]:
    """Dequantisation multipliers for the kernels: fp8 caches default to 1.0; scales on a 16/32-bit cache
    are rejected rather than silently ignored."""
    if k_cache.dtype not in _FP8_DTYPES and (k_scale is not None or v_scale is not None):
        raise ValueError("k_scale/v_scale apply only to an fp8 KV cache")
    return (1.0 if k_scale is None else float(k_scale)), (1.0 if v_scale is None else float(v_scale))


def _decode_rope_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor,
                     rope: DecodeRope, k_scale: float | None, v_scale: float | None) -> torch.Tensor:
    """The unfused `rope` step of a decode: rotated q; the new K/V written into the cache."""
    q, _ = rope_qk_norm_cache_ref(q, rope.k, rope.v, seq_lens.long() - 1, rope.cos_sin_cache, k_cache, v_cache,
                                  rope.slot_mapping, rope.q_norm_weight, rope.k_norm_weight, rope.eps,
                                  1.0 if k_scale is None else k_scale, 1.0 if v_scale is None else v_scale)
    return q


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None,
                           k_scale: float | None = None, v_scale: float | None = None,
                           *, block_n: int | None = None, rope: DecodeRope | None = None) -> torch.Tensor:
    """Decode attention for one new token per sequence: q `[B, Hq, D]` over the first `seq_lens[b]` cached
    tokens (the current token included). Returns `[B, Hq, D]` in q's dtype (into `out` when given).

    With `rope`, q is the raw projection and the current token's K/V are not in the cache yet: the kernel applies
    Q/K RMSNorm and RoPE at position `seq_lens[b] - 1` and stores the token's K/V itself (`DecodeRope`).
    CUDA-graph capturable: no host reads of `seq_lens`; the grid depends only on shapes and `num_splits`
    (None -> `decode_num_splits` from shapes and the SM count). Rows with `seq_len == 0` give zeros.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    _check_cache(q, k_cache, v_cache, block_tables)
    k_mult, v_mult = _kernel_scales(k_cache, k_scale, v_scale)
    batch, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} and contiguous in head_dim")
    if rope is not None:
        _check_rope(q, k_cache, rope)
    if not can_use_triton(q):
        if rope is not None:
            q = _decode_rope_ref(q, k_cache, v_cache, seq_lens, rope, k_scale, v_scale)
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale, out, k_scale, v_scale)
    if batch == 0:
        return out

    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_sms = _num_sms(q.device.index or 0) if q.is_cuda else _DEFAULT_NUM_SMS
        num_splits = decode_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, num_sms)
    if not 1 <= num_splits <= 256:
        raise ValueError(f"num_splits must be in [1, 256], got {num_splits}")
    default_n, num_warps, num_stages = _decode_config(head_dim, q.dtype, k_cache.dtype)
    block_n = block_n or default_n
    op_dtype, dot_dtype, precision = _operand_args(q.dtype, k_cache.dtype)
    pdl = use_pdl(q)
    qk_scale = scale * _LOG2E * k_mult
    # num_splits is a run-time argument (not specialized) so every batch size's graph shares one compiled kernel.
    common = dict(GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                  BLOCK_SIZE=block_size, BLOCK_N=block_n, IN_DTYPE=_TL_DTYPES[q.dtype], OP_DTYPE=op_dtype,
                  DOT_DTYPE=dot_dtype, DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
                  PDL=pdl, launch_pdl=pdl)
    grid = (batch, num_kv_heads, num_splits)
    cache_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0))
    if rope is None:
        rope_args = (q, q, q, q, q, seq_lens, 0, 0, 0, 0, 0, 0.0, 1.0, 1.0)
    else:
        norm = rope.q_norm_weight is not None
        rope_args = (rope.k, rope.v, rope.cos_sin_cache, rope.q_norm_weight if norm else rope.cos_sin_cache,
                     rope.k_norm_weight if norm else rope.cos_sin_cache, rope.slot_mapping, rope.k.stride(0),
                     rope.k.stride(1), rope.v.stride(0), rope.v.stride(1), rope.cos_sin_cache.stride(0), rope.eps,
                     k_mult, v_mult)
    common.update(ROPE=rope is not None, HAS_NORM=rope is not None and rope.q_norm_weight is not None,
                  FP8_CACHE=rope is not None and k_cache.dtype == FP8_DTYPE, FP8_MAX=FP8_MAX,
                  PRE_ROUND=FP8_PRE_ROUND)
    if num_splits == 1:
        _decode_split_kernel[grid](q, k_cache, v_cache, block_tables, seq_lens, out, out, qk_scale, v_mult,
                                   q.stride(0), q.stride(1), *cache_strides, out.stride(0), out.stride(1), 0,
                                   0, 0, 1, *rope_args, DIRECT=True, **common)
        return out
    partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[grid](q, k_cache, v_cache, block_tables, seq_lens, partial, lse, qk_scale, v_mult,
                               q.stride(0), q.stride(1), *cache_strides, *partial.stride()[:3],
                               lse.stride(0), lse.stride(1), num_splits, *rope_args, DIRECT=False, **common)
    _decode_merge_kernel[(batch, num_heads)](partial, lse, out, *partial.stride()[:3], lse.stride(0), lse.stride(1),
                                             out.stride(0), out.stride(1), num_splits,
                                             SPLITS_PAD=max(_MAX_SPLITS, triton.next_power_of_2(num_splits)),
                                             HEAD_DIM=head_dim, num_warps=4, PDL=pdl, launch_pdl=pdl)
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            scale: float, max_seqlen_q: int, out: torch.Tensor | None = None,
                            k_scale: float | None = None, v_scale: float | None = None,
                            *, block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Varlen causal (chunked-)prefill attention over the paged cache. q `[T, Hq, D]`; sequence i owns rows
    `cu_seqlens_q[i]:cu_seqlens_q[i+1]`, which are the last q_len_i of its `seq_lens[i]` cached tokens
    (bottom-right causal alignment). `max_seqlen_q` (a host int, >= every q_len) sizes the grid.
    Returns `[T, Hq, D]` in q's dtype (into `out` when given); zero-length sequences are skipped.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    _check_cache(q, k_cache, v_cache, block_tables)
    k_mult, v_mult = _kernel_scales(k_cache, k_scale, v_scale)
    num_tokens, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} and contiguous in head_dim")
    if not can_use_triton(q):
        return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale,
                                           max_seqlen_q, out, k_scale, v_scale)
    batch = cu_seqlens_q.numel() - 1
    if num_tokens == 0 or batch <= 0 or max_seqlen_q <= 0:
        return out

    _, block_size, num_kv_heads, _ = k_cache.shape
    default_m, default_n, num_warps, num_stages = _prefill_config(head_dim, q.dtype)
    block_m = block_m or default_m
    block_n = block_n or default_n
    op_dtype, dot_dtype, precision = _operand_args(q.dtype, k_cache.dtype)
    qk_scale = scale * _LOG2E * k_mult
    grid = (num_heads, triton.cdiv(max_seqlen_q, block_m), batch)
    _prefill_kernel[grid](q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
                          qk_scale, v_mult,
                          q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
                          block_tables.stride(0), out.stride(0), out.stride(1),
                          GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
                          BLOCK_M=block_m, BLOCK_N=block_n, OP_DTYPE=op_dtype, DOT_DTYPE=dot_dtype,
                          DOT_PRECISION=precision, num_warps=num_warps, num_stages=num_stages)
    return out
