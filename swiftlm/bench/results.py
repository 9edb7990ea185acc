"""Result files: one JSON per run (environment + every figure), a markdown table, PNG plots, and `compare`.

Every kind of run shares one JSON shape, `{"kind", "label", "environment", "args", "results": [{"key",
"metrics", ...}]}`, so `bench compare` can line up any runs by result key without knowing where they came from.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from swiftlm.bench.serve import LevelResult

# (metric key, column title) of the serve table, in the order vLLM prints them.
SERVE_COLUMNS = (
    ("completed", "ok"), ("failed", "failed"), ("duration_s", "duration s"),
    ("request_throughput", "req/s"), ("output_throughput", "out tok/s"), ("total_token_throughput", "total tok/s"),
    ("mean_ttft_ms", "TTFT mean"), ("median_ttft_ms", "TTFT p50"), ("p90_ttft_ms", "TTFT p90"),
    ("p99_ttft_ms", "TTFT p99"), ("mean_tpot_ms", "TPOT mean"), ("median_tpot_ms", "TPOT p50"),
    ("p90_tpot_ms", "TPOT p90"), ("p99_tpot_ms", "TPOT p99"), ("mean_itl_ms", "ITL mean"),
    ("median_itl_ms", "ITL p50"), ("p90_itl_ms", "ITL p90"), ("p99_itl_ms", "ITL p99"),
    ("mean_e2el_ms", "E2E mean"), ("median_e2el_ms", "E2E p50"), ("p90_e2el_ms", "E2E p90"),
    ("p99_e2el_ms", "E2E p99"), ("max_concurrent_requests", "peak conc"),
)


def _run(cmd: list[str]) -> str | None:
    """Stdout of a probe command, or None if it is missing, fails or hangs: the environment is best effort."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _swiftlm_version() -> str | None:
    """Installed distribution version, else the package's own `__version__` (running from a source checkout)."""
    import swiftlm

    return _version("swiftlm") or getattr(swiftlm, "__version__", None)


def collect_environment() -> dict[str, Any]:
    """Enough context to tell two result files apart: host, GPU and driver, library versions, code revision."""
    env: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": list(sys.argv),
        "swiftlm": _swiftlm_version(),
        "triton": _version("triton"),
        "git_commit": os.environ.get("SWIFTLM_COMMIT") or _run(["git", "rev-parse", "--verify", "-q", "HEAD"]),
        "git_dirty": None,
        "gpus": [],
        "driver": None,
    }
    if env["git_commit"] is not None:
        env["git_dirty"] = bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        env["torch"] = None
    if shutil.which("nvidia-smi"):
        out = _run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
        if out:
            rows = [line.split(", ") for line in out.splitlines()]
            env["driver"] = rows[0][-1]
            env["gpus"] = env["gpus"] or [r[0] for r in rows]
    return env


