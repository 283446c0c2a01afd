"""Progressive pruning inside the real training loop: identical events on every rank, DDP still syncing, optimizer
moments carried over, checkpoints that rebuild the pruned architecture, and resume in the middle of the schedule."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    ROOT,
    TINY,
    assert_equal_states,
    jsonl,
    run_tool,
    straight_and_resumed,
    train_cmd,
    train_from,
)

from bevfusion_ext.compression import pruning as core
from bevfusion_ext.compression import read_checkpoint
from bevfusion_ext.compression.optimizer import param_names, transfer_state
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.runner.rebuild import load_compressed_model

RECIPE = ["--recipe", "configs/compression/prune_seed.yaml", "--compression.pruning.round_to", "4"]


@pytest.fixture(scope="module")
def pruned_run(two_rank_run: tuple[Path, subprocess.CompletedProcess], tmp_path_factory: pytest.TempPathFactory
               ) -> tuple[Path, subprocess.CompletedProcess]:
    """Baseline (2 ranks) -> 2-rank progressive pruning run: 2 events in epoch 1, then 1 epoch of fine-tuning."""
    schedule = ["--compression.pruning.schedule.end_epoch", "1", "--compression.pruning.schedule.num_events", "2"]
    return train_from(two_rank_run, tmp_path_factory.mktemp("pruned") / "run", *RECIPE, *schedule, "--max_epochs", "2")


def test_events_are_identical_on_both_ranks_and_reach_the_target(pruned_run: tuple[Path, subprocess.CompletedProcess],
                                                                   ) -> None:
    run_dir, proc = pruned_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = jsonl(run_dir / "pruning_events.jsonl")
    assert [e["event"] for e in events] == [1, 2]
    for e in events:
        assert len(e["digest_per_rank"]) == 2 and len(set(e["digest_per_rank"])) == 1
    assert events[0]["params"] > events[1]["params"]
    assert abs(events[-1]["params_reduction"] - 0.45) <= 0.02, events[-1]["params_reduction"]
    for group, channels in events[-1]["group_channels"].items():
        assert channels < events[0]["group_channels"][group] or group == "heads"
    for record in jsonl(run_dir / "consistency.jsonl"):
        assert len(set(record["digest_per_rank"])) == 1


def test_gradients_are_still_all_reduced_after_each_event(pruned_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run_dir, proc = pruned_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = jsonl(run_dir / "grad_sync.jsonl")
    assert len(checks) == 2
    for check in checks:
        assert len(check["grad_digest_per_rank"]) == 2 and len(set(check["grad_digest_per_rank"])) == 1


def test_pruned_checkpoint_rebuilds_from_config_and_loads_strictly(pruned_run: tuple[Path, subprocess.CompletedProcess],
                                                                     ) -> None:
    run_dir, proc = pruned_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = run_dir / "epoch_2.pth"
    meta = read_checkpoint(ckpt)["meta"]["compression"]
    assert len(meta["pruning"]["applied"]) == 2 and meta["schedule"]["events_done"] == 2
    model, _, batch = load_compressed_model(str(ROOT / TINY), str(ckpt))
    params, _ = core.count_params_flops(model, batch)
    assert params == jsonl(run_dir / "pruning_events.jsonl")[-1]["params"]
    out = model(return_loss=False, **batch)
    assert len(out) == 2 and torch.isfinite(out[0]["masks_bev"]).all()


def test_pruned_checkpoint_into_another_architecture_fails_clearly(
    pruned_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path
) -> None:
    run_dir, _ = pruned_run
    proc = run_tool(train_cmd(tmp_path / "x", "--load_from", str(run_dir / "epoch_2.pth"),
                              "--model.decoder.backbone.layer_nums", "[2, 1]"), timeout=300)
    assert proc.returncode == 2
    assert str(run_dir / "epoch_2.pth") in proc.stderr
    assert "Use the config the checkpoint was trained with" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_pruned_checkpoint_fine_tunes_under_the_dense_config(pruned_run: tuple[Path, subprocess.CompletedProcess],
                                                                tmp_path: Path) -> None:
    run_dir, _ = pruned_run
    proc = run_tool(train_cmd(tmp_path / "ft", "--load_from", str(run_dir / "epoch_2.pth"), "--max_epochs", "1",
                              "--evaluation.enabled", "False"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(read_checkpoint(tmp_path / "ft/epoch_1.pth")["meta"]["compression"]["pruning"]["applied"]) == 2


def test_optimizer_moments_of_surviving_channels_are_kept() -> None:
    torch.manual_seed(0)
    ds = SyntheticBEVDataset(2)
    batch = collate([ds[0], ds[1]])
    model = build_model(reference_config("tiny"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(v for k, v in model(return_loss=True, **batch).items() if "loss" in k).backward()
    optimizer.step()
    before_model, before_opt = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    names = param_names(optimizer, model)
    spec = core.PruningSpec(groups={"decoder": 0.3}, round_to=4)
    kept = core.apply_pruning(model, batch, core.plan_pruning(model, batch, spec, {"decoder": 0.3}))
    new = torch.optim.AdamW(model.parameters(), lr=1e-3)
    transfer_state(optimizer, names, new, model, kept)

    name = "decoder.backbone.blocks.0.0.weight"  # reads the (unpruned) fuser output: only its output rows change
    old_w, new_w = dict(before_model.named_parameters())[name].detach(), dict(model.named_parameters())[name].detach()
    assert new_w.shape[0] < old_w.shape[0] and new_w.shape[1:] == old_w.shape[1:]
    # Which output channels survived, found independently of the kept map by matching weight rows (all distinct) ...
    row_of = {tuple(row.flatten().tolist()): i for i, row in enumerate(old_w)}
    survivors = [row_of[tuple(row.flatten().tolist())] for row in new_w]
    # ... and the AdamW moments of exactly those channels moved with them.
    old_state, new_state = before_opt["state"][names.index(name)], new.state[dict(model.named_parameters())[name]]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(new_state[key], old_state[key][survivors], rtol=0, atol=0)


def test_resume_in_the_middle_of_the_schedule_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    opts = [*RECIPE, "--compression.pruning.target", "{}", "--compression.pruning.schedule.end_epoch", "3",
            "--compression.pruning.schedule.num_events", "3", "--max_epochs", "3", "--evaluation.enabled", "False"]
    a, b = straight_and_resumed(tmp_path, 3, *opts)
    events_a, events_b = (c["meta"]["compression"]["pruning"]["events"] for c in (a, b))
    assert [e["iter"] for e in events_b] == [e["iter"] for e in events_a] == [0, 4, 8]
    assert [e["params"] for e in events_b] == [e["params"] for e in events_a]
    assert_equal_states(a, b)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
