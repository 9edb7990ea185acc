"""Paged attention kernels vs the PyTorch references and a dense SDPA oracle.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 (set before triton is imported), so shapes stay
small. With CUDA the same tests run compiled on the GPU, plus the `gpu`-marked ones.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from swiftlm.kernels import attention as attn  # noqa: E402
from swiftlm.layers import attention as attention_layer  # noqa: E402
from swiftlm.layers.attention import Attention, AttentionMetadata, forward_context  # noqa: E402
from swiftlm.layers.attention import fresh_prefill_attention  # noqa: E402
from swiftlm.kernels.rope import compute_cos_sin_cache, rope_qk_norm_cache_ref  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (attn.HAS_TRITON and (CUDA or attn.TRITON_INTERPRETED)),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 set before import")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POISON_BLOCK = 1 << 30  # table entries past a sequence's end: dereferencing one would fault or crash


def make_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    v = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype)
    return k, v


def make_block_tables(seq_lens: list[int], block_size: int, num_blocks: int, gen: torch.Generator,
                      extra_cols: int = 2) -> torch.Tensor:
    """Disjoint, shuffled (non-contiguous) blocks per sequence; unused entries hold an out-of-range id."""
    needed = [-(-n // block_size) for n in seq_lens]
    width = max(needed, default=0) + extra_cols
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    assert sum(needed) <= num_blocks
    table = torch.full((len(seq_lens), width), POISON_BLOCK, dtype=torch.int32)
    for i, n in enumerate(needed):
        table[i, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
    return table.to(DEVICE)


def gathered(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Contiguous fp32 `[length, kv_heads, dim]` rows of one sequence, read slot by slot."""
    block_size = cache.shape[1]
    flat = cache.reshape(-1, cache.shape[2], cache.shape[3])
    slots = [int(table_row[p // block_size]) * block_size + p % block_size for p in range(length)]
    return flat[torch.tensor(slots, dtype=torch.long, device=cache.device)].float()


def dense_decode(q, k_cache, v_cache, tables, seq_lens, scale, k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """Per-sequence SDPA over gathered K/V, GQA by repeating kv heads; seq_len 0 -> zeros."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        k = (gathered(k_cache, tables[b], n) * k_scale).repeat_interleave(group, 1).transpose(0, 1)
        v = (gathered(v_cache, tables[b], n) * v_scale).repeat_interleave(group, 1).transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(q[b].float()[:, None], k, v, scale=scale)[:, 0]
    return out


def dense_prefill(q, k_cache, v_cache, tables, cu_seqlens, seq_lens, scale, k_scale=1.0, v_scale=1.0):
    """Per-sequence SDPA with an explicit bottom-right causal mask."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    cu = cu_seqlens.tolist()
    for i, n in enumerate(seq_lens.tolist()):
        s, e = cu[i], cu[i + 1]
        if e == s:
            continue
        k = (gathered(k_cache, tables[i], n) * k_scale).repeat_interleave(group, 1).transpose(0, 1)
        v = (gathered(v_cache, tables[i], n) * v_scale).repeat_interleave(group, 1).transpose(0, 1)
        q_pos = torch.arange(n - (e - s), n, device=q.device)
        mask = torch.arange(n, device=q.device)[None, :] <= q_pos[:, None]
        out[s:e] = F.scaled_dot_product_attention(q[s:e].float().transpose(0, 1), k, v, attn_mask=mask,
                                                  scale=scale).transpose(0, 1)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def decode_case(seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int, block_size: int,
                dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = make_block_tables(seq_lens, block_size, num_blocks, gen)
    q = torch.randn(len(seq_lens), num_kv_heads * group, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, tables, lens


def prefill_case(pairs: list[tuple[int, int]], num_kv_heads: int, group: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, seed: int = 0):
    """pairs: (q_len, seq_len) per sequence; the q rows are the last q_len of seq_len cached tokens."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [n for _, n in pairs]
    num_blocks = sum(-(-n // block_size) for n in seq_lens) + 3
    k_cache, v_cache = make_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, gen)
    tables = make_block_tables(seq_lens, block_size, num_blocks, gen)
    cu = torch.tensor([0] + [sum(q for q, _ in pairs[:i + 1]) for i in range(len(pairs))], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_kv_heads * group, head_dim, generator=gen).to(device=DEVICE, dtype=dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return q, k_cache, v_cache, tables, cu.to(DEVICE), lens, max(q for q, _ in pairs)


# ---------------------------------------------------------------- references


@pytest.mark.parametrize("group", [1, 4])
def test_decode_ref_matches_dense_sdpa(group: int) -> None:
    q, kc, vc, bt, lens = decode_case([1, 15, 16, 0, 41], 2, group, 32, 16, torch.float32)
    ref = attn.paged_decode_attention_ref(q, kc, vc, bt, lens, 0.3)
    torch.testing.assert_close(ref, dense_decode(q, kc, vc, bt, lens, 0.3), atol=1e-5, rtol=1e-5)
    assert (ref[3] == 0).all()


@pytest.mark.parametrize("group", [1, 4])
def test_prefill_ref_matches_dense_sdpa(group: int) -> None:
    q, kc, vc, bt, cu, lens, mq = prefill_case([(7, 7), (5, 30), (0, 4), (1, 9)], 2, group, 32, 8, torch.float32)
    ref = attn.paged_prefill_attention_ref(q, kc, vc, bt, cu, lens, 0.3, mq)
    torch.testing.assert_close(ref, dense_prefill(q, kc, vc, bt, cu, lens, 0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("align", [256, 4])
@pytest.mark.parametrize("group", [1, 4])
def test_fresh_prefill_attention_matches_repeated_kv_sdpa(group: int, align: int, monkeypatch) -> None:
    """The stride-0 GQA layout gives per-sequence causal attention over repeated k/v heads, token-major; with
    FRESH_ALIGN 4 every prompt splits into aligned leading queries and a bottom-right-causal tail (9 = 8 + 1,
    5 = 4 + 1, 3 = tail only, 8 = aligned only)."""
    monkeypatch.setattr(attention_layer, "FRESH_ALIGN", align)
    gen = torch.Generator().manual_seed(group)
    lens = [5, 1, 9, 3, 8]
    q = torch.randn(sum(lens), 2 * group, 32, generator=gen).to(DEVICE)
    k, v = (torch.randn(sum(lens), 2, 32, generator=gen).to(DEVICE) for _ in range(2))
    got = fresh_prefill_attention(q, k, v, lens, 0.3)
    assert got.shape == q.shape
    start = 0
    for n in lens:
        part = slice(start, start + n)
        kr, vr = (t[part].repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))
        want = F.scaled_dot_product_attention(q[part].transpose(0, 1), kr, vr, is_causal=True,
                                              scale=0.3).transpose(0, 1)
        torch.testing.assert_close(got[part], want, atol=1e-5, rtol=1e-5)
        start += n
    one = fresh_prefill_attention(q[:5], k[:5], v[:5], [5], 0.3)
    torch.testing.assert_close(one, got[:5], atol=1e-6, rtol=1e-6)
    into = torch.full_like(q, float("nan"))
    assert fresh_prefill_attention(q, k, v, lens, 0.3, out=into) is into
    torch.testing.assert_close(into, got, atol=1e-6, rtol=1e-6)


def _new_kv(cache: torch.Tensor, tables: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """The cached rows of each sequence's new tokens, token-major `[T, Hkv, D]` (what the QKV projection made)."""
    rows = [gathered(cache, tables[i], n)[n - q_len:] for i, (q_len, n) in enumerate(pairs)]
    return torch.cat(rows).to(cache.dtype)


@pytest.mark.parametrize("num_decodes", [0, 1, 3])
def test_mixed_step_splits_decodes_continued_and_fresh_prompts(num_decodes: int, monkeypatch) -> None:
    """A step of decodes, a prompt continuing its cached prefix, then fresh prompts: the split (decode kernel;
    paged kernel for the continued prompt; SDPA for the fresh prompts, aligned leading queries and tails apart;
    offsets counted from the first prompt token) equals treating every row as a varlen prefill query over the
    cache."""
    monkeypatch.setattr(attention_layer, "FRESH_ALIGN", 4)
    pairs = [(1, 9), (1, 33), (1, 17)][:num_decodes] + [(5, 21), (6, 6), (4, 4), (3, 3)]
    q, kc, vc, bt, cu, lens, mq = prefill_case(pairs, 2, 4, 32, 8, torch.float32, seed=num_decodes)
    k, v = _new_kv(kc, bt, pairs), _new_kv(vc, bt, pairs)
    layer = Attention(q.shape[1], kc.shape[2], q.shape[2], 0.3)
    layer.k_cache, layer.v_cache = kc, vc
    none = torch.zeros(0, dtype=torch.long, device=DEVICE)
    with forward_context(AttentionMetadata(none, bt, lens, cu, mq)):
        whole = layer(q, k, v)
    meta = AttentionMetadata(none, bt, lens, cu[num_decodes:] - num_decodes, mq, num_decodes=num_decodes,
                             fresh_prefill_lens=[6, 4, 3])
    with forward_context(meta):
        split = layer(q, k, v)
    torch.testing.assert_close(split, whole, atol=1e-4, rtol=1e-4)
    assert split.shape == q.shape


# ---------------------------------------------------------------- decode kernel


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_decode_matches_ref_and_sdpa(group: int, dtype: torch.dtype, num_splits: int | None) -> None:
    """Ragged lengths around the block and tile edges, long enough that 4 splits each get several tiles."""
    q, kc, vc, bt, lens = decode_case([1, 15, 16, 37, 131], 2 if group < 8 else 1, group, 32, 16, dtype)
    out = attn.paged_decode_attention(q, kc, vc, bt, lens, 0.25, num_splits=num_splits, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, attn.paged_decode_attention_ref(q, kc, vc, bt, lens, 0.25), dtype)
    assert_close(out, dense_decode(q, kc, vc, bt, lens, 0.25), dtype)


@needs_kernels
@pytest.mark.parametrize("block_size,block_n,head_dim", [(8, 32, 64), (32, 16, 64), (16, 64, 128), (8, None, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_block_and_tile_sizes(block_size: int, block_n: int | None, head_dim: int, dtype: torch.dtype) -> None:
    """Tiles smaller and larger than a cache block, and the default tile for the head_dim."""
    q, kc, vc, bt, lens = decode_case([9, block_size, 2 * block_size + 3, 100], 2, 2, head_dim, block_size, dtype)
    for splits in (1, 3):
        out = attn.paged_decode_attention(q, kc, vc, bt, lens, head_dim ** -0.5, num_splits=splits, block_n=block_n)
        assert_close(out, attn.paged_decode_attention_ref(q, kc, vc, bt, lens, head_dim ** -0.5), dtype)


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_empty_rows_empty_splits_and_poisoned_out(num_splits: int) -> None:
    """seq_len 0 rows (graph padding, table full of bad ids) give zeros; more splits than tiles stay NaN-free;
    every element of a NaN-filled, strided `out` is written; q may be a strided view (fused qkv)."""
    seq_lens = [0, 1, 3, 0, 17, 40]
    _, kc, vc, bt, lens = decode_case(seq_lens, 2, 2, 32, 8, torch.float32)
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(len(seq_lens), 8, 32, generator=gen).to(DEVICE)
    q = qkv[:, :4]
    out_buf = torch.full((len(seq_lens), 6, 32), float("nan"), device=DEVICE)
    out = out_buf[:, 1:5]
    res = attn.paged_decode_attention(q, kc, vc, bt, lens, 0.2, num_splits=num_splits, out=out, block_n=16)
    assert res.data_ptr() == out.data_ptr()
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[3] == 0).all()
    assert out_buf[:, [0, 5]].isnan().all()
    torch.testing.assert_close(out, dense_decode(q, kc, vc, bt, lens, 0.2), atol=1e-5, rtol=1e-5)
    again = attn.paged_decode_attention(-q, kc, vc, bt, lens, 0.2, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(again, dense_decode(-q, kc, vc, bt, lens, 0.2), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_decode_all_rows_empty() -> None:
    q, kc, vc, bt, lens = decode_case([0, 0], 1, 4, 32, 16, torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    attn.paged_decode_attention(q, kc, vc, bt, lens, 0.2, num_splits=3, out=out)
    assert (out == 0).all()


@needs_kernels
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_decode_fp8_cache(num_splits: int, fp8: torch.dtype) -> None:
    """fp8 cache dequantised by per-tensor scales: matches the reference on the same fp8 values."""
    q, kc, vc, bt, lens = decode_case([5, 33, 70], 2, 4, 64, 16, torch.bfloat16)
    kc8, vc8 = (kc * 4).to(fp8), (vc * 0.5).to(fp8)
    out = attn.paged_decode_attention(q, kc8, vc8, bt, lens, 0.125, num_splits=num_splits, k_scale=0.25,
                                      v_scale=2.0, block_n=16)
    ref = attn.paged_decode_attention_ref(q, kc8, vc8, bt, lens, 0.125, k_scale=0.25, v_scale=2.0)
    assert_close(out, ref, torch.bfloat16)
    assert_close(out, dense_decode(q, kc8, vc8, bt, lens, 0.125, 0.25, 2.0), torch.bfloat16)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_decode_fp8_cache_default_tiles(dtype: torch.dtype) -> None:
    """The default launch on an fp8 cache (fp16 dots, 128-token tiles): full tiles, a partial one and a short row,
    against SDPA on the same fp8 values."""
    q, kc, vc, bt, lens = decode_case([5, 200, 300], 2, 4, 64, 16, dtype)
    kc8, vc8 = (kc * 4).to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
    out = attn.paged_decode_attention(q, kc8, vc8, bt, lens, 0.125, num_splits=2, k_scale=0.25)
    assert_close(out, dense_decode(q, kc8, vc8, bt, lens, 0.125, 0.25), dtype)


def test_decode_tiles_hold_the_same_bytes_for_an_fp8_cache() -> None:
    assert attn._decode_config(128, torch.bfloat16, torch.bfloat16)[0] == 64
    assert attn._decode_config(128, torch.bfloat16, torch.float8_e4m3fn)[0] == 128
    assert attn._decode_config(64, torch.float16, torch.float8_e5m2)[0] == 128


def test_decode_num_splits_heuristic() -> None:
    assert attn.decode_num_splits(1, 8, 32768, 132) >= 16  # one long sequence spreads over ~all SMs
    assert attn.decode_num_splits(1, 8, 32768, 132) <= 64
    assert attn.decode_num_splits(1, 8, 256, 132) == 1  # too little context to split
    assert attn.decode_num_splits(32, 8, 32768, 132) == 1
    assert attn.decode_num_splits(128, 2, 4096, 132) == 1
    assert attn.decode_num_splits(4, 8, 4096, 132) == 9
    assert attn.decode_num_splits(1, 1, 1 << 20, 132) == 64


def test_rejects_bad_inputs() -> None:
    q, kc, vc, bt, lens = decode_case([3], 1, 2, 32, 16, torch.float32)
    with pytest.raises(ValueError, match="fp8"):
        attn.paged_decode_attention(q, kc, vc, bt, lens, 0.1, k_scale=2.0)
    with pytest.raises(ValueError, match="dtype"):
        attn.paged_decode_attention(q.half(), kc, vc, bt, lens, 0.1)
    with pytest.raises(ValueError, match="kv_heads"):
        attn.paged_decode_attention(q[:, :, :16], kc, vc, bt, lens, 0.1)
    with pytest.raises(ValueError, match="int32"):
        attn.paged_decode_attention(q, kc, vc, bt.long(), lens, 0.1)


# ---------------------------------------------------------------- prefill kernel

# (q_len, seq_len): single token, pure prefill below/at a block, chunked prefill with a prefix that is not a
# tile multiple, a decode-like row, and an empty sequence (graph/batch padding).
PREFILL_PAIRS = [(1, 1), (15, 15), (16, 16), (23, 40), (1, 50), (0, 7)]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_prefill_matches_ref_and_sdpa(group: int, dtype: torch.dtype) -> None:
    q, kc, vc, bt, cu, lens, mq = prefill_case(PREFILL_PAIRS, 2 if group < 4 else 1, group, 32, 16, dtype)
    out = attn.paged_prefill_attention(q, kc, vc, bt, cu, lens, 0.25, mq, block_m=16, block_n=16)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close(out, attn.paged_prefill_attention_ref(q, kc, vc, bt, cu, lens, 0.25, mq), dtype)
    assert_close(out, dense_prefill(q, kc, vc, bt, cu, lens, 0.25), dtype)


@needs_kernels
@pytest.mark.parametrize("block_size,block_m,block_n,head_dim", [
    (8, 32, 16, 64), (32, 16, 32, 64), (16, 64, 16, 32), (16, None, None, 128),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prefill_tile_shapes(block_size: int, block_m: int | None, block_n: int | None, head_dim: int,
                             dtype: torch.dtype) -> None:
    """Query tiles wider and narrower than key tiles, tiles vs cache blocks, and the default config."""
    pairs = [(37, 37), (20, 75), (3, 3)]
    q, kc, vc, bt, cu, lens, mq = prefill_case(pairs, 1, 2, head_dim, block_size, dtype)
    out = attn.paged_prefill_attention(q, kc, vc, bt, cu, lens, head_dim ** -0.5, mq, block_m=block_m,
                                       block_n=block_n)
    assert_close(out, attn.paged_prefill_attention_ref(q, kc, vc, bt, cu, lens, head_dim ** -0.5, mq), dtype)


@needs_kernels
def test_prefill_poisoned_out_and_strided_q() -> None:
    q, kc, vc, bt, cu, lens, mq = prefill_case([(9, 9), (12, 30), (0, 5)], 2, 2, 32, 8, torch.float32)
    qkv = torch.cat([q, torch.randn_like(q)], dim=1)  # q as the first heads of a fused projection
    out_buf = torch.full((q.shape[0], 6, 32), float("nan"), device=DEVICE)
    out = out_buf[:, 2:6]
    attn.paged_prefill_attention(qkv[:, :4], kc, vc, bt, cu, lens, 0.2, mq, out=out, block_m=16, block_n=16)
    assert torch.isfinite(out).all() and out_buf[:, :2].isnan().all()
    torch.testing.assert_close(out, dense_prefill(q, kc, vc, bt, cu, lens, 0.2), atol=1e-5, rtol=1e-5)


@needs_kernels
def test_prefill_fp8_cache() -> None:
    q, kc, vc, bt, cu, lens, mq = prefill_case([(20, 20), (9, 41)], 1, 4, 64, 16, torch.bfloat16)
    kc8, vc8 = (kc * 2).to(torch.float8_e4m3fn), (vc * 2).to(torch.float8_e4m3fn)
    out = attn.paged_prefill_attention(q, kc8, vc8, bt, cu, lens, 0.125, mq, k_scale=0.5, v_scale=0.5,
                                       block_m=16, block_n=16)
    assert_close(out, attn.paged_prefill_attention_ref(q, kc8, vc8, bt, cu, lens, 0.125, mq, k_scale=0.5,
                                                       v_scale=0.5), torch.bfloat16)
    assert_close(out, dense_prefill(q, kc8, vc8, bt, cu, lens, 0.125, 0.5, 0.5), torch.bfloat16)


@needs_kernels
def test_prefill_then_decode_agree() -> None:
    """The last query row of a prefill is exactly a decode step over the same cache."""
    q, kc, vc, bt, cu, lens, mq = prefill_case([(13, 13), (6, 44)], 2, 4, 32, 16, torch.float32)
    pre = attn.paged_prefill_attention(q, kc, vc, bt, cu, lens, 0.3, mq, block_m=16, block_n=16)
    last = cu[1:].long() - 1
    dec = attn.paged_decode_attention(q[last], kc, vc, bt, lens, 0.3, num_splits=2, block_n=16)
    torch.testing.assert_close(dec, pre[last], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- GPU only


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_realistic_shapes(dtype: torch.dtype) -> None:
    """Qwen3-8B-like heads (32/8, D=128) at default tiles and split heuristic."""
    seq_lens = [1, 300, 1025, 4097]
    q, kc, vc, bt, lens = decode_case(seq_lens, 8, 4, 128, 16, dtype)
    out = attn.paged_decode_attention(q, kc, vc, bt, lens, 128 ** -0.5)
    assert_close(out, attn.paged_decode_attention_ref(q, kc, vc, bt, lens, 128 ** -0.5), dtype)
    q, kc, vc, bt, cu, lens, mq = prefill_case([(700, 700), (129, 2000), (1, 64)], 8, 4, 128, 16, dtype)
    out = attn.paged_prefill_attention(q, kc, vc, bt, cu, lens, 128 ** -0.5, mq)
    assert_close(out, attn.paged_prefill_attention_ref(q, kc, vc, bt, cu, lens, 128 ** -0.5, mq), dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("kv_heads", [8, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_fresh_prompts_cudnn_and_flash_tails(dtype: torch.dtype, kv_heads: int) -> None:
    """Fresh prompts at Qwen3-8B and Qwen3-30B-A3B heads (32 over 8 or 4, D=128): tail only (100), aligned only
    (512), and aligned leading queries on cuDNN plus a bottom-right tail on FlashAttention (700, 2100), against
    fp32 SDPA on repeated k/v."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    lens = [100, 512, 700, 2100]
    q = torch.randn(sum(lens), 32, 128, generator=gen, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(lens), kv_heads, 128, generator=gen, device="cuda", dtype=dtype) for _ in range(2))
    got = fresh_prefill_attention(q, k, v, lens, 128 ** -0.5)
    start = 0
    for n in lens:
        part = slice(start, start + n)
        kr, vr = (t[part].float().repeat_interleave(32 // kv_heads, 1).transpose(0, 1) for t in (k, v))
        want = F.scaled_dot_product_attention(q[part].float().transpose(0, 1), kr, vr, is_causal=True,
                                              scale=128 ** -0.5).transpose(0, 1)
        assert_close(got[part], want.to(dtype), dtype)
        start += n


@gpu
@needs_cuda
def test_gpu_decode_cuda_graph_replay() -> None:
    """Captured once, replayed with new seq_lens (including a zero row) and a new block table: still correct."""
    q, kc, vc, bt, lens = decode_case([704, 16, 16, 272], 8, 4, 128, 16, torch.bfloat16)
    out = torch.empty_like(q)
    for splits in (None, 1):
        attn.paged_decode_attention(q, kc, vc, bt, lens, 0.1, num_splits=splits, out=out)  # compile first
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            attn.paged_decode_attention(q, kc, vc, bt, lens, 0.1, num_splits=splits, out=out)
        for new_lens in ([3, 16, 0, 271], [704, 1, 16, 100]):
            lens.copy_(torch.tensor(new_lens, dtype=torch.int32))
            bt.copy_(bt[torch.tensor([0, 2, 1, 3], device=DEVICE)])  # rows 1 and 2 hold one block each
            out.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            assert_close(out, attn.paged_decode_attention_ref(q, kc, vc, bt, lens, 0.1), torch.bfloat16)


def test_warm_fresh_attention_covers_every_aligned_length(monkeypatch) -> None:
    """One SDPA call per multiple of FRESH_ALIGN up to the step budget, on packed-QKV views."""
    calls = []
    monkeypatch.setattr(attention_layer, "fresh_prefill_attention",
                        lambda q, k, v, lens, scale, *a: calls.append((q.shape, k.stride(), lens, scale)))
    assert attention_layer.warm_fresh_attention(4, 2, 16, 0.25, torch.float32, torch.device("cpu"), 600) == 2
    width = (4 + 2 * 2) * 16
    assert calls == [((256, 4, 16), (width, 16, 1), [256], 0.25), ((512, 4, 16), (width, 16, 1), [512], 0.25)]


# ---------------------------------------------------------------- decode with Q/K-norm + RoPE fused in


def _rope_case(seq_lens: list[int], num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
               norm: bool, cache_dtype: torch.dtype | None = None):
    """A decode step before its rope: caches holding every row's first seq_len - 1 tokens, the new token's raw
    q/k/v as strided views of one qkv tensor, its slot (the table's entry for position seq_len - 1)."""
    q, kc, vc, bt, lens = decode_case(seq_lens, num_kv_heads, group, head_dim, 16, dtype)
    if cache_dtype is not None:
        kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    gen = torch.Generator().manual_seed(5)
    hq = num_kv_heads * group
    qkv = torch.randn(len(seq_lens), hq + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k, v = qkv[:, :hq], qkv[:, hq:hq + num_kv_heads], qkv[:, hq + num_kv_heads:]
    pos = (lens.long() - 1).clamp(min=0)
    slots = (bt.gather(1, (pos // 16)[:, None]).squeeze(1).long() * 16 + pos % 16).to(DEVICE)
    weights = [(1 + 0.1 * torch.randn(head_dim, generator=gen)).to(dtype).to(DEVICE) for _ in range(2)] if norm \
        else [None, None]
    rope = attn.DecodeRope(k, v, compute_cos_sin_cache(head_dim, 4096, 10000.0, DEVICE), slots, *weights, eps=1e-6)
    return q, kc, vc, bt, lens, rope


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_with_rope_equals_rope_then_decode(dtype: torch.dtype, norm: bool, num_splits: int) -> None:
    """The fused kernel writes the new token's K/V where the rope kernel would and attends like the unfused pair;
    position seq_len - 1 falls in the first, a middle and the last split of different rows."""
    q, kc, vc, bt, lens, rope = _rope_case([1, 17, 40, 131], 2, 4, 32, dtype, norm)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_rot, _ = rope_qk_norm_cache_ref(q, rope.k, rope.v, lens.long() - 1, rope.cos_sin_cache, kc_ref, vc_ref,
                                      rope.slot_mapping, rope.q_norm_weight, rope.k_norm_weight, rope.eps)
    want = attn.paged_decode_attention_ref(q_rot, kc_ref, vc_ref, bt, lens, 0.2)
    got = attn.paged_decode_attention(q, kc, vc, bt, lens, 0.2, num_splits=num_splits, block_n=16, rope=rope)
    assert_close(got, want, dtype)
    assert_close(kc, kc_ref, dtype)
    assert torch.equal(vc, vc_ref)


@needs_kernels
def test_decode_with_rope_fp8_cache_and_empty_rows() -> None:
    """An e4m3 cache gets e4m3(k / k_scale) as the rope kernel stores it; a seq_len 0 row writes nothing."""
    q, kc, vc, bt, lens, rope = _rope_case([0, 9, 70], 2, 2, 64, torch.bfloat16, True, torch.float8_e4m3fn)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    valid = rope.slot_mapping.clone()
    valid[0] = -1  # the reference skips the empty row's slot
    q_rot, _ = rope_qk_norm_cache_ref(q, rope.k, rope.v, (lens.long() - 1).clamp(min=0), rope.cos_sin_cache, kc_ref,
                                      vc_ref, valid, rope.q_norm_weight, rope.k_norm_weight, rope.eps, 0.5, 2.0)
    want = attn.paged_decode_attention_ref(q_rot, kc_ref, vc_ref, bt, lens, 0.125, k_scale=0.5, v_scale=2.0)
    got = attn.paged_decode_attention(q, kc, vc, bt, lens, 0.125, num_splits=3, block_n=16, k_scale=0.5,
                                      v_scale=2.0, rope=rope)
    assert_close(got, want, torch.bfloat16)
    assert (got[0] == 0).all()
    assert torch.equal(kc.view(torch.uint8), kc_ref.view(torch.uint8))
    assert torch.equal(vc.view(torch.uint8), vc_ref.view(torch.uint8))
