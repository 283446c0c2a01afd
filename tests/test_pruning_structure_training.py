"""Depth + heads + channels pruning inside the real training loop (configs/compression/prune_structure_tiny.yaml):
block and head counts identical on both ranks, DDP still all-reducing, checkpoints that rebuild the pruned
architecture, resume in the middle of the schedule, and recipe errors that name the key."""
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY, assert_equal_states, jsonl, run_tool, straight_and_resumed, train_cmd

from bevfusion_ext.compression import pruning as core
from bevfusion_ext.runner.rebuild import load_compressed_model

RECIPE = "configs/compression/prune_structure_tiny.yaml"
LAYERS = ["--model.heads.object.num_decoder_layers", "2"]  # a decoder layer to remove
STAGE2, STAGE3 = "encoders.camera.backbone.stages.2", "encoders.camera.backbone.stages.3"


@pytest.fixture(scope="module")
def structure_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-rank run from scratch: 2 events in epoch 0 (2 iterations per epoch), then 1 epoch of fine-tuning."""
    run_dir = tmp_path_factory.mktemp("structure") / "run"
    proc = run_tool(train_cmd(run_dir, "--recipe", RECIPE, *LAYERS, "--max_epochs", "2", np=2))
    return run_dir, proc


def test_block_and_head_counts_follow_the_schedule_identically_on_both_ranks(
        structure_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, proc = structure_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = jsonl(run_dir / "pruning_events.jsonl")
    assert [e["event"] for e in events] == [1, 2] and [e["iter"] for e in events] == [0, 1]
    for e in events:
        assert len(e["digest_per_rank"]) == 2 and len(set(e["digest_per_rank"])) == 1
    # linear schedule over 2 events; the SECOND stage reaches its target at the first event
    assert events[0]["blocks"] == {STAGE2: [2, 1], "decoder.backbone.blocks.1": [1, 0], "heads.object": [2, 1]}
    assert events[0]["heads"] == {STAGE3: [8, 7], "heads.object": [4, 3]}
    assert events[1]["blocks"] == {STAGE2: [1, 1], "decoder.backbone.blocks.1": [0, 0], "heads.object": [1, 1]}
    assert events[1]["heads"] == {STAGE3: [7, 6], "heads.object": [3, 3]}
    assert events[0]["params"] > events[1]["params"]
    assert all(b < a for a, b in zip(events[0]["group_channels"].values(), events[1]["group_channels"].values(),
                                     strict=True))
    for record in jsonl(run_dir / "consistency.jsonl"):
        assert len(set(record["digest_per_rank"])) == 1


def test_gradients_are_still_all_reduced_after_block_and_head_removals(
        structure_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, proc = structure_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = jsonl(run_dir / "grad_sync.jsonl")
    assert len(checks) == 2
    for check in checks:
        assert len(check["grad_digest_per_rank"]) == 2 and len(set(check["grad_digest_per_rank"])) == 1


def test_the_checkpoint_rebuilds_blocks_and_heads_and_loads_strictly(
        structure_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, proc = structure_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, _, batch = load_compressed_model(str(ROOT / TINY), str(run_dir / "epoch_2.pth"), LAYERS)
    assert core.block_counts(model, [STAGE2, "heads.object"]) == {STAGE2: 1, "heads.object": 1}
    assert core.head_counts(model, [STAGE3, "heads.object"]) == {STAGE3: 6, "heads.object": 3}
    assert core.count_params_flops(model, batch)[0] == jsonl(run_dir / "pruning_events.jsonl")[-1]["params"]
    out = model(return_loss=False, **batch)
    assert len(out) == 2 and torch.isfinite(out[0]["masks_bev"]).all()


def test_resume_between_events_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    opts = ["--recipe", RECIPE, *LAYERS, "--compression.pruning.schedule.end_epoch", "2", "--max_epochs", "2",
            "--evaluation.enabled", "False"]
    a, b = straight_and_resumed(tmp_path, 2, *opts)
    events_a, events_b = (c["meta"]["compression"]["pruning"]["events"] for c in (a, b))
    assert [e["iter"] for e in events_b] == [e["iter"] for e in events_a] == [0, 4]
    assert [(e["blocks"], e["heads"]) for e in events_b] == [(e["blocks"], e["heads"]) for e in events_a]
    assert events_b[-1]["heads"][STAGE3] == [7, 6]  # the second event ran after the resume
    assert_equal_states(a, b)


@pytest.mark.parametrize("opts, key, problem", [
    (["--compression.pruning.heads.fuser", "2"], "compression.pruning.heads.fuser", "holds no attention block"),
    (["--compression.pruning.depth.decoder", "1"], "compression.pruning.depth.decoder", "is not a block list"),
])
def test_a_bad_depth_or_heads_path_stops_before_training_naming_the_key(opts: list[str], key: str, problem: str,
                                                                         tmp_path: Path) -> None:
    proc = run_tool(train_cmd(tmp_path / "bad", "--recipe", RECIPE, *opts), timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"config key '{key}'" in proc.stderr and problem in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bad").exists()
