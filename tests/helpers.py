"""Run the project's CLIs the way users do, from the repository root with the venv on PATH."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bevfusion_ext.compression import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The user's BEVFusion checkout the integration tests run on: $BEVFUSION_ROOT, else the snapshot beside the repo.
BEVFUSION_ROOT = Path(os.environ.get("BEVFUSION_ROOT") or ROOT.parent / "shared/third_party/bevfusion").resolve()
SWINT_DET = "configs/nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml"
SYNTHETIC_CPU = "configs/bevfusion/synthetic_cpu.yaml"
needs_bevfusion = pytest.mark.skipif(
    not (BEVFUSION_ROOT / "mmdet3d/models/fusion_models").is_dir(),
    reason=f"no BEVFusion checkout at {BEVFUSION_ROOT} (set BEVFUSION_ROOT to run the real-model tests)",
)


def use_bevfusion() -> None:
    """Import the BEVFusion checkout in this process over the CPU op stand-ins, as `--cpu-ops` does."""
    from bevfusion_ext.runner.upstream import prepare_bevfusion

    prepare_bevfusion(BEVFUSION_ROOT / SWINT_DET, cpu_ops=True)
TINY = "configs/synthetic/multitask/tiny.yaml"
# Small and deterministic: no stochastic depth / dropout, so an interrupted + resumed run can equal a straight one.
FAST = [
    "--data.train.num_samples",
    "16",
    "--data.val.num_samples",
    "8",
    "--data.samples_per_gpu",
    "4",
    "--log_config.interval",
    "1",
    "--model.encoders.camera.backbone.drop_path_rate",
    "0.0",
    "--model.heads.object.dropout",
    "0.0",
]


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("WANDB_MODE", "offline")
    return env


def run_tool(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command from the repository root with the venv on PATH; output captured as text."""
    return subprocess.run(args, cwd=ROOT, env=tool_env(), capture_output=True, text=True, timeout=timeout)


def train_cmd(run_dir: Path, *opts: str, np: int = 0) -> list[str]:
    """tools/train_compressed.py on the tiny config, under `torchpack dist-run -np N` when np > 0."""
    cmd = [sys.executable, "tools/train_compressed.py", TINY, "--run-dir", str(run_dir), *FAST, *opts]
    return ["torchpack", "dist-run", "-np", str(np), *cmd] if np else cmd


def jsonl(path: Path) -> list[dict]:
    """The records of a run-directory JSONL log."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Block until `path` exists (a checkpoint to interrupt at), failing if the process ends first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, "training ended before the checkpoint to interrupt at appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.2)


def kill_after_first_epoch_then_resume(run_dir: Path, *opts: str) -> subprocess.CompletedProcess:
    """Start a single-process run, SIGKILL it once epoch_1.pth exists, then `--resume_from` that checkpoint."""
    proc = subprocess.Popen(train_cmd(run_dir, *opts), cwd=ROOT, env=tool_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for(run_dir / "epoch_1.pth", proc, timeout=300)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be interrupted"
    return run_tool(train_cmd(run_dir, *opts, "--resume_from", str(run_dir / "epoch_1.pth")))


def straight_and_resumed(tmp_path: Path, epochs: int, *opts: str) -> tuple[dict, dict]:
    """Final checkpoints of an uninterrupted run and of the same run killed after its first epoch (one pruning event
    applied) and resumed; both runs' states must then be equal bit for bit (assert_equal_states)."""
    straight = run_tool(train_cmd(tmp_path / "straight", *opts))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    resumed = kill_after_first_epoch_then_resume(killed, *opts)
    assert len(read_checkpoint(killed / "epoch_1.pth")["meta"]["compression"]["pruning"]["applied"]) == 1
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return read_checkpoint(tmp_path / f"straight/epoch_{epochs}.pth"), read_checkpoint(killed / f"epoch_{epochs}.pth")


def assert_equal_states(a: dict, b: dict) -> None:
    """Two checkpoints hold the same tensors under the same names, bit for bit."""
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=0, msg=name)


def newest_log(run_dir: Path) -> str:
    """The text log of the latest launch into `run_dir` (logs are named by start time)."""
    return sorted(run_dir.glob("*.log"))[-1].read_text()


def train_from(baseline: tuple[Path, subprocess.CompletedProcess], run_dir: Path, *opts: str, np: int = 2,
               ) -> tuple[Path, subprocess.CompletedProcess]:
    """A compression stage started from the shared baseline run's last checkpoint."""
    base_dir, proc = baseline
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, run_tool(train_cmd(run_dir, *opts, "--load_from", str(base_dir / "epoch_2.pth"), np=np))


def warm_bn(model: torch.nn.Module, batches: list[dict]) -> torch.nn.Module:
    """Train-mode forwards so BN running statistics are not at their init (calibration runs in eval mode)."""
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(return_loss=True, **batch)
    return model.eval()
