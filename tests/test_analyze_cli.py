"""tools/analyze.py: complexity table, latency profile and a real (metric-measuring) pruning sensitivity analysis."""
import json
import subprocess
import sys
from pathlib import Path

from helpers import TINY, run_tool

SMALL = ["--data.val.num_samples", "8"]


def analyze(*args: str) -> subprocess.CompletedProcess:
    return run_tool([sys.executable, "tools/analyze.py", *args, *SMALL], timeout=600)


def test_complexity_table_and_json(tmp_path: Path) -> None:
    proc = analyze("complexity", TINY, "--depth", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| module | params (M) | share | GFLOPs | share |" in proc.stdout and "encoders.camera" in proc.stdout
    rows = json.loads((tmp_path / "complexity.json").read_text())
    assert rows[0]["module"] == "(total)" and rows[0]["params"] > 0


def test_latency_profile(tmp_path: Path) -> None:
    proc = analyze("latency", TINY, "--depth", "1", "--repeats", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "latency.json").read_text())
    assert {r["module"] for r in rows if r["depth"] == 1} == {"encoders", "fuser", "decoder", "heads"}


def test_sensitivity_measures_the_metric_at_each_ratio(trained_run: Path, tmp_path: Path) -> None:
    proc = analyze("sensitivity", TINY, "--checkpoint", str(trained_run / "epoch_6.pth"), "--groups", "decoder",
                   "--ratios", "0.25", "0.75", "--out", str(tmp_path), "--data.val.split", "train")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "sensitivity.json").read_text())
    points = result["groups"]["decoder"]
    assert [p["ratio"] for p in points] == [0.25, 0.75]
    assert points[0]["params"] > points[1]["params"]
    # The metrics are measured, not placeholders: pruning 75 % of the decoder changes them.
    baseline = result["baseline"]
    assert points[1]["seg/mIoU"] != baseline["seg/mIoU"] or points[1]["det/NDS"] != baseline["det/NDS"]
    assert (tmp_path / "sensitivity.png").stat().st_size > 10_000


def test_sensitivity_without_checkpoint_is_a_clear_error() -> None:
    proc = analyze("sensitivity", TINY)
    assert proc.returncode == 2 and "needs --checkpoint" in proc.stderr and "Traceback" not in proc.stderr
