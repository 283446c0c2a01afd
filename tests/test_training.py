"""The training entry point end to end: 2-rank torchpack dist-run, strict loading, resume after a kill, bad configs."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, jsonl, kill_after_first_epoch_then_resume, newest_log, run_tool, train_cmd

from bevfusion_ext.compression import model_digest, read_checkpoint
from bevfusion_ext.models import build_model
from bevfusion_ext.runner import ConfigError, load_config, prepare_config


def checkpoint_digest(path: Path) -> str:
    cfg, _ = load_config(ROOT / TINY)
    model = build_model(cfg.model)
    model.load_state_dict(read_checkpoint(path)["state_dict"])
    return model_digest(model)


def test_two_ranks_train_with_identical_weights(two_rank_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, proc = two_rank_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = jsonl(run_dir / "consistency.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert len(record["digest_per_rank"]) == 2 and len(set(record["digest_per_rank"])) == 1
    assert records[0]["digest_per_rank"] != records[1]["digest_per_rank"], "weights did not change in epoch 2"
    # The digest the ranks agreed on is the digest of the weights in the saved checkpoint.
    assert checkpoint_digest(run_dir / "epoch_2.pth") == records[1]["digest_per_rank"][0]
    assert (run_dir / "latest.pth").resolve() == (run_dir / "epoch_2.pth").resolve()


def test_run_directory_has_logs_metrics_and_checkpoint_meta(
    two_rank_run: tuple[Path, subprocess.CompletedProcess],
) -> None:
    run_dir, proc = two_rank_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = jsonl(run_dir / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1, 2], "expected an evaluation before training and after each epoch"
    for m in metrics:
        assert 0.0 <= m["det/mAP"] <= 1.0 and 0.0 <= m["seg/mIoU"] <= 1.0
    assert (run_dir / "configs.yaml").is_file()
    assert list(run_dir.glob("tf_logs/events.out.tfevents.*")), "no TensorBoard events"
    assert list(run_dir.glob("wandb/offline-run-*")), "no offline wandb run"
    meta = read_checkpoint(run_dir / "epoch_2.pth")["meta"]
    assert meta["epoch"] == 2 and meta["iter"] == 4


def test_checkpoint_of_another_architecture_is_refused(
    two_rank_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    run_dir, _ = two_rank_run
    proc = run_tool(
        train_cmd(
            tmp_path / "run", "--load_from", str(run_dir / "epoch_2.pth"), "--model.heads.object.hidden_channel", "48"
        )
    )
    assert proc.returncode == 2
    assert "does not fit the model" in proc.stderr and "heads.object." in proc.stderr
    assert "checkpoint (32," in proc.stderr and "vs model (48," in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").glob("*.pth"))


def test_resume_on_another_world_size_is_refused_before_anything_is_written(
    two_rank_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    run_dir, _ = two_rank_run
    assert read_checkpoint(run_dir / "epoch_2.pth")["meta"]["world_size"] == 2
    proc = run_tool(train_cmd(tmp_path / "run", "--resume_from", str(run_dir / "epoch_2.pth")))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"resume_from {run_dir / 'epoch_2.pth'}" in proc.stderr
    assert "2-process run and this run has 1" in proc.stderr and "dist-run -np 2" in proc.stderr
    assert "--load_from" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_custom_hooks_from_the_config_are_registered(tmp_path: Path) -> None:
    proc = run_tool(
        train_cmd(
            tmp_path,
            "--max_epochs",
            "1",
            "--evaluation.enabled",
            "False",
            "--custom_hooks",
            "[{'type': 'SyncBuffersHook', 'priority': 'LOW'}]",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = next(tmp_path.glob("*.log")).read_text()
    assert "(LOW         ) SyncBuffersHook" in log, "custom_hooks from the config were not registered"


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = run_tool(train_cmd(tmp_path / "straight", "--max_epochs", "3", "--evaluation.enabled", "False"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    resumed = kill_after_first_epoch_then_resume(killed_dir, "--max_epochs", "3", "--evaluation.enabled", "False")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed epoch 1, iter 4" in newest_log(killed_dir)

    a, b = read_checkpoint(tmp_path / "straight/epoch_3.pth"), read_checkpoint(killed_dir / "epoch_3.pth")
    assert a["meta"]["iter"] == b["meta"]["iter"] == 12
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=0, msg=name)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=0)


def test_unknown_model_type_names_key_and_file(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    leaf = tmp_path / "configs/synthetic/multitask/bad.yaml"
    leaf.write_text((ROOT / TINY).read_text().replace("model:\n", "model:\n  type: BEVFusionX\n", 1))
    expected = r"'model.type' \(set in .*bad.yaml\): unknown type 'BEVFusionX'.*Did you mean .*BEVFusion"
    with pytest.raises(ConfigError, match=expected):
        prepare_config(str(leaf), [])


def test_bad_config_on_the_command_line_is_a_clean_error(tmp_path: Path) -> None:
    proc = run_tool(train_cmd(tmp_path / "run", "--data.train.type", "NuScenesDatasetX"), timeout=120)
    assert proc.returncode == 2
    assert "'data.train.type' (set in the command line): unknown type 'NuScenesDatasetX'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_configs_equal_the_reference_model_configs() -> None:
    from bevfusion_ext.models import reference_config

    for size in ("tiny", "full"):
        cfg, _ = load_config(ROOT / f"configs/synthetic/multitask/{size}.yaml")
        assert json.loads(json.dumps(cfg.model.to_dict())) == json.loads(json.dumps(reference_config(size))), size
