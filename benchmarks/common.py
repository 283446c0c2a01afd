"""Shared benchmark plumbing: the machine, the width-scaled `full` model and its input, timing, peak RSS, results."""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.models import reference_config
from bevfusion_ext.models.config import SIZES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The `full` model's channel knobs; full_at_width scales these and leaves depths, head counts and the scene alone.
CHANNEL_KNOBS = ("neck_channels", "dtransform_channels", "camera_channels", "lidar_base_channels",
                 "lidar_encoder_channels", "lidar_channels", "fuser_channels", "second_channels", "fpn_channels",
                 "hidden_channel", "ffn_channel", "head_conv")
CHANNEL_MULTIPLE = 8  # the pruning recipes' round_to, and the TransFusion attention's head count
T = TypeVar("T")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version()}


def run_cli(command: list[str]) -> float:
    """Run one of the project's CLIs from the repository root, as a user does: its wall seconds, or exit with the
    command and its stderr tail when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(map(str, command))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def threads_option(parser: argparse.ArgumentParser) -> None:
    """--threads for torch's intra-op pool: at 1, a job on the other core cannot stall every op's thread barrier."""
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: a shared machine)")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _scaled(value: Any, width: float, multiple: int) -> Any:
    """A channel count (or nested tuple of them) times width, rounded to a positive multiple."""
    if isinstance(value, tuple):
        return tuple(_scaled(v, width, multiple) for v in value)
    return max(multiple, round(value * width / multiple) * multiple)


def width_knobs(width: float) -> dict[str, Any]:
    """The `full` model's channel knobs times width; Swin's embed_dims rounds to a multiple of every stage's head
    count and of CHANNEL_MULTIPLE (24 for `full`), the others to CHANNEL_MULTIPLE."""
    full = SIZES["full"]
    knobs = {knob: _scaled(full[knob], width, CHANNEL_MULTIPLE) for knob in CHANNEL_KNOBS}
    knobs["embed_dims"] = _scaled(full["embed_dims"], width, math.lcm(CHANNEL_MULTIPLE, *full["num_heads"]))
    return knobs


def full_at_width(width: float) -> dict:
    """The `full` reference config at a channel-width multiplier, so costs can be measured against model size."""
    return reference_config("full", **width_knobs(width))


def synthetic_batch(size: int) -> dict:
    """The first `size` synthetic samples, collated: the same input for every model and repeat."""
    ds = SyntheticBEVDataset(size)
    return collate([ds[i] for i in range(size)])


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and its wall time in seconds, for phases whose result is needed afterwards."""
    tic = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - tic


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = [timed(fn)[1] for _ in range(repeats)]
    return statistics.median(times), times


def write_section(name: str, markdown: str) -> Path:
    """Write this benchmark's Markdown section (results/<name>.md); summarize.py stitches them into README.md."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(markdown.rstrip() + "\n")
    return path


def figure(name: str, **subplots: Any) -> tuple[Any, Any, Path]:
    """A headless matplotlib figure and the results/<name>.png path to save it to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(exist_ok=True)
    fig, axes = plt.subplots(**subplots)
    return fig, axes, RESULTS / f"{name}.png"


def save(name: str, result: dict[str, Any]) -> Path:
    """Write a result next to the others, with the machine it ran on."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2))
    return path
