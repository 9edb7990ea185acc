"""Engine benchmark on the GPU (issue 4 targets): batch-1 TPOT, TTFT at 512 and 8000 tokens, offline
throughput 256 x (1024 in / 256 out), startup time, each against its roofline floor, plus transformers
(eager `generate`) on the same GPU in the same run.

    PYTHONPATH=$PWD python benchmarks/bench_engine.py --model benchmarks/models/qwen3-8b --json out.json
"""
from __future__ import annotations

import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402


def measure_ceilings() -> dict:
    """HBM bandwidth (device copy, read+write bytes) and bf16 matmul rate, measured on the spot."""
    from triton.testing import do_bench
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    bw = 2 * n / (ms * 1e-3)
    a = b = None
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    ms = do_bench(lambda: x @ y, warmup=50, rep=300, return_mode="median")
    flops = 2 * m ** 3 / (ms * 1e-3)
    return {"hbm_bytes_per_s": bw, "bf16_flops_per_s": flops}


def mlp_params_per_token(cfg: dict) -> int:
    """MLP weights one token multiplies with: all of a dense MLP, or the router plus top-k experts of an MoE."""
    h = cfg["hidden_size"]
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        return cfg["num_experts_per_tok"] * 3 * h * cfg["moe_intermediate_size"] + h * experts
    return 3 * h * cfg["intermediate_size"]


def decode_bytes_per_token(cfg: dict, engine, dtype_bytes: int) -> int:
    """Weight bytes a batch-1 decode step must read. Dense: every weight (embedding included, as the issue's
    floor counts it). MoE: attention, router, the top-k experts and the head (the issue's floor)."""
    if not (cfg.get("num_experts") or cfg.get("num_local_experts")):
        return engine.model_weight_bytes()
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // hq
    attn = h * (hq + 2 * hkv) * d + hq * d * h
    return dtype_bytes * (layers * (attn + mlp_params_per_token(cfg)) + h * cfg["vocab_size"])