def _jsonable(value: Any) -> Any:
    """Arguments and figures as strict JSON: non-finite floats become strings, unknown objects their repr."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def make_payload(kind: str, label: str, args: dict[str, Any], results: list[dict[str, Any]],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    payload = {"kind": kind, "label": label, "environment": collect_environment(),
               "args": {k: v for k, v in args.items() if k != "func"}, "results": results, **(extra or {})}
    return _jsonable(payload)


def serve_results(levels: Sequence[LevelResult], detailed: bool = False) -> list[dict[str, Any]]:
    """JSON results of a serve sweep; per-request rows always, full ITL lists only when `detailed`."""
    out = []
    for level in levels:
        requests = []
        for r in level.records:
            row: dict[str, Any] = {"success": r.success, "ttft_s": r.ttft, "latency_s": r.latency,
                                   "prompt_tokens": r.prompt_tokens, "output_tokens": r.output_tokens,
                                   "error": r.error, "error_detail": r.error_detail[:300]}
            if detailed:
                row["itl_s"] = r.itl
            requests.append(row)
        out.append({"key": level.key, "max_concurrency": level.max_concurrency,
                    "request_rate": level.request_rate, "metrics": level.metrics.flat(),
                    "failure_reasons": level.metrics.failure_reasons, "requests": requests})
    return out


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.3g}" if abs(value) >= 1e6 else f"{value:.2f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def serve_markdown(label: str, results: Sequence[dict[str, Any]]) -> str:
    """One row per concurrency level (latencies in ms), then every failure reason with its count."""
    header = ["max conc"] + [title for _, title in SERVE_COLUMNS]
    rows = [[r["key"].split("=", 1)[1]] + [r["metrics"].get(k) for k, _ in SERVE_COLUMNS] for r in results]
    text = f"## bench serve: {label}\n\nLatencies in ms.\n\n{markdown_table(header, rows)}\n"
    failures = []
    for r in results:
        for reason, n in r.get("failure_reasons", {}).items():
            example = next((q["error_detail"] for q in r["requests"] if q["error"] == reason and q["error_detail"]), "")
            failures.append(f"- {r['key']}: {reason} x{n}" + (f" (e.g. {example[:200]!r})" if example else ""))
    if failures:
        text += "\nFailures:\n\n" + "\n".join(failures) + "\n"
    return text


def metrics_markdown(title: str, results: Sequence[dict[str, Any]], notes: Sequence[str] = ()) -> str:
    """Metric-per-row table for runs with a single result (latency, throughput, reliability)."""
    parts = [f"## {title}\n"]
    for r in results:
        parts.append(markdown_table(["metric", r["key"]], list(r["metrics"].items())))
    parts += [f"- note: {n}" for n in notes]
    return "\n\n".join(parts) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_serve(results: Sequence[dict[str, Any]], out_dir: Path, stem: str) -> list[Path]:
    """Throughput vs concurrency, TTFT/TPOT vs concurrency, and the E2E latency CDF of every level.

    Concurrency levels are evenly spaced categories (they are usually powers of two, and may include "inf").
    """
    plt = _plt()
    x = list(range(len(results)))
    ticks = [r["key"].split("=", 1)[1] for r in results]

    def series(key: str) -> list[float]:
        return [float("nan") if r["metrics"].get(key) is None else r["metrics"][key] for r in results]

    def style(ax: Any, ylabel: str, title: str) -> None:
        ax.set_xticks(x, ticks)
        ax.set(xlabel="max concurrency", ylabel=ylabel, title=title)
        ax.legend()
        ax.grid(alpha=0.3)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, series("output_throughput"), "o-", label="output tok/s")
    ax.plot(x, series("total_token_throughput"), "s-", label="total tok/s")
    style(ax, "tokens/s", "Throughput vs concurrency")
    paths = [_save(fig, out_dir / f"{stem}-throughput.png")]

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("ttft", "tpot"), strict=True):
        for stat in ("mean", "median", "p99"):
            ax.plot(x, series(f"{stat}_{name}_ms"), "o-", label=stat)
        style(ax, "ms", f"{name.upper()} vs concurrency")
    paths.append(_save(fig, out_dir / f"{stem}-ttft-tpot.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        lat = np.sort([q["latency_s"] * 1000 for q in r["requests"] if q["success"]])
        ax.plot(lat, np.arange(1, len(lat) + 1) / max(len(lat), 1), label=r["key"])
    ax.set(xlabel="E2E latency (ms)", ylabel="fraction of requests", title="Latency CDF")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / f"{stem}-cdf.png"))
    return paths


def plot_cdf(latencies_s: Sequence[float], path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    lat = np.sort(np.asarray(latencies_s) * 1000)
    ax.plot(lat, np.arange(1, len(lat) + 1) / max(len(lat), 1))
    ax.set(xlabel="latency (ms)", ylabel="fraction of requests", title=title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def file_stem(kind: str, label: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return f"{kind}-{safe}-{stamp}"


def write_run(out_dir: str | Path, stem: str, payload: dict[str, Any], markdown: str) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return [json_path, md_path]


def ratio(value: Any, base: Any) -> float | None:
    """value / base for numbers, None when either is missing or the base is zero."""
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or isinstance(value, bool):
        return None
    if base == 0 or not math.isfinite(base) or not math.isfinite(value):
        return None
    return value / base


def compare_markdown(runs: Sequence[dict[str, Any]], labels: Sequence[str]) -> str:
    """Side-by-side table per result key of the first run, each later run shown as value (x ratio to the first).

    Ratios are plain value/first: above 1 is better for throughputs and worse for latencies.
    """
    if len(runs) < 2:
        raise ValueError("compare needs at least two result files")
    kinds = {r.get("kind") for r in runs}
    parts = [f"# bench compare ({', '.join(sorted(str(k) for k in kinds))})\n",
             "Each later run: value (xratio vs the first). Above 1 is better for throughputs, worse for latencies.\n"]
    by_key = [{res["key"]: res["metrics"] for res in run["results"]} for run in runs]
    for key, base in by_key[0].items():
        rows = []
        for metric, v0 in base.items():
            if not isinstance(v0, (int, float)) or isinstance(v0, bool):
                continue
            row: list[Any] = [metric, fmt(v0)]
            for other in by_key[1:]:
                v = other.get(key, {}).get(metric)
                r = ratio(v, v0)
                row.append(f"{fmt(v)} (x{r:.2f})" if r is not None else fmt(v))
            rows.append(row)
        parts.append(f"## {key}\n\n" + markdown_table(["metric", *labels], rows) + "\n")
    return "\n".join(parts)


def load_runs(paths: Sequence[str | Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Result JSONs and display labels (their label, disambiguated by file name when two share one)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    labels = [str(r.get("label") or Path(p).stem) for r, p in zip(runs, paths, strict=True)]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({Path(p).stem})" for lab, p in zip(labels, paths, strict=True)]
    return runs, labels
