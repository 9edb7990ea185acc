"""Sampler behaviour on CPU against simple references (sort-based filters, hand-computed penalties, softmax)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from swiftlm.sampling import Sampler, SamplingBatch, SamplingRow
from swiftlm.sampling.gumbel import gumbel_noise, row_key, triton
from swiftlm.sampling.sampler import apply_penalties, filter_thresholds
from swiftlm.sampling_params import SamplingParams

CPU = torch.device("cpu")
sampler = Sampler()


def row(seed: int = 0, step: int = 0, prompt: list[int] | None = None, output: list[int] | None = None,
        eos: list[int] | None = None, **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), seed=seed, step=step, prompt_token_ids=prompt or [1],
                       output_token_ids=output or [], eos_token_ids=eos or [])


def sample(logits: torch.Tensor, rows: list[SamplingRow]):
    return sampler(logits, SamplingBatch.build(rows, logits.shape[1], CPU))


def ref_keep(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Sort-based reference of the kept set: ties with the boundary logit are always kept."""
    vocab = logits.numel()
    keep = torch.ones(vocab, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep &= logits >= logits.sort(descending=True).values[top_k - 1]
    if top_p < 1.0:
        vals = logits[keep].sort(descending=True).values
        probs = torch.softmax(vals.double() / temperature, 0)
        mass_before = probs.cumsum(0) - probs
        keep &= logits >= vals[int((mass_before < top_p).sum()) - 1]
    if min_p > 0.0:
        probs = torch.softmax(logits.double() / temperature, 0)
        keep &= probs >= min_p * probs.max()
    return keep


def noise_keys(n_rows: int, step: int, device: torch.device = CPU) -> torch.Tensor:
    return torch.tensor([row_key(s, step) for s in range(n_rows)], dtype=torch.int64, device=device).T.contiguous()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_greedy_is_argmax_and_tiny_temperature_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(6, 300)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1.0  # tie: lowest index wins
    rows = [row(seed=i, temperature=0.0) for i in range(5)] + [row(temperature=1e-6)]
    batch = SamplingBatch.build(rows, 300, CPU)
    assert batch.all_greedy and batch.inv_temperature is None and batch.output_counts is None
    out = sampler(logits, batch)
    assert out.token_ids.dtype == torch.int64 and out.logprobs is None
    assert out.token_ids.tolist() == logits.argmax(-1).tolist()
    assert out.token_ids[2].item() == 7
    # Greedy rows inside a sampling batch still take the argmax (with the same tie-break).
    mixed = sample(logits, rows[:3] + [row(seed=1, top_k=5, top_p=0.8), row(seed=2), row(seed=3, min_p=0.1)])
    assert mixed.token_ids[:3].tolist() == logits[:3].argmax(-1).tolist()


def test_same_seed_same_tokens_different_seeds_differ():
    torch.manual_seed(1)
    logits = torch.randn(1, 500)

    def run(seed: int) -> list[int]:
        return [sample(logits, [row(seed=seed, step=s, temperature=1.5)]).token_ids.item() for s in range(40)]

    first = run(123)
    assert run(123) == first
    assert len(set(first)) > 10  # the step is part of the key: draws vary along the sequence
    assert run(124) != first
    assert run(-5) == run(2**64 - 5)  # seeds are taken modulo 2^64


def test_row_independent_of_neighbours_position_and_batch_size():
    torch.manual_seed(2)
    vocab = 700
    targets = [
        dict(temperature=0.9),
        dict(temperature=1.1, top_k=20),
        dict(temperature=0.8, top_k=40, top_p=0.7),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.7, min_p=0.05, repetition_penalty=1.3, frequency_penalty=0.4),
        dict(temperature=0.0, presence_penalty=1.0),
    ]
    neighbours = [
        dict(temperature=0.0),
        dict(top_k=3),
        dict(top_p=0.5),  # forces the full-sort path for the whole batch
        dict(top_k=200, top_p=0.95, logprobs=5),
        dict(min_p=0.3, min_tokens=4),
        dict(repetition_penalty=0.7, presence_penalty=-1.0),
    ]
    target_logits = torch.randn(len(targets), vocab) * 2
    for step in range(6):
        for t, params in enumerate(targets):
            me = row(seed=1000 + t, step=step, prompt=[3, 4, 5], output=[5, 6, 6][:step], **params)
            alone = sample(target_logits[t:t + 1], [me]).token_ids.item()
            for order in range(3):
                others = [row(seed=s, step=s % 3, prompt=[1, 2], output=[9, 9], **neighbours[(s + order) % 6])
                          for s in range(order + 2)]
                logits = torch.randn(len(others) + 1, vocab)
                pos = order % (len(others) + 1)
                logits[pos] = target_logits[t]
                batch_rows = others[:pos] + [me] + others[pos:]
                assert sample(logits, batch_rows).token_ids[pos].item() == alone, (step, t, order)


