"""The decode-path Triton kernels (decode and prefill attention, RoPE, the GEMVs, the pending-id fill) compile for
an H100 (sm_90) here, without a GPU (`tests/compile_sm90.py`)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
REPO = Path(__file__).resolve().parents[1]


def _has_cuda_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_cuda_backend(), reason="this Triton has no CUDA backend")
def test_decode_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "compile_sm90.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    compiled = done.stdout.splitlines()
    assert sum(line.startswith("_decode_split_kernel rope=True") for line in compiled) == 8
    assert sum(line.startswith("_rope_qk_norm_cache_kernel") for line in compiled) == 4
    assert sum(line.startswith(("_gemv_fma_kernel", "_gemv_dot_kernel")) for line in compiled) == 12
    assert sum(line.startswith("_prefill_kernel") for line in compiled) == 2
    assert "_decode_merge_kernel" in compiled and "_fill_kernel" in compiled
