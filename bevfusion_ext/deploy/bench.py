"""Whole-frame timing through the runtime (warm-up, then P50 / P99 latency and frames per second, seed 5.2), and the
bundle's benchmark summary: those frame numbers next to every engine's trtexec times and the tegrastats power log."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .runtime import Frame, Runtime
from .streams import PipelinedRunner, Timed, run_sequential

MODES = ("sequential", "pipelined")
RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)mW/(\d+)mW")  # tegrastats: <rail> <now>mW/<average>mW


def latency_stats(latencies_s: list[float], wall_s: float) -> dict[str, float]:
    """P50 / P99 / mean latency in ms and throughput (frames over the wall time of the timed run)."""
    ms = np.asarray(latencies_s) * 1e3
    return {"frames": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "fps": len(ms) / wall_s}


def _runner(runtime: Runtime, mode: str, depth: int) -> Callable[[Iterable[Frame]], Iterator[Timed]]:
    if mode == "sequential":
        return lambda frames: run_sequential(runtime, frames)
    if mode == "pipelined":
        return PipelinedRunner(runtime, depth).run
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _cycle(frames: list[Frame], count: int) -> Iterator[Frame]:
    return itertools.islice(itertools.cycle(frames), count)


def timed_run(runtime: Runtime, frames: list[Frame], count: int, mode: str = "sequential",
              depth: int = 2) -> tuple[list[float], float]:
    """`count` frames (the given ones repeated) in one mode: per-frame latencies and the wall time, in seconds."""
    run = _runner(runtime, mode, depth)
    start = time.perf_counter()
    latencies = [t.latency_s for t in run(_cycle(frames, count))]
    return latencies, time.perf_counter() - start


def benchmark(runtime: Runtime, frames: list[Frame], iterations: int, warmup: int, mode: str = "sequential",
              depth: int = 2) -> dict:
    """`warmup` untimed frames, then `iterations` timed ones in one mode: latency percentiles and FPS."""
    timed_run(runtime, frames, warmup, mode, depth)
    return {"mode": mode, "warmup": warmup, **latency_stats(*timed_run(runtime, frames, iterations, mode, depth))}


def trtexec_times(path: Path) -> dict[str, float]:
    """P50 / P99 GPU compute and host latency (ms) of one trtexec --exportTimes file."""
    entries = [e for e in json.loads(path.read_text()) if "computeMs" in e]
    compute = np.asarray([e["computeMs"] for e in entries])
    latency = np.asarray([e.get("latencyMs", e["computeMs"]) for e in entries])
    return {"runs": len(entries), "compute_p50_ms": float(np.percentile(compute, 50)),
            "compute_p99_ms": float(np.percentile(compute, 99)), "latency_p50_ms": float(np.percentile(latency, 50))}


def tegrastats_power(path: Path) -> dict[str, dict[str, float]]:
    """Mean and peak of every power rail in a tegrastats log (its instantaneous readings, mW)."""
    readings: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        for rail, now, _ in RAIL.findall(line):
            readings.setdefault(rail, []).append(int(now))
    return {rail: {"samples": len(v), "mean_mw": float(np.mean(v)), "max_mw": float(max(v))}
            for rail, v in readings.items()}


def summarize(root: str | Path) -> str:
    """results/benchmark.md of a bundle from results/frames.*.json, results/*.times.json and logs/tegrastats.log."""
    root = Path(root)
    lines = ["# Benchmark", ""]
    frames = sorted((root / "results").glob("frames.*.json"))
    lines += ["## Whole frames through the runtime (lib/python)", ""]
    if frames:
        lines += ["| flavour | backend | mode | frames | P50 ms | P99 ms | FPS |", "|---|---|---|---|---|---|---|"]
        for path in frames:
            result = json.loads(path.read_text())
            lines += [f"| {result['flavour']} | {result['backend']} | {r['mode']} | {r['frames']} | "
                      f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['fps']:.1f} |" for r in result["modes"]]
    else:
        lines.append("No results/frames.*.json: the frame benchmark has not run.")
    times = sorted((root / "results").glob("*.times.json"))
    lines += ["", "## Every engine alone (trtexec --exportTimes)", ""]
    if times:
        lines += ["| engine | runs | GPU compute P50 ms | P99 ms | host latency P50 ms |", "|---|---|---|---|---|"]
        for path in times:
            t = trtexec_times(path)
            lines.append(f"| {path.name.removesuffix('.times.json')} | {t['runs']} | {t['compute_p50_ms']:.3f} | "
                         f"{t['compute_p99_ms']:.3f} | {t['latency_p50_ms']:.3f} |")
    else:
        lines.append("No results/*.times.json: trtexec has not run.")
    log = root / "logs" / "tegrastats.log"
    lines += ["", "## Power (tegrastats, scripts/tegrastats_power.sh)", ""]
    if log.is_file():
        power = tegrastats_power(log)
        lines += ["| rail | samples | mean mW | max mW |", "|---|---|---|---|",
                  *(f"| {rail} | {p['samples']} | {p['mean_mw']:.0f} | {p['max_mw']:.0f} |"
                    for rail, p in power.items())]
    else:
        lines.append("No logs/tegrastats.log: run `sudo bash scripts/tegrastats_power.sh` for power.")
    text = "\n".join(lines) + "\n"
    (root / "results").mkdir(exist_ok=True)
    (root / "results" / "benchmark.md").write_text(text)
    return text
