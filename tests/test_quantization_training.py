"""INT8 calibration + QAT inside the real training loop: identical quantizers on every rank, gradients still synced,
checkpoints that restore pruned shapes -> quantizers -> weights, resume during QAT, FP16 by sensitivity, NaN guard."""
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, jsonl, kill_after_first_epoch_then_resume, newest_log, run_tool, train_cmd, train_from

from bevfusion_ext.compression import read_checkpoint
from bevfusion_ext.compression.quantization import quantized_layers, quantizer_amax
from bevfusion_ext.runner.rebuild import load_compressed_model

QAT = ["--recipe", "configs/compression/qat_int8.yaml", "--compression.quantization.calibration.num_batches", "2"]


@pytest.fixture(scope="module")
def qat_run(two_rank_run: tuple[Path, subprocess.CompletedProcess], tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Path, subprocess.CompletedProcess]:
    """Baseline -> 2-rank calibration (epoch 0) + 2 QAT epochs."""
    return train_from(two_rank_run, tmp_path_factory.mktemp("qat") / "run", *QAT, "--max_epochs", "2")


def test_calibration_gives_identical_quantizers_and_synced_gradients(qat_run: tuple[Path, subprocess.CompletedProcess],
                                                                      ) -> None:
    run_dir, proc = qat_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    [event] = jsonl(run_dir / "quantization_events.jsonl")
    assert event["epoch"] == 0 and event["quantizers"] > 50 and event["batches_per_rank"] == 2
    assert len(event["digest_per_rank"]) == 2 and len(set(event["digest_per_rank"])) == 1  # amax buffers included
    [check] = jsonl(run_dir / "grad_sync.jsonl")
    assert len(set(check["grad_digest_per_rank"])) == 1
    assert [m["epoch"] for m in jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]  # PTQ, then QAT epochs


def test_quantized_checkpoint_restores_quantizers_then_weights(qat_run: tuple[Path, subprocess.CompletedProcess],
                                                                 ) -> None:
    run_dir, proc = qat_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = read_checkpoint(run_dir / "epoch_2.pth")
    assert ckpt["meta"]["compression"]["quantization"]["backend"] == "modelopt"
    model, _, batch = load_compressed_model(str(ROOT / TINY), str(run_dir / "epoch_2.pth"))
    assert len(quantized_layers(model)) > 50
    amax = quantizer_amax(model)
    assert all(torch.isfinite(v).all() and (v > 0).all() for v in amax.values())
    saved = {k: v for k, v in ckpt["state_dict"].items() if k.endswith("_amax")}
    assert saved and all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert torch.isfinite(model(return_loss=False, **batch)[0]["masks_bev"]).all()


def test_resume_during_qat_restores_quantizers_and_schedule(tmp_path: Path) -> None:
    opts = [*QAT, "--max_epochs", "3", "--evaluation.enabled", "False"]
    straight = run_tool(train_cmd(tmp_path / "straight", *opts))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = tmp_path / "killed"
    resumed = kill_after_first_epoch_then_resume(killed, *opts)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = newest_log(killed)
    assert "resumed epoch 1" in log and "quantizers calibrated" not in resumed.stderr + log
    a, b = read_checkpoint(tmp_path / "straight/epoch_3.pth"), read_checkpoint(killed / "epoch_3.pth")
    assert a["meta"]["iter"] == b["meta"]["iter"]
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=0, msg=name)


def test_most_sensitive_layers_stay_fp16_and_are_recorded(tmp_path: Path) -> None:
    proc = run_tool(train_cmd(tmp_path, *QAT, "--compression.quantization.sensitivity.keep_fp16", "2",
                              "--compression.quantization.sensitivity.num_batches", "1", "--max_epochs", "1",
                              "--evaluation.enabled", "False"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [event] = jsonl(tmp_path / "quantization_events.jsonl")
    assert len(event["fp16_layers"]) == 2
    excluded = {name for entry in event["modules"].values() for reason, names in entry["skipped"].items()
                for name in names if reason.startswith("excluded by")}  # the per-type report names them
    assert set(event["fp16_layers"]) == excluded and "quantization: modules by type" in newest_log(tmp_path)
    meta = read_checkpoint(tmp_path / "epoch_1.pth")["meta"]["compression"]
    assert meta["quantization_event"]["fp16_layers"] == event["fp16_layers"]
    model, _, _ = load_compressed_model(str(ROOT / TINY), str(tmp_path / "epoch_1.pth"))
    assert not set(event["fp16_layers"]) & set(quantized_layers(model))


def test_non_finite_loss_stops_with_the_layer_name_and_keeps_no_bad_checkpoint(tmp_path: Path) -> None:
    proc = run_tool(train_cmd(tmp_path, *QAT, "--optimizer.lr", "1e30", "--optimizer_config.grad_clip", "None",
                              "--max_epochs", "1", "--evaluation.enabled", "False"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "non-finite loss, gradient or weight" in proc.stderr and "first non-finite tensor in '" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("epoch_*.pth"))
