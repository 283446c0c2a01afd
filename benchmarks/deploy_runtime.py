"""Whole frames through the deploy runtime on this CPU (onnxruntime parts + the torch kernels between them): P50 / P99
frame latency and frames per second, sequential vs pipelined (pre / camera || lidar / heads / post threads), for the
demo bundle (scripts/demo.sh's trained, pruned, QAT tiny model) and the full-size reference model.

    .venv/bin/python benchmarks/deploy_runtime.py [--demo-bundle runs/demo/deploy] [--iterations 60]
        [--full-iterations 12]

The full-size model (configs/synthetic/multitask/full.yaml, seeded weights with warmed BatchNorm statistics: latency
only) is exported through tools/export_engine.py into a temporary bundle. Frames are each bundle's data/sample_data,
repeated. Every setting checks first that the pipelined outputs equal the sequential ones (else it stops).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import torch
from common import ROOT, machine, run_cli, save, write_section

from bevfusion_ext.compression import atomic_save
from bevfusion_ext.datasets import collate
from bevfusion_ext.deploy import Runtime, load_frames
from bevfusion_ext.deploy.bench import latency_stats, timed_run
from bevfusion_ext.deploy.streams import PipelinedRunner, run_sequential
from bevfusion_ext.models import build_model
from bevfusion_ext.runner.builder import build_dataset
from bevfusion_ext.runner.train import prepare_config

FULL = "configs/synthetic/multitask/full.yaml"
# (label, mode, frames in flight, onnxruntime intra-op threads per part = torch threads)
SETTINGS = (
    ("sequential, 2 threads", "sequential", 1, 2),
    ("sequential, 1 thread", "sequential", 1, 1),
    ("pipelined, 2 in flight, 1 thread per part", "pipelined", 2, 1),
    ("pipelined, 3 in flight, 1 thread per part", "pipelined", 3, 1),
)


@contextlib.contextmanager
def autogroup_nice(nice: int | None) -> Iterator[None]:
    """Run with this session's scheduler autogroup at `nice` (restored afterwards). With autogroups (Linux default) the
    CPU is shared per session, not per thread, so on a machine busy with other sessions more threads get no more CPU
    unless the session's weight is raised; negative values need root."""
    path = Path("/proc/self/autogroup")
    if nice is None:
        yield
        return
    before = int(path.read_text().split()[-1])
    path.write_text(str(nice))
    try:
        yield
    finally:
        path.write_text(str(before))


def full_bundle(tmp: Path) -> Path:
    """The full-size reference model (seeded, BatchNorm statistics warmed on 2 frames) exported by the CLI."""
    cfg, sources = prepare_config(str(ROOT / FULL), [])
    dataset = build_dataset(cfg.data.val, "data.val", sources)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    with torch.no_grad():
        model(return_loss=True, **collate([dataset[0], dataset[1]]))
    atomic_save({"meta": {}, "state_dict": model.state_dict()}, tmp / "full.pth")
    out = tmp / "full_bundle"
    run_cli([sys.executable, "tools/export_engine.py", FULL, str(tmp / "full.pth"), "--out", str(out), "--allow-dense"])
    return out


def same_outputs(runtime: Runtime, frames: list, depth: int) -> bool:
    """Pipelined predictions equal the sequential ones, tensor for tensor."""
    pairs = zip(run_sequential(runtime, frames), PipelinedRunner(runtime, depth).run(frames), strict=True)
    return all(torch.equal(v, b.prediction.result()[k]) for a, b in pairs for k, v in a.prediction.result().items())


