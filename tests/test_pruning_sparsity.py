"""Sparsity-regularised training: the bn_scale and group_norm penalties on the planner's channel groups, their effect
on training, the recipe key, and the penalty in the training loop until the last pruning event."""
import json
from pathlib import Path

import pytest
import torch
from helpers import run_tool, train_cmd
from torch import nn

from bevfusion_ext.compression.pruning import PruningSpec
from bevfusion_ext.compression.pruning.sparsity import SparsityPenalty
from bevfusion_ext.compression.recipe import RecipeError, parse_pruning
from bevfusion_ext.models import build_model, reference_config

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(reference_config("tiny"))


def test_bn_scale_penalty_is_the_l1_of_the_group_norm_scales(batch: dict) -> None:
    model = tiny()
    penalty = SparsityPenalty(model, batch, PruningSpec({"decoder": 0.2}), "bn_scale", 0.5)
    value = penalty()
    value.backward()
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    regularised = {n for n, m in norms.items() if m.weight.grad is not None}
    assert "decoder.backbone.blocks.0.1" in regularised and all(n.startswith("decoder.") for n in regularised)
    for name in regularised:
        torch.testing.assert_close(norms[name].weight.grad, 0.5 * norms[name].weight.detach().sign())
        assert norms[name].bias.grad is None
    expected = 0.5 * sum(norms[n].weight.detach().abs().sum() for n in regularised)
    torch.testing.assert_close(value.detach(), expected)


def test_group_norm_penalty_is_the_group_lasso_of_each_channel() -> None:
    torch.manual_seed(0)
    toy = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    nn.init.normal_(toy[1].weight)
    nn.init.normal_(toy[1].bias)
    value = SparsityPenalty(toy, torch.randn(1, 3, 8, 8), PruningSpec({"": 0.5}, round_to=2), "group_norm", 0.1)()
    conv1, bn, conv2 = toy[0], toy[1], toy[3]  # round_to 2 keeps conv2's 2 outputs whole: conv1's 4 are the group
    squares = (conv1.weight.flatten(1).pow(2).sum(1) + conv1.bias.pow(2) + bn.weight.pow(2) + bn.bias.pow(2)
               + conv2.weight.flatten(2).pow(2).sum((0, 2)))
    torch.testing.assert_close(value, 0.1 * squares.sqrt().sum())


def test_the_penalty_shrinks_the_scales_it_regularises(batch: dict) -> None:
    def train(strength: float | None) -> float:
        model = tiny()
        spec = PruningSpec({"decoder": 0.2})
        penalty = SparsityPenalty(model, batch, spec, "bn_scale", strength) if strength else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        torch.manual_seed(1)
        for _ in range(3):
            loss = sum(v for k, v in model(return_loss=True, **batch).items() if "loss" in k)
            optimizer.zero_grad()
            (loss + (penalty() if penalty else 0.0)).backward()
            optimizer.step()
        scales = [m.weight.detach() for n, m in model.named_modules()
                  if n.startswith("decoder.") and isinstance(m, nn.BatchNorm2d)]
        return float(sum(w.abs().sum() for w in scales)), sum(len(w) for w in scales)

    (plain, channels), (regularised, _) = train(None), train(0.5)
    # each step moves every regularised scale by lr x strength toward zero: 3 x 0.05 x 0.5 per channel at most
    assert plain - regularised > 0.5 * 3 * 0.05 * 0.5 * channels


@pytest.mark.parametrize("section, key", [
    ({"kind": "l0", "strength": 1e-4}, "compression.pruning.sparsity.kind"),
    ({"kind": "bn_scale", "strength": 0}, "compression.pruning.sparsity.strength"),
    ({"kind": "bn_scale"}, "compression.pruning.sparsity.strength"),
    ({"kind": "bn_scale", "strength": 1e-4, "until": 3}, "compression.pruning.sparsity.until"),
])
def test_bad_sparsity_values_name_their_key(section: dict, key: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_pruning({"groups": {"decoder": 0.2}, "sparsity": section})
    assert err.value.key == key
    with pytest.raises(RecipeError, match="there are none"):
        parse_pruning({"depth": {"decoder.backbone.blocks.0": 0}, "sparsity": {"strength": 1e-4}})
    assert parse_pruning({"groups": {"decoder": 0.2}, "sparsity": {"kind": "group_norm", "strength": 1e-4}}
                         ).sparsity.kind == "group_norm"


def test_the_loop_adds_the_penalty_until_the_last_event(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    opts = ["--recipe", "configs/compression/prune_seed.yaml", "--compression.pruning.round_to", "4",
            "--compression.pruning.target", "{}", "--compression.pruning.sparsity.kind", "bn_scale",
            "--compression.pruning.sparsity.strength", "0.001", "--compression.pruning.schedule.start_epoch", "1",
            "--compression.pruning.schedule.end_epoch", "2", "--compression.pruning.schedule.num_events", "1",
            "--max_epochs", "2", "--evaluation.enabled", "False"]
    proc = run_tool(train_cmd(run_dir, *opts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads(line) for path in run_dir.glob("*.log.json") for line in path.read_text().splitlines()]
    train = [r for r in logs if r.get("mode") == "train"]
    assert {r["epoch"] for r in train} == {1, 2}
    assert all("loss_sparsity" in r and r["loss_sparsity"] > 0 for r in train if r["epoch"] == 1)  # before the event
    assert not any("loss_sparsity" in r for r in train if r["epoch"] == 2)  # the event at epoch 2's first iteration