def test_temperature_sampling_matches_softmax():
    logits = torch.tensor([1.0, 0.7, 0.5, 0.2, 0.0, -0.3, -0.6, -1.0])
    temperature = 0.8
    n_rows, n_steps = 5000, 4
    counts = torch.zeros(8)
    for step in range(n_steps):
        rows = [row(seed=s, step=step, temperature=temperature) for s in range(n_rows)]
        tokens = sample(logits.expand(n_rows, 8).contiguous(), rows).token_ids
        counts += torch.bincount(tokens, minlength=8).float()
    # 99.99% quantile of chi-square with 7 degrees of freedom is 29.9; the draws are fixed by their seeds.
    assert chi_square(counts, torch.softmax(logits.double() / temperature, 0).float()) < 29.9


def test_filtered_sampling_matches_renormalised_softmax():
    logits = torch.tensor([2.0, 1.2, 1.2, 0.9, 0.4, 0.0, -0.5, -1.0, -2.0, -3.0])
    settings = dict(temperature=1.3, top_k=6, top_p=0.85)
    keep = ref_keep(logits, 1.3, 6, 0.85, 0.0)
    n_rows = 20000
    rows = [row(seed=s, step=3, **settings) for s in range(n_rows)]
    tokens = sample(logits.expand(n_rows, 10).contiguous(), rows).token_ids
    counts = torch.bincount(tokens, minlength=10).float()
    assert counts[~keep].sum() == 0
    probs = torch.softmax((logits[keep].double() / 1.3), 0).float()
    assert chi_square(counts[keep], probs) < 30.0  # df = kept - 1 <= 5


def test_gumbel_noise_is_standard_gumbel():
    keys = noise_keys(64, 0)
    noise = gumbel_noise(keys, 4096).double()
    assert torch.isfinite(noise).all()
    assert abs(noise.mean().item() - 0.5772156649) < 0.01
    assert abs(noise.var().item() - math.pi ** 2 / 6) < 0.02
    # Exp(1) tail: P(E < 1e-3) = 1e-3, i.e. noise > -log(1e-3).
    assert abs((noise > -math.log(1e-3)).double().mean().item() - 1e-3) < 2.5e-4


