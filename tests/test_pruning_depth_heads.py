"""Depth pruning (whole blocks) and head pruning (whole attention heads) on the tiny reference model: equivalences,
the influence criterion, Swin's shift alternation, replay + strict load, renamed optimizer state, recipe and errors."""
import copy
from types import SimpleNamespace

import pytest
import torch
from attention_heads import check_in_proj_heads, check_window_msa_heads
from torch import nn

from bevfusion_ext.compression import model_digest
from bevfusion_ext.compression.optimizer import param_names, transfer_state
from bevfusion_ext.compression.pruning import (
    PruningSpec,
    apply_pruning,
    block_counts,
    count_params_flops,
    head_counts,
    plan_pruning,
    scale_for_target,
)
from bevfusion_ext.compression.pruning.depth import block_influence, block_list, check_depth_target, plan_depth
from bevfusion_ext.compression.pruning.engine import pruned_copy
from bevfusion_ext.compression.pruning.heads import check_head_target
from bevfusion_ext.compression.pruning.pruners import FusedQKVAttentionPruner
from bevfusion_ext.compression.recipe import RecipeError, check_structure, parse_pruning
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.models.swin import WindowMSA
from bevfusion_ext.models.transfusion import MultiheadAttention

pytestmark = pytest.mark.usefixtures("one_thread")

STAGE2, STAGE3 = "encoders.camera.backbone.stages.2", "encoders.camera.backbone.stages.3"
DEPTH = {STAGE2: 1, "decoder.backbone.blocks.0": 0, "heads.object": 1}
HEADS = {STAGE3: 6, "heads.object": 3}
GROUPS = {"encoders.camera.neck": 0.25, "decoder": 0.25}


def tiny(seed: int = 0, decoder_layers: int = 2, **overrides) -> nn.Module:
    """The tiny reference model with seeded weights and `decoder_layers` TransFusion decoder layers."""
    torch.manual_seed(seed)
    cfg = reference_config("tiny", **overrides)
    cfg["heads"]["object"]["num_decoder_layers"] = decoder_layers
    return build_model(cfg)



@pytest.fixture(scope="module")
def spec() -> PruningSpec:
    return PruningSpec(dict(GROUPS), round_to=4)


@pytest.fixture(scope="module")
def event(batch: dict, spec: PruningSpec) -> SimpleNamespace:
    """One depth + heads + channels event: dense, history, the planner's copy, the history replayed on a copy."""
    dense = tiny()
    history = plan_pruning(dense, batch, spec, spec.groups, depth=DEPTH, heads=HEADS)
    planned, _ = pruned_copy(dense, batch, spec, spec.groups, None, None, DEPTH, HEADS)
    replayed = copy.deepcopy(dense)
    kept = apply_pruning(replayed, batch, history)
    return SimpleNamespace(dense=dense, history=history, planned=planned, replayed=replayed, kept=kept)


def test_window_msa_head_removal_is_the_dense_attention_without_those_heads() -> None:
    torch.manual_seed(0)
    msa = WindowMSA(embed_dims=16, num_heads=4, window_size=2)
    nn.init.normal_(msa.relative_position_bias_table)
    x, mask = torch.randn(6, 4, 16), torch.randint(0, 2, (3, 4, 4)).float() * -100.0
    heads, channels = [1, 3], [0, 2, 5, 7, 9, 10, 13, 15]  # 2 heads of 4 dims go, and 8 input channels with them
    dense = check_window_msa_heads(msa, x, mask, heads, channels, 4)
    assert (msa.num_heads, msa.embed_dims, msa.scale) == (2, 8, dense.scale)
    assert torch.equal(msa.relative_position_bias_table, dense.relative_position_bias_table[:, [0, 2]])
    with pytest.raises(ValueError, match="must stay"):
        FusedQKVAttentionPruner().prune_heads(msa, [0, 1])


def test_transfusion_attention_head_removal_is_the_dense_attention_without_those_heads() -> None:
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4)
    nn.init.normal_(attn.in_proj_bias)
    query, key = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    check_in_proj_heads(attn, query, key, [0, 2], [1, 3, 4, 6, 8, 11, 12, 14], 4)
    assert (attn.embed_dim, attn.num_heads, attn.head_dim) == (8, 2, 4)


