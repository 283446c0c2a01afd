"""The seed pruning recipe with the sparse lidar encoder on BEVFusion's real Swin-T camera+lidar model: planned,
applied, replayed into a freshly built model and loaded strictly (in process, one build of each); and one pruning
event of a two-rank training run under torchpack dist-run, identical on both ranks with gradients still
all-reduced."""

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import BEVFUSION_ROOT, ROOT, SWINT_DET, SYNTHETIC_CPU, jsonl, needs_bevfusion, run_tool, use_bevfusion
from torch import nn

from bevfusion_ext.compression.pruning import PruningSpec, apply_pruning, group_channels, plan_pruning
from bevfusion_ext.compression.pruning.counting import call_model, trainable_params
from bevfusion_ext.compression.pruning.protection import last_layer
from bevfusion_ext.compression.pruning.sparse import SparseConvPruner

pytestmark = needs_bevfusion

SEED = "configs/compression/prune_seed.yaml"
LIDAR = "encoders.lidar.backbone"
LIDAR_RATIO = 0.25


def seed_spec_with_lidar() -> PruningSpec:
    """The seed recipe's groups, importance and rounding, plus the sparse lidar encoder."""
    pruning = yaml.safe_load((ROOT / SEED).read_text())["compression"]["pruning"]
    return PruningSpec(groups={**pruning["groups"], LIDAR: LIDAR_RATIO}, importance=pruning["importance"],
                       round_to=pruning["round_to"], protected=pruning["protected"])


@pytest.fixture(scope="module")
def event(one_thread: None) -> SimpleNamespace:
    """dense real model -> plan at the seed ratios (+ lidar) -> applied to a copy; a freshly built model replays it."""
    use_bevfusion()
    from bevfusion_ext.runner.builder import build_dataset, build_model, example_batch
    from bevfusion_ext.runner.train import prepare_config

    cfg, sources = prepare_config(str(BEVFUSION_ROOT / SWINT_DET), ["--recipe", str(ROOT / SYNTHETIC_CPU)])
    batch = example_batch(build_dataset(cfg.data.train, "data.train", sources))
    dense = build_model(cfg, sources)
    spec = seed_spec_with_lidar()
    history = plan_pruning(dense, batch, spec, spec.groups)
    pruned = copy.deepcopy(dense)
    apply_pruning(pruned, batch, history)
    fresh = build_model(cfg, sources)
    apply_pruning(fresh, batch, history)
    return SimpleNamespace(dense=dense, pruned=pruned, fresh=fresh, history=history, batch=batch, spec=spec)


def camera_bev(event: SimpleNamespace) -> int:
    """The camera BEV width the fuser reads first (auto-protected)."""
    return last_layer(event.dense.encoders.camera.vtransform.downsample).out_channels


def sparse_convs(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.encoders.lidar.backbone.named_modules() if SparseConvPruner.matches(m)}


def lidar_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.encoders.lidar.backbone.parameters())


def test_seed_recipe_with_the_lidar_encoder_prunes_every_group(event: SimpleNamespace) -> None:
    before, after = group_channels(event.dense, event.spec), group_channels(event.pruned, event.spec)
    assert all(after[group] < before[group] for group in event.spec.groups), (before, after)
    assert {step[1] for step in event.history if step[1].startswith(f"{LIDAR}.")} <= {
        f"{LIDAR}.{name}" for name in sparse_convs(event.pruned)}
    assert lidar_params(event.pruned) < 0.7 * lidar_params(event.dense)
    assert trainable_params(event.pruned) < 0.65 * trainable_params(event.dense)
    for conv in sparse_convs(event.pruned).values():
        assert tuple(conv.weight.shape[-2:]) == (conv.in_channels, conv.out_channels)
    lidar_out = event.pruned.encoders.lidar.backbone.conv_out[0].out_channels
    assert lidar_out < 128 and event.pruned.fuser[0].in_channels == camera_bev(event) + 2 * lidar_out  # D = 2 folded


def test_replayed_into_a_fresh_model_it_loads_strictly_with_the_same_outputs(event: SimpleNamespace) -> None:
    event.fresh.load_state_dict(event.pruned.state_dict(), strict=True)
    with torch.no_grad():
        ours, theirs = (call_model(m, event.batch, return_loss=False)[0] for m in (event.fresh, event.pruned))
    assert torch.equal(ours["boxes_3d"].tensor, theirs["boxes_3d"].tensor)
    assert torch.equal(ours["scores_3d"], theirs["scores_3d"]) and torch.equal(ours["labels_3d"], theirs["labels_3d"])


def test_pruned_real_model_trains(event: SimpleNamespace) -> None:
    model = copy.deepcopy(event.pruned)
    losses = call_model(model, event.batch, return_loss=True)
    total = sum(value for key, value in losses.items() if "loss" in key)
    assert torch.isfinite(total)
    total.backward()
    assert all(conv.weight.grad is not None for conv in sparse_convs(model).values())


@pytest.fixture(scope="module")
def two_rank_event(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank, 1-epoch run of the real model with one pruning event (seed recipe + lidar, params target searched)."""
    tmp = tmp_path_factory.mktemp("real_pruned")
    lidar = tmp / "lidar.yaml"
    lidar.write_text(yaml.safe_dump({"compression": {"pruning": {"groups": {LIDAR: LIDAR_RATIO}}}}))
    run_dir = tmp / "run"
    train = [sys.executable, "tools/train_compressed.py", str(BEVFUSION_ROOT / SWINT_DET), "--cpu-ops",
             "--recipe", SYNTHETIC_CPU, "--recipe", SEED, "--recipe", str(lidar), "--run-dir", str(run_dir)]
    small = ["--data.train.dataset.num_samples", "6", "--data.val.num_samples", "2", "--data.samples_per_gpu", "1",
             "--max_epochs", "1", "--evaluation.start", "1", "--compression.pruning.schedule.end_epoch", "1",
             "--compression.pruning.schedule.num_events", "1"]
    proc = run_tool(["torchpack", "dist-run", "-np", "2", *train, *small], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_two_rank_event_is_identical_on_both_ranks_and_gradients_stay_all_reduced(two_rank_event: Path,
                                                                                 event: SimpleNamespace) -> None:
    (record,) = jsonl(two_rank_event / "pruning_events.jsonl")
    assert len(record["digest_per_rank"]) == 2 and len(set(record["digest_per_rank"])) == 1
    assert abs(record["params_reduction"] - 0.45) <= 0.02, record["params_reduction"]
    dense_channels = group_channels(event.dense, event.spec)
    assert all(record["group_channels"][g] < dense_channels[g] for g in event.spec.groups), record["group_channels"]
    (check,) = jsonl(two_rank_event / "grad_sync.jsonl")
    assert len(check["grad_digest_per_rank"]) == 2 and len(set(check["grad_digest_per_rank"])) == 1
    assert all(len(set(r["digest_per_rank"])) == 1 for r in jsonl(two_rank_event / "consistency.jsonl"))
    state = torch.load(two_rank_event / "epoch_1.pth", map_location="cpu", weights_only=True)["state_dict"]
    conv_out = state[f"{LIDAR}.conv_out.0.weight"]
    assert conv_out.shape[-1] < 128 and state["fuser.0.weight"].shape[1] == camera_bev(event) + 2 * conv_out.shape[-1]