@pytest.mark.parametrize("tied", [False, True])
def test_filter_masks_equal_sort_reference(tied: bool):
    gen = torch.Generator().manual_seed(3 + tied)
    vocab, n_rows = 64, 240
    if tied:
        logits = torch.randint(-4, 4, (n_rows, vocab), generator=gen).float() * 0.5
    else:
        logits = torch.randn(n_rows, vocab, generator=gen) * 2
    choices_k = [0, -1, 1, 2, 5, 17, 63, 64, 100]
    choices_p = [1.0, 0.95, 0.8, 0.5, 0.3, 0.05]
    choices_min_p = [0.0, 0.0, 0.02, 0.2, 0.6]
    choices_t = [0.6, 1.0, 1.7]
    settings = [dict(temperature=choices_t[int(torch.randint(3, (1,), generator=gen))],
                     top_k=choices_k[int(torch.randint(len(choices_k), (1,), generator=gen))],
                     top_p=choices_p[int(torch.randint(len(choices_p), (1,), generator=gen))],
                     min_p=choices_min_p[int(torch.randint(len(choices_min_p), (1,), generator=gen))])
                for _ in range(n_rows)]
    # Whole batch (full-sort path because some rows have top-p without top-k) and, separately, the rows that
    # have top-k only among themselves (partial top-k candidates path).
    groups = [list(range(n_rows)), [i for i, s in enumerate(settings) if 0 < s["top_k"] < vocab]]
    for group in groups:
        batch = SamplingBatch.build([row(**settings[i]) for i in group], vocab, CPU)
        assert batch.candidate_width == (vocab if group is groups[0] else max(settings[i]["top_k"] for i in group))
        keep = logits[group] >= filter_thresholds(logits[group], batch)[:, None]
        for j, i in enumerate(group):
            s = settings[i]
            expected = ref_keep(logits[i], s["temperature"], s["top_k"], s["top_p"], s["min_p"])
            assert torch.equal(keep[j], expected), (i, s)


def test_top_p_counts_ties_beyond_the_top_k_candidates():
    # k = 2 but four tokens tie at the 2nd value: the top-k set has 5 tokens and top-p must see all their mass.
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    for p in (0.3, 0.6, 0.75, 0.9):
        batch = SamplingBatch.build([row(top_k=2, top_p=p)], 7, CPU)
        assert batch.candidate_width == 2 and batch.count_top_k_ties
        keep = logits[0] >= filter_thresholds(logits, batch)[0]
        assert torch.equal(keep, ref_keep(logits[0], 1.0, 2, p, 0.0)), p


def test_filtered_draws_stay_inside_the_reference_set():
    gen = torch.Generator().manual_seed(5)
    vocab, n_rows = 50, 400
    logits = torch.randint(-3, 3, (n_rows, vocab), generator=gen).float()
    rows = [row(seed=i, top_k=1 + i % 7, top_p=0.4 + 0.1 * (i % 5), min_p=0.05 * (i % 3)) for i in range(n_rows)]
    tokens = sample(logits, rows).token_ids
    for i, r in enumerate(rows):
        p = r.params
        assert ref_keep(logits[i], 1.0, p.top_k, p.top_p, p.min_p)[tokens[i]], i


def test_penalties_match_hand_computed_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.5]] * 2)
    rows = [row(prompt=[0, 1, 1], output=[2, 2, 3], temperature=0.0, repetition_penalty=2.0,
                presence_penalty=0.5, frequency_penalty=0.25),
            row(prompt=[5], output=[0], temperature=0.0)]
    batch = SamplingBatch.build(rows, 6, CPU)
    penalized = apply_penalties(logits, batch)
    # Token 0: prompt only -> 2/2. Token 1: -1*2. Token 2: 0.5/2 - 0.5 - 2*0.25. Token 3: 3/2 - 0.5 - 0.25.
    assert torch.allclose(penalized[0], torch.tensor([1.0, -2.0, -0.75, 0.75, -2.0, 1.5]))
    assert torch.equal(penalized[1], logits[1])  # no penalty on this row
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.5]))  # input untouched
    assert sampler(logits, batch).token_ids.tolist() == [5, 3]


