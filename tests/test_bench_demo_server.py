"""`swiftlm bench` against the real server: `python -m swiftlm serve` (demo model, CPU) in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from swiftlm.bench import cli
from swiftlm.demo import demo_model_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server() -> Iterator[str]:
    port = _free_port()
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "swiftlm", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--num-kv-blocks", "512", "--max-model-len", "1024"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        assert proc.poll() is None, f"server exited: {proc.stderr.read() if proc.stderr else ''}"
        assert time.monotonic() < deadline, "server did not become healthy"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0  # drained and shut down: a clean exit, not death by the signal


def test_sweep_against_demo_server_writes_results(demo_server, tmp_path) -> None:
    rc = cli.main(["serve", "--base-url", demo_server, "--tokenizer", demo_model_path(), "--num-prompts", "4",
                   "--random-input-len", "16", "--random-output-len", "8", "--max-concurrency", "1,2",
                   "--ignore-eos", "--extra-body", '{"logprobs": 1}', "--result-dir", str(tmp_path),
                   "--label", "demo", "--disable-tqdm"])
    assert rc == 0
    [result] = tmp_path.glob("serve-demo-*.json")
    data = json.loads(result.read_text())
    for level in data["results"]:
        m = level["metrics"]
        assert m["completed"] == 4 and m["failed"] == 0 and m["total_output_tokens"] == 32
        assert m["total_input_tokens"] == 64
    assert result.with_suffix(".md").exists() and len(list(tmp_path.glob("*.png"))) == 3


def test_reliability_against_demo_server(demo_server, tmp_path) -> None:
    rc = cli.main(["reliability", "--base-url", demo_server, "--users", "20", "--duration", "2",
                   "--max-tokens", "4", "--result-dir", str(tmp_path), "--disable-tqdm"])
    assert rc == 0