def test_event_reaches_the_counts_replays_identically_and_trains(event: SimpleNamespace, batch: dict) -> None:
    assert block_counts(event.dense, list(DEPTH)) == {STAGE2: 2, "decoder.backbone.blocks.0": 1, "heads.object": 2}
    assert head_counts(event.dense, list(HEADS)) == {STAGE3: 8, "heads.object": 4}
    for model in (event.planned, event.replayed):
        assert block_counts(model, list(DEPTH)) == DEPTH
        assert head_counts(model, list(HEADS)) == HEADS
    assert model_digest(event.planned) == model_digest(event.replayed)
    assert [step[0] for step in event.history][:3] == ["blocks"] * 3
    backbone, head = event.replayed.encoders.camera.backbone, event.replayed.heads.object
    msa = backbone.stages[3].blocks[0].attn.w_msa
    assert msa.relative_position_bias_table.shape[1] == 6 and msa.qkv.in_features == 6 * 16 == msa.embed_dims
    assert backbone.num_features[3] == backbone.norm3.normalized_shape[0] == 96  # the stage stream lost 2 x 16
    assert head.shared_conv.out_channels == 3 * 8 and len(head.prediction_heads) == len(head.decoder) == 1
    assert len(event.replayed.decoder.backbone.blocks[0]) == 3  # only the entry conv-BN-ReLU is left
    params = [count_params_flops(m, batch)[0] for m in (event.dense, event.replayed)]
    assert params[1] < params[0]
    model = copy.deepcopy(event.replayed).train()
    losses = model(return_loss=True, **batch)
    assert {k for k in losses if "layer" in k} == {"loss/object/layer_-1_loss_cls", "loss/object/layer_-1_loss_bbox"}
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_saved_history_rebuilds_a_fresh_model_for_a_strict_load(event: SimpleNamespace, batch: dict) -> None:
    rebuilt = tiny(seed=7)
    with pytest.raises(RuntimeError):
        rebuilt.load_state_dict(event.replayed.state_dict(), strict=True)
    apply_pruning(rebuilt, batch, event.history)
    rebuilt.load_state_dict(event.replayed.state_dict(), strict=True)
    assert model_digest(rebuilt) == model_digest(event.replayed)


def test_kept_maps_and_renames_point_at_the_old_values(event: SimpleNamespace) -> None:
    old, new = event.dense.state_dict(), event.replayed.state_dict()
    for name, tensor in new.items():
        source = old[event.kept.sources.get(name, name)]
        if name in event.kept:
            torch.testing.assert_close(source.flatten()[event.kept[name]].view(tensor.shape), tensor, rtol=0, atol=0)
        else:
            assert torch.equal(source, tensor), name


def test_influence_removes_the_block_closest_to_identity(batch: dict) -> None:
    model = tiny(depths=(1, 1, 3, 1), second_layer_nums=(2, 1))
    blocks, second = model.encoders.camera.backbone.stages[2].blocks, model.decoder.backbone.blocks[0]
    with torch.no_grad():
        for linear in (blocks[2].attn.w_msa.proj, blocks[2].ffn.layers[3]):  # both residual branches add zero
            linear.weight.zero_()
            linear.bias.zero_()
        nn.init.dirac_(second[6].weight)  # second repeated conv: identity, then BN at init stats and ReLU
    lists = [block_list(model, STAGE2), block_list(model, "decoder.backbone.blocks.0")]
    stage, convs = block_influence(model, batch, lists).values()
    assert stage[2] == pytest.approx(0.0, abs=1e-12) and min(stage[0], stage[1]) > 1e-3
    assert convs[1] == pytest.approx(0.0, abs=1e-6) and convs[0] > 1e-3
    history = plan_depth(model, batch, {STAGE2: 2, "decoder.backbone.blocks.0": 1})
    assert history == [["blocks", f"{STAGE2}.blocks", [2]], ["blocks", "decoder.backbone.blocks.0", [6, 7, 8]]]


def test_a_swin_stage_keeps_a_plain_and_a_shifted_block(batch: dict) -> None:
    model = tiny(depths=(1, 1, 4, 1))
    blocks = model.encoders.camera.backbone.stages[2].blocks
    with torch.no_grad():
        for i in (1, 3):  # both shifted blocks are identities: the lowest influence
            for linear in (blocks[i].attn.w_msa.proj, blocks[i].ffn.layers[3]):
                linear.weight.zero_()
                linear.bias.zero_()
    shifts = [b.attn.shift_size > 0 for b in blocks]
    assert shifts == [False, True, False, True]
    [(_, _, removed)] = plan_depth(model, batch, {STAGE2: 2})
    assert len(removed) == 2 and len({1, 3} & set(removed)) == 1
    assert {b.attn.shift_size > 0 for b in model.encoders.camera.backbone.stages[2].blocks} == {False, True}