def test_penalties_match_loop_reference():
    gen = torch.Generator().manual_seed(7)
    vocab, n_rows = 40, 12
    logits = torch.randn(n_rows, vocab, generator=gen) * 3
    rows, expected = [], logits.clone()
    for i in range(n_rows):
        prompt = torch.randint(vocab, (int(torch.randint(1, 15, (1,), generator=gen)),), generator=gen).tolist()
        output = torch.randint(vocab, (int(torch.randint(0, 15, (1,), generator=gen)),), generator=gen).tolist()
        rep, pres, freq = [(1.0, 0.0, 0.0), (1.5, 0.0, 0.0), (0.8, 0.3, 0.0), (1.0, -0.7, 1.1)][i % 4]
        rows.append(row(prompt=prompt, output=output, repetition_penalty=rep, presence_penalty=pres,
                        frequency_penalty=freq))
        for tok in range(vocab):
            value = expected[i, tok].item()
            if tok in prompt or tok in output:
                value = value / rep if value > 0 else value * rep
            if tok in output:
                value -= pres + freq * output.count(tok)
            expected[i, tok] = value
    batch = SamplingBatch.build(rows, vocab, CPU)
    assert torch.allclose(apply_penalties(logits, batch), expected, atol=1e-6)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0, 2.0]])
    eos = [2]

    def greedy(step: int, **params) -> int:
        r = row(step=step, output=[0] * step, eos=eos, temperature=0.0, min_tokens=3, **params)
        return sample(logits, [r]).token_ids.item()

    assert greedy(0) == 3 and greedy(2) == 3  # EOS (2) masked while step < min_tokens
    assert greedy(3) == 2
    assert greedy(0, stop_token_ids=[3, 9]) == 4  # stop ids too; out-of-vocab ids are ignored
    assert greedy(0, stop_token_ids=[3], ignore_eos=True) == 2  # with ignore_eos EOS does not end it: not masked
    # Sampling rows never draw a masked token either.
    rows = [row(seed=s, eos=eos, min_tokens=1, stop_token_ids=[3], temperature=2.0) for s in range(300)]
    tokens = sample(logits.expand(300, 6).contiguous(), rows).token_ids
    assert not ((tokens == 2) | (tokens == 3)).any()
    assert torch.equal(logits, torch.tensor([[0.0, 1.0, 5.0, 4.0, 3.0, 2.0]]))


def test_logprobs_come_from_raw_logits():
    torch.manual_seed(8)
    logits = torch.randn(4, 100) * 2
    rows = [row(seed=1, logprobs=3, temperature=0.5, repetition_penalty=1.8, output=[4, 5]),
            row(seed=2, logprobs=7, top_k=4),
            row(seed=3),
            row(seed=4, logprobs=0, temperature=0.0, presence_penalty=2.0, output=[int(logits[3].argmax())])]
    out = sample(logits, rows)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_ids.shape == (4, 7) and out.top_logprobs.shape == (4, 7)
    assert torch.allclose(out.top_logprobs, raw.gather(1, out.top_ids))
    assert (out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:]).all()
    assert out.top_ids[:, 0].tolist() == logits.argmax(-1).tolist()
    assert out.token_ids[3].item() != logits[3].argmax().item()  # the penalty moved the draw, not the logprobs
    only_sampled = sample(logits, [row(seed=5, logprobs=0)] * 4)
    assert only_sampled.top_ids.shape == (4, 0) and only_sampled.logprobs.shape == (4,)