def measure(bundle: Path, iterations: int, warmup: int, rounds: int) -> dict:
    """Every setting on one bundle's sample frames, alternating in `rounds` rounds so that load from other jobs on the
    machine falls on all settings alike."""
    frames = load_frames([bundle / "data" / "sample_data"])
    runtimes, latencies, walls = {}, {}, {}
    for label, mode, depth, threads in SETTINGS:
        torch.set_num_threads(threads)
        runtimes[label] = runtime = Runtime(bundle, threads=threads)
        latencies[label], walls[label] = [], 0.0
        if not same_outputs(runtime, frames, max(depth, 2)):
            raise RuntimeError(f"{label}: the pipelined outputs differ from the sequential ones")
        timed_run(runtime, frames, warmup, mode, depth)
    for _ in range(rounds):
        for label, mode, depth, threads in SETTINGS:
            torch.set_num_threads(threads)
            times, wall = timed_run(runtimes[label], frames, iterations // rounds, mode, depth)
            latencies[label] += times
            walls[label] += wall
    rows = []
    for label, mode, depth, threads in SETTINGS:
        row = {"setting": label, "mode": mode, "threads": threads, "depth": depth,
               **latency_stats(latencies[label], walls[label])}
        print(f"  {label}: P50 {row['p50_ms']:.1f} ms, P99 {row['p99_ms']:.1f} ms, {row['fps']:.2f} FPS")
        rows.append(row)
    return {"bundle": str(bundle), "frame": list(frames[0].img.shape), "rows": rows}


def markdown(result: dict) -> str:
    """results/deploy_runtime.md."""
    lines = [
        "## Deployed frames: sequential vs pipelined runtime (`deploy_runtime.py`)",
        "",
        "Whole frames through `bevfusion_ext.deploy` (the bundle's lib/python): onnxruntime "
        f"{result['onnxruntime']} CPU parts (FP32) and the torch kernels between them (depth image, BEV pool planned "
        "once per calibration, voxelization, box decoding), on this "
        f"{result['machine']['cores']}-core CPU shared with other jobs (load average {result['load_average'][0]:.1f} "
        f"at the start, {result['load_average'][1]:.1f} at the end"
        + ("" if result["autogroup_nice"] is None else
           f"; this session's scheduler autogroup at nice {result['autogroup_nice']}, as the CPU is shared per "
           "session and more threads would otherwise get no more of it")
        + "). Latency runs from a frame's admission to its "
        "boxes and masks; FPS is frames over the wall time of the timed run. Pipelined: pre-processing, the camera "
        "branch, the lidar branch, fuser + heads and post-processing on five threads, camera and lidar concurrently, "
        "with at most 2 or 3 frames in flight; its outputs equal the sequential runner's in every setting "
        f"(checked first). The settings alternate in {result['rounds']} rounds, so load from other jobs falls on all "
        "of them alike. Two intra-op threads per part are slower than one here: the second core is shared with other "
        "sessions' jobs. The full-size model runs at the synthetic scene's input size (not BEVFusion's 6 x 256x704).",
        "",
    ]
    for name, entry in result["models"].items():
        lines += [f"**{name}** ({entry['description']}; frames of {entry['frame'][0]} cameras "
                  f"{entry['frame'][2]}x{entry['frame'][3]}, {entry['iterations']} timed after {entry['warmup']} "
                  "warm-up):", "",
                  "| setting | P50 ms | P99 ms | FPS |", "|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['fps']:.2f} |"
                  for r in entry["rows"]]
        lines.append("")
    lines.append("(`results/deploy_runtime.json`)")
    return "\n".join(lines)


def main() -> None:
    """Measure the demo bundle and the full-size model, save JSON and the Markdown section."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-bundle", type=Path, default=ROOT / "runs" / "demo" / "deploy")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--full-iterations", type=int, default=12)
    parser.add_argument("--full-warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="the settings alternate this many times")
    parser.add_argument("--autogroup-nice", type=int, help="scheduler weight of this session (e.g. -10, root); "
                        "see autogroup_nice")
    args = parser.parse_args()
    if not (args.demo_bundle / "report.json").is_file():
        raise SystemExit(f"error: no demo bundle at {args.demo_bundle}: run `bash scripts/demo.sh` or pass "
                         "--demo-bundle")
    start_load = os.getloadavg()[0]
    models = {}
    with tempfile.TemporaryDirectory() as tmp, autogroup_nice(args.autogroup_nice):
        print(f"demo bundle {args.demo_bundle}")
        models["demo (tiny, pruned + QAT)"] = {"description": f"{args.demo_bundle}, FP32 parts",
                                               "iterations": args.iterations, "warmup": args.warmup,
                                               **measure(args.demo_bundle, args.iterations, args.warmup, args.rounds)}
        print("full-size reference model")
        bundle = full_bundle(Path(tmp))
        models["full-size reference model"] = {"description": f"{FULL}, seeded weights, FP32 parts",
                                               "iterations": args.full_iterations, "warmup": args.full_warmup,
                                               **measure(bundle, args.full_iterations, args.full_warmup, args.rounds)}
    result = {"onnxruntime": ort.__version__, "machine": machine(), "load_average": [start_load, os.getloadavg()[0]],
              "rounds": args.rounds, "autogroup_nice": args.autogroup_nice, "models": models}
    save("deploy_runtime", result)
    write_section("deploy_runtime", markdown(result))


if __name__ == "__main__":
    main()
