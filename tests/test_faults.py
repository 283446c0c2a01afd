"""SIGKILL one rank of a 2-rank `torchpack dist-run` at randomised points in every phase of a compression run
(baseline fine-tune, between pruning events, calibration, QAT, checkpoint writes): each launch fails fast, and the
chain of `--resume_from latest.pth` relaunches ends with exactly the model, quantizers, schedule and optimizer of an
uninterrupted run. Set FAULT_SEED to replay a chain; the seed in use is in every failure message."""

import os
import random
import re
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import ROOT, tool_env, train_cmd

from bevfusion_ext.compression import read_checkpoint

# Epochs 0-1 baseline fine-tune; pruning events before iterations 8, 10 (epoch 2), 12, 14 (epoch 3); calibration at
# the start of epoch 4; QAT in epochs 4-5. Four iterations per epoch (16 samples, 2 ranks x 2 per batch).
PIPELINE = [
    "--recipe", "configs/compression/prune_seed.yaml", "--recipe", "configs/compression/qat_int8.yaml",
    "--compression.pruning.round_to", "4", "--compression.pruning.schedule.start_epoch", "2",
    "--compression.pruning.schedule.end_epoch", "4", "--compression.quantization.calibration.epoch", "4",
    "--compression.quantization.calibration.num_batches", "2", "--compression.quantization.qat.freeze_bn_epoch", "5",
    "--max_epochs", "6", "--data.samples_per_gpu", "2", "--evaluation.enabled", "False",
]
SEED = int(os.environ.get("FAULT_SEED", random.SystemRandom().randrange(2**16)))
EXIT_TIMEOUT = 90  # seconds from the kill to the whole launch having exited: "fails fast, no hang"


@dataclass
class KillPoint:
    """Where to strike: a condition on the launch's own log / run directory, then a random delay."""

    phase: str
    ready: Callable[[str, Path], bool]
    max_delay: float = 0.0
    landed: Callable[[str], bool] = lambda log: True  # checked on the log right after the kill


def after(pattern: str) -> Callable[[str, Path], bool]:
    return lambda log, _: re.search(pattern, log) is not None


def writing(epoch: int) -> Callable[[str, Path], bool]:
    return lambda _, run_dir: any(run_dir.glob(f".epoch_{epoch}.pth.tmp-*"))


def kill_points(rng: random.Random) -> list[KillPoint]:
    """Twelve kill points in run order; each one lies after any checkpoint the previous kill can leave behind."""
    def iteration(epoch: int) -> str:
        return rf"Epoch \[{epoch}\]\[{rng.randint(1, 2)}/4\]"  # at least two iterations left

    not_calibrated = lambda log: "quantizers calibrated" not in log  # noqa: E731
    return [
        KillPoint("baseline fine-tune", after(iteration(2)), 0.3),
        KillPoint("checkpoint write", writing(2)),
        KillPoint("between pruning events", after("pruning event 1 at"), 0.4),
        KillPoint("between pruning events", after("pruning event 2 at"), 0.4),
        KillPoint("checkpoint write", writing(3)),
        KillPoint("between pruning events", after("pruning event 3 at"), 0.4),
        KillPoint("checkpoint write", writing(4)),
        KillPoint("calibration", after("calibrating on"), 1.0, not_calibrated),
        KillPoint("calibration", after("calibrating on"), 1.0, not_calibrated),
        KillPoint("QAT", after(iteration(5)), 0.3),
        KillPoint("checkpoint write", writing(5)),
        KillPoint("QAT", after(iteration(6)), 0.3),
    ]


def rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the training processes below a `torchpack dist-run` launcher (from /proc)."""
    children = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children[int(stat.read_text().rsplit(")", 1)[1].split()[1])].append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    ranks, stack = {}, [launcher]
    while stack:
        pid = stack.pop()
        stack.extend(children[pid])
        try:
            cmdline, environ = (Path(f"/proc/{pid}/{f}").read_bytes() for f in ("cmdline", "environ"))
        except OSError:
            continue
        rank = re.search(rb"\0OMPI_COMM_WORLD_RANK=(\d+)\0", b"\0" + environ)
        if b"train_compressed.py" in cmdline and rank:
            ranks[int(rank.group(1))] = pid
    return ranks


def launch(run_dir: Path, *opts: str) -> subprocess.Popen:
    return subprocess.Popen(train_cmd(run_dir, *PIPELINE, *opts, np=2), cwd=ROOT, env=tool_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def launch_log(run_dir: Path, before: set[Path]) -> str:
    """The text log this launch writes (a new file named by its start time), or '' until it exists."""
    new = sorted(set(run_dir.glob("*.log")) - before)
    return new[-1].read_text() if new else ""


def strike(proc: subprocess.Popen, run_dir: Path, point: KillPoint, rng: random.Random, before: set[Path]) -> dict:
    """Wait for the kill point, SIGKILL a random rank, and require the whole launch to exit promptly."""
    deadline = time.monotonic() + 600
    while not point.ready(launch_log(run_dir, before), run_dir):
        assert proc.poll() is None, f"[FAULT_SEED={SEED}] ended before {point.phase}: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, f"[FAULT_SEED={SEED}] '{point.phase}' never came"
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, point.max_delay))
    rank, pids = rng.randrange(2), rank_pids(proc.pid)
    assert sorted(pids) == [0, 1], f"ranks found below the launcher: {pids}"
    os.kill(pids[rank], signal.SIGKILL)
    killed_at = time.monotonic()
    landed = point.landed(launch_log(run_dir, before))
    try:
        code = proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"[FAULT_SEED={SEED}] killing rank {rank} during {point.phase} left the launch hanging")
    assert code != 0, f"[FAULT_SEED={SEED}] the launch reported success after rank {rank} was killed"
    assert landed, f"[FAULT_SEED={SEED}] the kill meant for {point.phase} landed after it ended"
    return {"phase": point.phase, "rank": rank, "exit_s": time.monotonic() - killed_at}


def assert_checkpoints_whole(run_dir: Path) -> None:
    """No checkpoint file is half-written, and latest.pth names a complete one."""
    for path in run_dir.glob("epoch_*.pth"):
        read_checkpoint(path)
    if (run_dir / "latest.pth").exists():
        assert (run_dir / "latest.pth").resolve().exists()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "straight"
    proc = launch(run_dir)
    assert proc.wait(timeout=900) == 0, proc.stderr.read()[-3000:]
    return run_dir


def test_kills_in_every_phase_fail_fast_and_resume_to_the_uninterrupted_result(uninterrupted: Path,
                                                                             tmp_path: Path) -> None:
    rng = random.Random(SEED)
    run_dir = tmp_path / "killed"
    strikes = []
    for point in kill_points(rng):
        before = set(run_dir.glob("*.log"))
        resume = ["--resume_from", str(run_dir / "latest.pth")] if (run_dir / "latest.pth").exists() else []
        strikes.append(strike(launch(run_dir, *resume), run_dir, point, rng, before))
        assert_checkpoints_whole(run_dir)
    final = launch(run_dir, "--resume_from", str(run_dir / "latest.pth"))
    assert final.wait(timeout=900) == 0, final.stderr.read()[-3000:]
    print(f"FAULT_SEED={SEED}", *strikes, sep="\n")
    assert not list(run_dir.glob(".*.tmp-*")), "temporary files of killed checkpoint writes were left behind"

    assert {s["phase"] for s in strikes} == {"baseline fine-tune", "between pruning events", "calibration", "QAT",
                                             "checkpoint write"}
    a, b = read_checkpoint(uninterrupted / "epoch_6.pth"), read_checkpoint(run_dir / "epoch_6.pth")
    assert a["meta"]["iter"] == b["meta"]["iter"] == 24
    assert a["meta"]["compression"]["schedule"] == b["meta"]["compression"]["schedule"]
    assert a["state_dict"].keys() == b["state_dict"].keys()  # the same architecture and quantizers
    for name, tensor in a["state_dict"].items():  # weights, BN statistics and quantizer amax, bit for bit
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=0, msg=f"[FAULT_SEED={SEED}] {name}")
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in sa:
            torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0)