def test_build_flags_for_mixed_rows():
    vocab = 1000
    plain = SamplingBatch.build([row(seed=1), row(seed=2, temperature=0.0)], vocab, CPU)
    assert not plain.all_greedy and not plain.any_filter and plain.candidate_width == 0
    assert plain.output_counts is None and plain.min_tokens_index is None and plain.max_logprobs is None
    assert plain.random.tolist() == [True, False] and plain.inv_temperature.tolist() == [1.0, 1.0]

    mixed = SamplingBatch.build([
        row(seed=1, temperature=0.5, top_k=50, top_p=0.9),
        row(seed=2, top_k=5000),  # larger than the vocabulary: no filter
        row(seed=3, temperature=0.0, top_k=3, top_p=0.1, min_p=0.5, logprobs=2),  # greedy ignores filters
        row(seed=4, min_p=0.1, logprobs=4, step=1, min_tokens=2, eos=[7], stop_token_ids=[8]),
        row(seed=5, repetition_penalty=1.2, prompt=[1, 2, 2], output=[3, 3]),
    ], vocab, CPU)
    assert (mixed.any_top_k, mixed.any_top_p, mixed.any_min_p) == (True, True, True)
    assert mixed.candidate_width == 50 and mixed.count_top_k_ties and mixed.max_logprobs == 4
    assert mixed.top_k.tolist() == [50, vocab, vocab, vocab, vocab]
    assert mixed.top_p.tolist() == [0.9, 1.0, 1.0, 1.0, 1.0]
    assert mixed.inv_temperature.tolist() == [2.0, 1.0, 1.0, 1.0, 1.0]
    assert mixed.min_p_offset[3].item() == pytest.approx(math.log(0.1))
    assert math.isinf(mixed.min_p_offset[2].item())
    assert sorted(mixed.min_tokens_index.T.tolist()) == [[3, 7], [3, 8]]
    assert mixed.presence_penalty is None and mixed.repetition_penalty[:, 0].tolist()[4] == pytest.approx(1.2)
    assert mixed.output_counts[4, 3].item() == 2.0 and mixed.output_counts.sum().item() == 2.0
    assert mixed.prompt_mask[4].nonzero().flatten().tolist() == [1, 2] and mixed.prompt_mask.sum() == 2

    full = SamplingBatch.build([row(top_p=0.9), row(top_k=10)], vocab, CPU)
    assert full.candidate_width == vocab and not full.count_top_k_ties
    with pytest.raises(ValueError):
        sampler(torch.zeros(3, vocab), full)


@pytest.mark.skipif(triton is None, reason="triton not installed")
def test_triton_kernel_matches_torch_in_interpreter():
    script = textwrap.dedent("""
        import torch
        from swiftlm.sampling.gumbel import gumbel_argmax_torch, gumbel_argmax_triton, row_key
        gen = torch.Generator().manual_seed(0)
        rows, vocab = 24, 5000  # two kernel blocks, the second one partial
        logits = torch.randn(rows, vocab, generator=gen) * 3
        logits[0, 4500] = logits[0, 4700] = 100.0  # greedy tie across positions: lowest index
        logits[1, 10] = logits[1, 4200] = 100.0    # greedy tie across blocks
        inv_t = torch.rand(rows, generator=gen) + 0.5
        keys = torch.tensor([row_key(s, 3) for s in range(rows)], dtype=torch.int64).T.contiguous()
        random = torch.arange(rows) >= 2
        thresh = torch.where(torch.arange(rows) % 2 == 0, logits.topk(40).values[:, -1], float("-inf"))
        for t in (None, thresh):
            a = gumbel_argmax_torch(logits, inv_t, t, keys, random)
            b = gumbel_argmax_triton(logits, inv_t, t, keys, random)
            assert torch.equal(a, b), (a, b)
            assert a[0] == 4500 and a[1] == 10
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or triton is None, reason="needs CUDA and triton")
def test_triton_kernel_matches_torch_on_gpu():
    from swiftlm.sampling.gumbel import gumbel_argmax_torch, gumbel_argmax_triton

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, vocab = 64, 151936
    logits = torch.randn(rows, vocab, generator=gen, device=dev) * 3
    inv_t = torch.rand(rows, generator=gen, device=dev) + 0.5
    keys = noise_keys(rows, 11, dev)
    random = torch.arange(rows, device=dev) >= 4
    thresh = torch.where(torch.arange(rows, device=dev) % 2 == 0, logits.topk(100).values[:, -1], float("-inf"))
    for t in (None, thresh):
        assert torch.equal(gumbel_argmax_torch(logits, inv_t, t, keys, random),
                           gumbel_argmax_triton(logits, inv_t, t, keys, random))
    # The full sampler on CUDA draws the same tokens as on CPU.
    host = logits[:8].cpu()
    sampling_rows = [row(seed=s, step=2, temperature=0.9, top_k=[0, 50][s % 2], top_p=[1.0, 0.9][s // 4])
                     for s in range(8)]
    on_gpu = sampler(logits[:8], SamplingBatch.build(sampling_rows, vocab, dev)).token_ids.cpu()
    assert torch.equal(on_gpu, sample(host, sampling_rows).token_ids)
