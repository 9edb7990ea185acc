"""Compile Triton kernels for an H100 (sm_90) on a machine without a GPU: Triton's front end, its GPU passes and
ptxas, no launch. The interpreter (how the CPU tests run kernels) accepts code that the GPU compiler rejects, such
as a loop variable whose type changes; this catches that before a device run does.

Run without TRITON_INTERPRET (the kernels must be JIT functions): `python tests/compile_sm90.py`. Prints one
line per compiled variant and exits non-zero on the first failure.
"""
from __future__ import annotations

import itertools
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1: the interpreter replaces the JIT functions this compiles")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from swiftlm.kernels import attention, awq, gemv, rope, sampled_ids  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)


def compile_kernel(fn, types: dict[str, str], constexprs: dict[str, object], num_warps: int = 4,
                   num_stages: int = 3) -> None:
    """`types`: Triton type strings of the pointer and float arguments; other runtime arguments are i32."""
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    consts = {(names.index(n),): v for n, v in constexprs.items()}
    triton.compile(ASTSource(fn, signature, constexprs=consts), target=H100,
                   options={"num_warps": num_warps, "num_stages": num_stages})


def decode_variants() -> None:
    floats = {n: "fp32" for n in ("qk_scale", "v_scale", "eps", "k_store_scale", "v_store_scale")}
    for fused, norm, fp8, direct in itertools.product((False, True), (False, True), (False, True), (False, True)):
        if not fused and norm:
            continue
        cache = "*fp8e4nv" if fp8 else "*bf16"
        types = {"q_ptr": "*bf16", "k_ptr": cache, "v_ptr": cache, "bt_ptr": "*i32", "seq_lens_ptr": "*i32",
                 "out_ptr": "*bf16" if direct else "*fp32", "lse_ptr": "*fp32", "kn_ptr": "*bf16", "vn_ptr": "*bf16",
                 "cs_ptr": "*fp32", "qw_ptr": "*bf16", "kw_ptr": "*bf16", "slot_ptr": "*i64", **floats}
        op = tl.float16 if fp8 else tl.bfloat16  # as `_operand_args` and `_decode_config` pick
        compile_kernel(attention._decode_split_kernel, types, dict(
            GROUP=4, GROUP_PAD=16, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_N=128 if fp8 else 64, DIRECT=direct,
            IN_DTYPE=tl.bfloat16, OP_DTYPE=op, DOT_DTYPE=op, DOT_PRECISION="tf32", PDL=True, ROPE=fused,
            HAS_NORM=norm, FP8_CACHE=fp8, FP8_MAX=448.0, PRE_ROUND=False))
        print(f"_decode_split_kernel rope={fused} norm={norm} fp8={fp8} direct={direct}")
    compile_kernel(attention._decode_merge_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16"},
                   dict(SPLITS_PAD=64, HEAD_DIM=128, PDL=True))
    print("_decode_merge_kernel")


def rope_variants() -> None:
    for norm, fp8 in itertools.product((False, True), (False, True)):
        cache = "*fp8e4nv" if fp8 else "*bf16"
        types = {n: "*bf16" for n in ("q_ptr", "k_ptr", "v_ptr", "qo_ptr", "ko_ptr", "qw_ptr", "kw_ptr")}
        types.update(pos_ptr="*i32", cs_ptr="*fp32", kc_ptr=cache, vc_ptr=cache, slot_ptr="*i64", eps="fp32",
                     k_scale="fp32", v_scale="fp32")
        compile_kernel(rope._rope_qk_norm_cache_kernel, types, dict(
            HEAD_DIM=128, HALF=64, HALF_PAD=64, BLOCK_H=2, HAS_NORM=norm, WRITE_CACHE=True, FP8_CACHE=fp8,
            FP8_MAX=448.0, PRE_ROUND=False, PDL=True), num_warps=2, num_stages=1)
        print(f"_rope_qk_norm_cache_kernel norm={norm} fp8={fp8}")