def prefill_flops(cfg: dict, tokens: int) -> float:
    """2 x params each token multiplies with x tokens (+ LM head for the last token) + causal attention FLOPs."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // hq
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + mlp_params_per_token(cfg)
    attn = 4 * layers * hq * d * tokens * (tokens + 1) / 2
    return 2 * per_layer * layers * tokens + attn + 2 * h * cfg["vocab_size"]


def run_swiftlm(model: str, args: argparse.Namespace, cfg: dict) -> tuple[dict, dict]:
    from profile_engine import watch_compiles
    from swiftlm import SamplingParams
    from swiftlm.engine.llm import LLM
    t0 = time.perf_counter()
    llm = LLM(model, load_format="dummy", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
              async_scheduling=not args.no_async_scheduling)
    engine = llm.engine
    ready_s = time.perf_counter() - PROCESS_START
    ceil = measure_ceilings()
    weight_dtype_bytes = 1 if args.quantization == "fp8" else 2
    res: dict = {"engine_init_s": time.perf_counter() - t0, "startup_to_ready_s": ready_s,
                 "num_kv_blocks": engine.model_runner.num_blocks, "weight_bytes": engine.model_weight_bytes(),
                 "decode_bytes_per_token": decode_bytes_per_token(cfg, engine, weight_dtype_bytes)}
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(1000, 30000, (n,), generator=gen).tolist()

    def timed_steps(p: list[int], new: int) -> tuple[float, list[float]]:
        engine.add_request(f"r{time.perf_counter_ns()}", p, SamplingParams(max_tokens=new, ignore_eos=True,
                                                                          temperature=0.0))
        torch.cuda.synchronize()
        start = time.perf_counter()
        stamps = []
        while engine.has_unfinished_requests():
            if engine.step():
                stamps.append(time.perf_counter())
        return stamps[0] - start, [b - a for a, b in zip(stamps, stamps[1:])]

    for _ in range(2):
        timed_steps(prompt(512), 16)  # warm-up: Triton JIT for prefill shapes
    tpots, ttft512 = [], []
    for _ in range(args.iters):
        ttft, itl = timed_steps(prompt(512), 256)
        ttft512.append(ttft)
        tpots.append(statistics.mean(itl))
    floor_decode = res["decode_bytes_per_token"] / ceil["hbm_bytes_per_s"]
    res["tpot_b1_ms"] = statistics.median(tpots) * 1e3
    res["tpot_b1_all_ms"] = [t * 1e3 for t in tpots]
    res["decode_floor_ms"] = floor_decode * 1e3
    res["tpot_floor_ratio"] = floor_decode / statistics.median(tpots)
    for n in (512, 8000):
        timed_steps(prompt(n), 1)
        ttfts = [timed_steps(prompt(n), 1)[0] for _ in range(args.iters)]
        floor = prefill_flops(cfg, n) / ceil["bf16_flops_per_s"]
        res[f"ttft_{n}_ms"] = statistics.median(ttfts) * 1e3
        res[f"ttft_{n}_all_ms"] = [t * 1e3 for t in ttfts]
        res[f"ttft_{n}_floor_ms"] = floor * 1e3
        res[f"ttft_{n}_floor_ratio"] = floor / statistics.median(ttfts)
    for batch in args.long_context_batches:
        engine_steps = []
        for i in range(batch):
            engine.add_request(f"lc{batch}-{i}", prompt(8000), SamplingParams(max_tokens=65, ignore_eos=True,
                                                                             temperature=0.0))
        while engine.has_unfinished_requests():
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = engine.step()
            if outs and all(len(o.token_ids) > 1 for o in outs):
                engine_steps.append(time.perf_counter() - t)
        res[f"decode_ctx8k_b{batch}_step_ms"] = statistics.median(engine_steps) * 1e3
    for conc in args.concurrency:
        res[f"concurrency_{conc}_out_tok_s"] = closed_loop_tok_s(engine, prompt, conc)
    if args.skip_throughput:
        return res, ceil
    prompts = [prompt(1024) for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=256, ignore_eos=True, temperature=0.0)
    # Warm-up whose steps mix decodes, a prompt cut by the token budget and continued, and fresh prompts with
    # unaligned lengths, so every kernel the timed run uses is compiled before the clock starts.
    llm.generate([prompt(1000) for _ in range(20)], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    torch.cuda.synchronize()
    compiles = watch_compiles()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    out_tokens = sum(o.num_output_tokens for o in outs)
    res.update(throughput_elapsed_s=elapsed, throughput_output_tok_s=out_tokens / elapsed,
               throughput_total_tok_s=(out_tokens + 1024 * len(prompts)) / elapsed,
               throughput_num_prompts=len(prompts), preemptions=engine.scheduler.num_preemptions,
               throughput_triton_compiles=[f"{seconds:.2f} s {name[:1500]}" for name, seconds in compiles])
    return res, ceil


def closed_loop_tok_s(engine, prompt, conc: int, requests_per_slot: int = 2, new: int = 128) -> float:
    """Output tok/s with `conc` requests (1024 in / `new` out) always in flight: a finished one is replaced at
    once, `conc * requests_per_slot` requests in all (a client sweep without the HTTP layer)."""
    from swiftlm import SamplingParams
    params = SamplingParams(max_tokens=new, ignore_eos=True, temperature=0.0)
    total, sent, done = conc * requests_per_slot, 0, 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    while done < total:
        while sent < total and sent - done < conc:
            engine.add_request(f"c{conc}-{sent}", prompt(1024), params)
            sent += 1
        done += sum(o.finished for o in engine.step())
    return total * new / (time.perf_counter() - start)


def run_transformers(cfg: dict, args: argparse.Namespace) -> dict:
    """transformers eager generate with random bf16 weights of the same config."""
    from transformers import AutoConfig, AutoModelForCausalLM
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in cfg.items()
                                     if k not in ("architectures", "transformers_version")})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    res: dict = {}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in (512, 8000):
            ids = torch.randint(1000, 30000, (1, n), generator=gen).cuda()
            model(ids)
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                model(ids, logits_to_keep=1)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            res[f"ttft_{n}_ms"] = statistics.median(times) * 1e3
        ids = torch.randint(1000, 30000, (1, 512), generator=gen).cuda()
        new = args.hf_new_tokens
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        res["tpot_b1_ms"] = (time.perf_counter() - t - first) / (new - 1) * 1e3
        batch = args.hf_batch
        ids = torch.randint(1000, 30000, (batch, 1024), generator=gen).cuda()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
        res.update(throughput_output_tok_s=batch * new / elapsed, throughput_batch=batch,
                   throughput_output_len=new)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/models/qwen3-8b")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--no-async-scheduling", action="store_true",
                    help="read each step's tokens before scheduling the next (the synchronous engine, for comparison)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-new-tokens", type=int, default=32)
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--long-context-batches", type=int, nargs="*", default=[],
                    help="also time decode steps at 8K context for these batch sizes")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[],
                    help="also measure closed-loop output tok/s at these concurrencies (1024 in / 128 out)")
    ap.add_argument("--skip-throughput", action="store_true", help="skip the 256-request offline throughput run")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with open(f"{args.model}/config.json") as f:
        cfg = json.load(f)
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)7.0f ms %(name)s: %(message)s")
    ours, ceil = run_swiftlm(args.model, args, cfg)
    gc.collect()  # the engine is unreachable once run_swiftlm returned; free its memory for transformers
    torch.cuda.empty_cache()
    hf = {} if args.skip_hf else run_transformers(cfg, args)
    # The GPU machine gets a copy of the work tree without .git: pass SWIFTLM_COMMIT there.
    commit = os.environ.get("SWIFTLM_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--verify", "-q", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "git_commit": commit,
              "command": " ".join(sys.argv), "model": args.model, "ceilings": ceil, "swiftlm": ours,
              "pdl": os.environ.get("SWIFTLM_PDL", "1") != "0", "async_scheduling": not args.no_async_scheduling,
              "transformers": hf}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=1))
    rows = [("batch-1 TPOT (512 in, 256 out) ms", "tpot_b1_ms"), ("TTFT 512 ms", "ttft_512_ms"),
            ("TTFT 8000 ms", "ttft_8000_ms"), ("throughput out tok/s", "throughput_output_tok_s")]
    print(f"\n{'metric':40s} {'swiftlm':>10s} {'transformers':>13s}")
    for label, key in rows:
        print(f"{label:40s} {ours.get(key, float('nan')):10.2f} {hf.get(key, float('nan')):13.2f}")
    for key in sorted(k for k in ours if k.startswith(("concurrency_", "decode_ctx8k"))):
        print(f"{key:40s} {ours[key]:10.2f}")
    print(f"decode floor {ours['decode_floor_ms']:.2f} ms (ratio {ours['tpot_floor_ratio']:.3f}); "
          f"TTFT8000 floor {ours['ttft_8000_floor_ms']:.1f} ms; startup {ours['startup_to_ready_s']:.1f} s")


if __name__ == "__main__":
    main()