def test_a_removed_decoder_layer_takes_its_prediction_head_and_later_ones_are_renamed(batch: dict) -> None:
    dense = tiny(decoder_layers=3)
    model = copy.deepcopy(dense)
    kept = apply_pruning(model, batch, [["blocks", "heads.object.decoder", [0]]])
    head = model.heads.object
    assert len(head.decoder) == len(head.prediction_heads) == 2
    assert head.prediction_heads[0] is not dense.heads.object.prediction_heads[0]
    old = dense.state_dict()
    assert kept.sources["heads.object.prediction_heads.0.center.0.weight"] == (
        "heads.object.prediction_heads.1.center.0.weight")
    assert kept.sources["heads.object.decoder.1.norm1.weight"] == "heads.object.decoder.2.norm1.weight"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, old[kept.sources.get(name, name)])
    losses = model.eval()(return_loss=True, **batch)
    assert {k for k in losses if "layer_0" in k or "layer_1" in k} == {"loss/object/layer_0_loss_cls",
                                                                          "loss/object/layer_0_loss_bbox"}


def test_optimizer_state_and_groups_follow_renamed_parameters(batch: dict, spec: PruningSpec) -> None:
    model = tiny(decoder_layers=3)
    # one param group per parameter, with its own LR, as mmcv's paramwise_cfg builds them
    optimizer = torch.optim.AdamW([{"params": [p], "lr": 1e-4 * (i + 1)} for i, p in enumerate(model.parameters())])
    sum(v for k, v in model(return_loss=True, **batch).items() if "loss" in k).backward()
    optimizer.step()
    before, before_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    names = param_names(optimizer, model)
    blocks = [["blocks", "heads.object.decoder", [0]]]
    depth_pruned = copy.deepcopy(model)
    apply_pruning(depth_pruned, batch, blocks)  # the rest of the history names modules as they are after removals
    history = blocks + plan_pruning(depth_pruned, batch, spec, {}, heads={"heads.object": 3})
    kept = apply_pruning(model, batch, history)
    new = torch.optim.AdamW([{"params": [p], "lr": 0.0} for p in model.parameters()])
    transfer_state(optimizer, names, new, model, kept)

    name = "heads.object.prediction_heads.0.center.0.weight"  # was prediction_heads.1: renamed, inputs cut by heads
    source = kept.sources[name]
    old_w, new_w = dict(before.named_parameters())[source].detach(), dict(model.named_parameters())[name].detach()
    assert new_w.shape[1] == 24 < old_w.shape[1] == 32
    # Which input channels survived, found by matching weight columns (all distinct), independent of the kept map.
    column_of = {tuple(old_w[:, c].flatten().tolist()): c for c in range(old_w.shape[1])}
    survivors = [column_of[tuple(new_w[:, c].flatten().tolist())] for c in range(new_w.shape[1])]
    index = names.index(source)
    param = dict(model.named_parameters())[name]
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(new.state[param][key], before_state["state"][index][key][:, survivors], rtol=0,
                                   atol=0)
    group = next(g for g in new.param_groups if g["params"][0] is param)
    assert group["lr"] == before_state["param_groups"][index]["lr"] == pytest.approx(1e-4 * (index + 1))
    with_state = [n for n in param_names(new, model) if names.index(kept.sources.get(n, n)) in before_state["state"]]
    assert len(new.state) == len(with_state) < len(before_state["state"])  # the removed layer's state is gone


def test_scale_for_target_counts_the_depth_and_head_removals(batch: dict) -> None:
    spec = PruningSpec({"encoders.camera.backbone": 0.25, "encoders.camera.neck": 0.3, "decoder": 0.2, "heads": 0.12},
                       round_to=4)
    model = tiny()
    dense = count_params_flops(model, batch)[0]
    alone = scale_for_target(model, batch, spec, params_reduction=0.35)
    scale = scale_for_target(model, batch, spec, params_reduction=0.35, depth=DEPTH, heads=HEADS)
    assert scale < alone
    ratios = {g: min(scale * r, 0.9) for g, r in spec.groups.items()}
    apply_pruning(model, batch, plan_pruning(model, batch, spec, ratios, depth=DEPTH, heads=HEADS))
    assert 1 - count_params_flops(model, batch)[0] / dense == pytest.approx(0.35, abs=0.01)
    with pytest.raises(ValueError, match=r"depth and heads targets alone remove 0\.2"):
        scale_for_target(tiny(), batch, spec, params_reduction=0.1, depth=DEPTH, heads=HEADS)