def prefill_variants() -> None:
    for fp8 in (False, True):
        cache = "*fp8e4nv" if fp8 else "*bf16"
        op = tl.float16 if fp8 else tl.bfloat16
        compile_kernel(attention._prefill_kernel, {
            "q_ptr": "*bf16", "k_ptr": cache, "v_ptr": cache, "bt_ptr": "*i32", "cu_q_ptr": "*i32",
            "seq_lens_ptr": "*i32", "out_ptr": "*bf16", "qk_scale": "fp32", "v_scale": "fp32"}, dict(
            GROUP=4, HEAD_DIM=128, BLOCK_SIZE=16, BLOCK_M=128, BLOCK_N=128, OP_DTYPE=op, DOT_DTYPE=op,
            DOT_PRECISION="tf32"), num_warps=8, num_stages=3)
        print(f"_prefill_kernel fp8={fp8}")


def gemv_variants() -> None:
    """The decode GEMVs in their input modes (plain, RMSNorm with a residual, SiLU-and-mul), bf16 and e4m3
    weights: the shapes of `GEMV_CONFIGS` (M = 1 on CUDA cores, M = 16 on tensor cores)."""
    for kernel, mode, weight in itertools.product(("fma", "dot"), ("plain", "norm", "silu"), ("*bf16", "*fp8e4nv")):
        types = {n: "*bf16" for n in ("x_ptr", "b_ptr", "out_ptr", "r_ptr", "g_ptr", "r_out_ptr")}
        types.update(w_ptr=weight, s_ptr="*fp32", ws_ptr="*fp32", cnt_ptr="*i32", eps="fp32")
        fma = kernel == "fma"
        flags = dict(HAS_SCALE=weight == "*fp8e4nv", HAS_BIAS=False, EVEN_K=True, BLOCK_N=4 if fma else 64,
                     BLOCK_K=1024 if fma else 128, SILU_MUL=mode == "silu", NORM=mode == "norm",
                     HAS_RES=mode == "norm", PDL=True)
        if fma:
            chunk = 16 if weight == "*fp8e4nv" else 8  # one 16-byte weight vector per thread, as `gemv` picks
            compile_kernel(gemv._gemv_fma_kernel, types, dict(flags, BLOCK_M=1, CHUNK=chunk, NUM_STAGES=1),
                           num_stages=1)
        else:
            compile_kernel(gemv._gemv_dot_kernel, types, dict(flags, BLOCK_M=16, DOT_F32=False), num_stages=4)
        print(f"_gemv_{kernel}_kernel {mode} {weight}")


def awq_gemv_variants() -> None:
    """The AWQ decode GEMV (packed-fp16 inline PTX) with fp16 and bf16 activations at every M bucket's config."""
    for dtype, (bucket, cfg) in itertools.product(("fp16", "bf16"), awq.AWQ_GEMV_CONFIGS.items()):
        types = {"x_ptr": f"*{dtype}", "qw_ptr": "*i32", "qz_ptr": "*i32", "s_ptr": "*fp16", "b_ptr": f"*{dtype}",
                 "out_ptr": f"*{dtype}", "ws_ptr": "*fp32", "cnt_ptr": "*i32"}
        flags = {name: value for name, value in cfg.items() if name != "num_warps"}
        compile_kernel(awq._awq_gemv_kernel, types, dict(flags, GROUP_SIZE=128, HAS_BIAS=False, BLOCK_M=bucket,
                                                         ASM=True, PDL=True), num_warps=cfg["num_warps"])
        print(f"_awq_gemv_kernel {dtype} M={bucket}")


def fill_variant() -> None:
    compile_kernel(sampled_ids._fill_kernel, {"ids_ptr": "*i32", "pos_ptr": "*i32", "row_ptr": "*i32",
                                             "sampled_ptr": "*i64"}, dict(BLOCK=256))
    print("_fill_kernel")


if __name__ == "__main__":
    decode_variants()
    rope_variants()
    prefill_variants()
    gemv_variants()
    awq_gemv_variants()
    fill_variant()
