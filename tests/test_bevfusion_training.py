"""BEVFusion's real Swin-T camera+lidar model under tools/train_compressed.py, as a user launches it from the
snapshot's config: two ranks under torchpack dist-run on the CPU stand-ins and synthetic data, then a strict resume;
bad inputs on the real tree stop with one error line and write nothing."""

import math
import sys

import pytest
import torch
from helpers import BEVFUSION_ROOT, SWINT_DET, SYNTHETIC_CPU, jsonl, needs_bevfusion, run_tool

pytestmark = needs_bevfusion

CONFIG = str(BEVFUSION_ROOT / SWINT_DET)
TRAIN = [sys.executable, "tools/train_compressed.py", CONFIG, "--cpu-ops", "--recipe", SYNTHETIC_CPU]
SMALL = ["--data.train.dataset.num_samples", "6", "--data.val.num_samples", "2", "--data.samples_per_gpu", "1",
         "--log_config.interval", "1", "--max_epochs", "1"]


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One epoch of the real model, two ranks."""
    run_dir = tmp_path_factory.mktemp("real") / "run"
    proc = run_tool(["torchpack", "dist-run", "-np", "2", *TRAIN, "--run-dir", str(run_dir), *SMALL], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_two_ranks_train_the_real_model_and_agree(real_run):
    ckpt = torch.load(real_run / "epoch_1.pth", map_location="cpu", weights_only=True)
    assert ckpt["meta"]["world_size"] == 2
    assert any(k.startswith("encoders.lidar.backbone.conv_input") for k in ckpt["state_dict"])  # spconv weights
    assert ckpt["state_dict"]["encoders.lidar.backbone.conv_input.0.weight"].shape == (3, 3, 3, 5, 16)  # 1.x layout
    (record,) = jsonl(real_run / "consistency.jsonl")
    assert len(set(record["digest_per_rank"])) == 1
    before, after = jsonl(real_run / "metrics.jsonl")  # the overlay evaluates before training too
    assert (before["epoch"], after["epoch"]) == (0, 1)
    assert 0.0 <= after["det/mAP"] <= 1.0 and "det/NDS" in after
    train_logs = [r for r in jsonl(next(real_run.glob("*.log.json")))[1:] if r.get("mode") == "train"]
    assert train_logs and all(math.isfinite(r["loss"]) and "loss/object/loss_heatmap" in r for r in train_logs)


def test_resume_loads_the_real_checkpoint_strictly(real_run):
    proc = run_tool(["torchpack", "dist-run", "-np", "2", *TRAIN, "--run-dir", str(real_run), *SMALL,
                     "--resume_from", str(real_run / "epoch_1.pth")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed epoch 1" in max(real_run.glob("*.log")).read_text()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--model.type", "BEVFusionX"], "'model.type' (set in the command line): unknown type 'BEVFusionX'"),
        (["--load_from", "{tiny_ckpt}"], "does not fit the model built from the config"),
        (["--data.train.dataset.num_samples", "4"], "'data.train' (set in configs/bevfusion/synthetic_cpu.yaml): "
         "CBGSDataset found an object class with no sample"),
        (["--dataset_root", "nowhere/"], "No such file or directory: 'nowhere/nuscenes_infos_train.pkl'"),
    ],
    ids=["unregistered type", "checkpoint of another architecture", "a class without samples", "missing data path"],
)
def test_bad_input_on_the_real_tree_is_one_error_line(args, says, tmp_path, two_rank_run):
    args = [a.format(tiny_ckpt=two_rank_run[0] / "latest.pth") for a in args]
    out = tmp_path / "run"
    real_data = "--dataset_root" in args  # BEVFusion's own NuScenesDataset, without the synthetic overlay
    proc = run_tool([*(TRAIN[:4] if real_data else TRAIN), "--run-dir", str(out), *args], timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_without_built_ops_or_cpu_ops_the_error_says_how_to_get_them(tmp_path):
    out = tmp_path / "run"
    proc = run_tool([sys.executable, "tools/train_compressed.py", CONFIG, "--recipe", SYNTHETIC_CPU,
                     "--run-dir", str(out)], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "compiled ops (or mmcv's) are not built" in proc.stderr and "pass --cpu-ops" in proc.stderr
    assert not out.exists()