@pytest.mark.parametrize("path, target, message", [
    ("decoder", 1, "not a block list"),
    ("encoders.camera.backbone.stages.9", 1, "names no module"),
    (STAGE2, 0, r"lie in \[1, 2\], got 0"),
    (STAGE2, 3, r"lie in \[1, 2\], got 3"),
    ("heads.object.decoder", 3, r"lie in \[1, 2\]"),
])
def test_bad_depth_targets_are_refused(path: str, target: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_depth_target(tiny(), path, target)


def test_a_second_stage_whose_convs_changed_width_cannot_lose_them(batch: dict) -> None:
    model = tiny()
    apply_pruning(model, batch, [["channels", "decoder.backbone.blocks.0.3", True, [0, 1, 2, 3]]])  # 32 -> 28 out
    with pytest.raises(ValueError, match="keep their input shape"):
        check_depth_target(model, "decoder.backbone.blocks.0", 0)


@pytest.mark.parametrize("heads, message", [
    ({"decoder": 2}, "holds no attention block"),
    ({STAGE3: 9}, r"8 heads; a target must lie in \[1, 8\]"),
    ({"encoders.camera.backbone": 1}, "different head counts"),
    ({"heads.object.decoder.0": 2}, "lose heads together"),  # layer 1 reads the same stream
])
def test_bad_head_targets_are_refused(heads: dict, message: str, batch: dict) -> None:
    with pytest.raises(ValueError, match=message):
        plan_pruning(tiny(), batch, PruningSpec({}), {}, heads=heads)


def test_block_removals_must_come_first_and_fit(batch: dict) -> None:
    model = tiny()
    with pytest.raises(ValueError, match="must come first"):
        apply_pruning(model, batch, [["heads", f"{STAGE3}.blocks.0.attn.w_msa", [0]],
                                     ["blocks", f"{STAGE2}.blocks", [0]]])
    with pytest.raises(ValueError, match="does not fit"):
        apply_pruning(model, batch, [["blocks", f"{STAGE2}.blocks", [2]]])


def test_recipe_parses_depth_and_heads_and_schedules_their_counts() -> None:
    recipe = parse_pruning({"depth": {STAGE2: 4}, "heads": {"heads.object": 6},
                            "schedule": {"end_epoch": 3, "num_events": 3, "shape": "cubic"}})
    assert recipe.groups == {} and recipe.depth == {STAGE2: 4} and recipe.heads == {"heads.object": 6}
    assert [recipe.counts_after(e, recipe.depth, {STAGE2: 6}) for e in range(4)] == [
        {STAGE2: 6}, {STAGE2: 5}, {STAGE2: 4}, {STAGE2: 4}]  # cubic: 1 - (1 - t)^3 of the 2 blocks, half up
    linear = parse_pruning({"heads": {"heads.object": 6}, "schedule": {"end_epoch": 2, "num_events": 2,
                                                                         "shape": "linear"}})
    assert [linear.counts_after(e, linear.heads, {"heads.object": 8})["heads.object"] for e in range(3)] == [8, 7, 6]


@pytest.mark.parametrize("section, key", [
    ({"depth": {STAGE2: -1}}, f"compression.pruning.depth.{STAGE2}"),
    ({"depth": {STAGE2: "four"}}, f"compression.pruning.depth.{STAGE2}"),
    ({"depth": [STAGE2]}, "compression.pruning.depth"),
    ({"heads": {"heads.object": 0}}, "compression.pruning.heads.heads.object"),
    ({"heads": {"heads.object": 6}, "target": {"params_reduction": 0.3}}, "compression.pruning.target"),
    ({}, "compression.pruning.groups"),
])
def test_bad_recipe_values_name_their_key(section: dict, key: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_pruning(section)
    assert err.value.key == key


def test_recipe_structure_check_names_the_key_and_the_problem() -> None:
    model = tiny()
    check_structure(parse_pruning({"depth": DEPTH, "heads": HEADS}), model)
    with pytest.raises(RecipeError, match="has 2 blocks") as err:
        check_structure(parse_pruning({"depth": {STAGE2: 5}}), model)
    assert err.value.key == f"compression.pruning.depth.{STAGE2}"
    with pytest.raises(RecipeError, match="holds no attention") as err:
        check_structure(parse_pruning({"heads": {"fuser": 2}}), model)
    assert err.value.key == "compression.pruning.heads.fuser"
    check_head_target(model, STAGE3, 8)  # already there: nothing to do, not an error
