"""Pruning recipes: validation with key-naming errors, event schedules, ratios that compose; optimizer surgery."""
import pytest
import torch
from torch import nn

from bevfusion_ext.compression.optimizer import param_names, transfer_state
from bevfusion_ext.compression.recipe import RecipeError, check_groups, parse_pruning, parse_recipe

GOOD = {
    "groups": {"encoders.camera.backbone": 0.25, "decoder": 0.2},
    "schedule": {"start_epoch": 1, "end_epoch": 3, "num_events": 4, "shape": "cubic"},
    "importance": "bn_scale",
    "round_to": 8,
    "protected": ["heads.object.*"],
    "target": {"params_reduction": 0.45},
}


def test_good_recipe_parses() -> None:
    recipe = parse_recipe({"pruning": GOOD}).pruning
    assert recipe.groups == {"encoders.camera.backbone": 0.25, "decoder": 0.2}
    assert recipe.importance == "bn_scale" and recipe.round_to == 8 and recipe.protected == ("heads.object.*",)
    assert recipe.params_reduction == 0.45 and recipe.flops_reduction is None


def test_no_compression_section_means_no_compression() -> None:
    assert parse_recipe(None).pruning is None and parse_recipe({}).pruning is None


@pytest.mark.parametrize(
    "change, key",
    [
        ({"groups": {}}, "compression.pruning.groups"),
        ({"groups": {"decoder": 0.95}}, "compression.pruning.groups.decoder"),
        ({"groups": {"decoder": "lots"}}, "compression.pruning.groups.decoder"),
        ({"importance": "random"}, "compression.pruning.importance"),
        ({"round_to": 0}, "compression.pruning.round_to"),
        ({"protected": "heads"}, "compression.pruning.protected"),
        ({"schedule": {"start_epoch": 3, "end_epoch": 3, "num_events": 2}}, "compression.pruning.schedule.end_epoch"),
        ({"schedule": {"end_epoch": 2, "num_events": 0}}, "compression.pruning.schedule.num_events"),
        ({"schedule": {"end_epoch": 2, "shape": "exp"}}, "compression.pruning.schedule.shape"),
        ({"schedule": {"end_epoch": 2, "every": 1}}, "compression.pruning.schedule.every"),
        ({"target": {"params_reduction": 0.4, "flops_reduction": 0.4}}, "compression.pruning.target"),
        ({"target": {"params_reduction": 1.2}}, "compression.pruning.target.params_reduction"),
        ({"ratio": 0.5}, "compression.pruning.ratio"),
    ],
)
def test_bad_recipes_name_the_key(change: dict, key: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe({"pruning": {**GOOD, **change}})
    assert err.value.key == key and f"'{key}'" in str(err.value)


def test_unknown_section_is_named() -> None:
    with pytest.raises(RecipeError, match="'compression.distill'"):
        parse_recipe({"distill": {}})


def test_events_spread_over_the_epochs_and_iterations() -> None:
    recipe = parse_pruning(GOOD)
    assert recipe.schedule.event_iters(iters_per_epoch=10) == [10, 15, 20, 25]
    by_iter = parse_pruning({**GOOD, "schedule": {"start_iter": 0, "end_iter": 9, "num_events": 3}})
    assert by_iter.schedule.event_iters(iters_per_epoch=100) == [0, 3, 6]


@pytest.mark.parametrize("shape", ["linear", "cubic"])
def test_step_ratios_compose_to_the_cumulative_target(shape: str) -> None:
    recipe = parse_pruning({**GOOD, "schedule": {"end_epoch": 2, "num_events": 4, "shape": shape}})
    remaining = {g: 1.0 for g in recipe.groups}
    for k in range(4):
        for g, r in recipe.step_ratios(k, scale=1.5).items():
            remaining[g] *= 1.0 - r
    final = recipe.cumulative_ratios(4, scale=1.5)
    assert final == pytest.approx({"encoders.camera.backbone": 0.375, "decoder": 0.3})
    assert {g: 1.0 - v for g, v in remaining.items()} == pytest.approx(final)


def test_cubic_prunes_more_early_than_linear() -> None:
    cubic = parse_pruning({**GOOD, "schedule": {"end_epoch": 2, "num_events": 4, "shape": "cubic"}}).schedule
    linear = parse_pruning({**GOOD, "schedule": {"end_epoch": 2, "num_events": 4, "shape": "linear"}}).schedule
    assert cubic.fraction_after(1) > linear.fraction_after(1) and cubic.fraction_after(4) == linear.fraction_after(4)


def test_groups_must_match_modules() -> None:
    recipe = parse_pruning(GOOD)
    check_groups(recipe, ["encoders.camera.backbone.stages.0", "decoder", "decoder.neck"])
    with pytest.raises(RecipeError, match="'compression.pruning.groups.decoder'.*matches no module"):
        check_groups(recipe, ["encoders.camera.backbone", "decoders"])


def test_optimizer_state_is_sliced_to_kept_channels() -> None:
    torch.manual_seed(0)
    old_model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    old = torch.optim.AdamW(old_model.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(3):
        old.zero_grad()
        old_model(torch.randn(5, 4)).sum().backward()
        old.step()
    keep = torch.tensor([0, 2, 5])
    new_model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3))
    kept = {
        "0.weight": (keep[:, None] * 4 + torch.arange(4)).reshape(-1),
        "0.bias": keep,
        "1.weight": (torch.arange(3)[:, None] * 6 + keep).reshape(-1),
    }
    names = param_names(old, old_model)
    new = torch.optim.AdamW(new_model.parameters(), lr=5.0)
    transfer_state(old, names, new, new_model, kept)
    by_name = dict(zip(names, old.param_groups[0]["params"], strict=True))
    new_by_name = dict(new_model.named_parameters())
    expected = {"0.weight": lambda t: t[keep], "0.bias": lambda t: t[keep], "1.weight": lambda t: t[:, keep]}
    for key in ("exp_avg", "exp_avg_sq"):
        for name, param in new_by_name.items():
            before = old.state[by_name[name]][key]
            torch.testing.assert_close(new.state[param][key], expected.get(name, lambda t: t)(before))
    assert new.param_groups[0]["lr"] == 1e-3 and new.param_groups[0]["weight_decay"] == 0.01
    assert float(new.state[new_by_name["0.bias"]]["step"]) == 3.0


@pytest.mark.parametrize("field", ["exclude", "layers"])
def test_quantization_lists_must_be_lists(field: str) -> None:
    # a shell that drops the quotes of "['*.out_proj']" hands over a plain string, which must not be read per letter
    with pytest.raises(RecipeError, match=rf"compression.quantization.{field}.*expected list"):
        parse_recipe({"quantization": {field: "[*.out_proj]"}})
