"""Depth and head pruning on BEVFusion's own classes (the snapshot): mmdet's WindowMSA, BEVFusion's TransFusion
MultiheadAttention, and the real Swin-T camera+lidar model (Swin stage, SECOND stage, stage-3 and TransFusion heads
with channels), replayed into a freshly built model that loads strictly."""
import copy
from types import SimpleNamespace

import pytest
import torch
from attention_heads import check_in_proj_heads, check_window_msa_heads
from helpers import BEVFUSION_ROOT, ROOT, SWINT_DET, SYNTHETIC_CPU, needs_bevfusion, use_bevfusion
from torch import nn

from bevfusion_ext.compression import model_digest
from bevfusion_ext.compression.pruning import (
    PruningSpec,
    apply_pruning,
    block_counts,
    count_params_flops,
    head_counts,
    plan_pruning,
)
from bevfusion_ext.compression.pruning.counting import call_model

pytestmark = [needs_bevfusion, pytest.mark.usefixtures("one_thread")]

DEPTH = {"encoders.camera.backbone.stages.2": 4, "decoder.backbone.blocks.0": 4}  # Swin 6 -> 4, SECOND 5 -> 4
HEADS = {"encoders.camera.backbone.stages.3": 20, "heads.object": 6}  # 24 -> 20, 8 -> 6
GROUPS = {"encoders.camera.neck": 0.25}


@pytest.fixture(scope="module")
def real() -> SimpleNamespace:
    """The real model at the synthetic CPU overlay, one depth + heads + channels event planned and replayed."""
    use_bevfusion()
    from bevfusion_ext.runner.builder import build_dataset, build_model, example_batch
    from bevfusion_ext.runner.train import prepare_config

    cfg, sources = prepare_config(str(BEVFUSION_ROOT / SWINT_DET), ["--recipe", str(ROOT / SYNTHETIC_CPU)])
    batch = example_batch(build_dataset(cfg.data.train, "data.train", sources))
    dense = build_model(cfg, sources)
    spec = PruningSpec(dict(GROUPS), round_to=8)
    history = plan_pruning(dense, batch, spec, spec.groups, depth=DEPTH, heads=HEADS)
    replayed = copy.deepcopy(dense)
    apply_pruning(replayed, batch, history)
    return SimpleNamespace(dense=dense, replayed=replayed, history=history, batch=batch,
                           fresh=lambda: build_model(cfg, sources, init_weights=False))


def test_mmdet_window_msa_loses_whole_heads_exactly() -> None:
    use_bevfusion()
    from mmdet.models.backbones.swin import WindowMSA

    torch.manual_seed(0)
    msa = WindowMSA(embed_dims=24, num_heads=3, window_size=(2, 2))
    nn.init.normal_(msa.relative_position_bias_table)
    x, mask = torch.randn(6, 4, 24), torch.randint(0, 2, (3, 4, 4)).float() * -100.0
    heads, channels = [1], [0, 3, 4, 9, 11, 17, 20, 23]  # one head of 8 dims, and the 8 input channels it implies
    dense = check_window_msa_heads(msa, x, mask, heads, channels, 8)
    assert (msa.num_heads, msa.embed_dims, msa.scale) == (2, 16, dense.scale)
    assert torch.equal(msa.relative_position_bias_table, dense.relative_position_bias_table[:, [0, 2]])


def test_bevfusion_multihead_attention_loses_whole_heads_exactly() -> None:
    use_bevfusion()
    from mmdet3d.models.utils.transformer import MultiheadAttention

    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4)
    nn.init.normal_(attn.in_proj_bias)
    query, key = torch.randn(5, 2, 16), torch.randn(7, 2, 16)  # [L, B, E]
    check_in_proj_heads(attn, query, key, [0, 3], [1, 2, 5, 6, 9, 10, 13, 14], 4, output=lambda out: out[0])
    assert (attn.embed_dim, attn.num_heads) == (8, 2)


def test_real_model_event_reaches_the_counts_trains_and_reloads_strictly(real: SimpleNamespace) -> None:
    assert block_counts(real.dense, list(DEPTH)) == {"encoders.camera.backbone.stages.2": 6,
                                                    "decoder.backbone.blocks.0": 5}
    assert head_counts(real.dense, list(HEADS)) == {"encoders.camera.backbone.stages.3": 24, "heads.object": 8}
    assert block_counts(real.replayed, list(DEPTH)) == DEPTH
    assert head_counts(real.replayed, list(HEADS)) == HEADS
    backbone = real.replayed.encoders.camera.backbone
    assert type(backbone).__module__ == "mmdet.models.backbones.swin"
    assert {block.attn.shift_size > 0 for block in backbone.stages[2].blocks} == {False, True}
    msa = backbone.stages[3].blocks[0].attn.w_msa
    assert msa.relative_position_bias_table.shape[1] == 20
    assert msa.qkv.in_features == 20 * 32 == backbone.num_features[3]  # the stage stream lost 4 heads x 32
    head = real.replayed.heads.object
    assert head.shared_conv.out_channels == 6 * 16 == head.decoder[0].self_attn.embed_dim
    assert count_params_flops(real.replayed, real.batch)[0] < count_params_flops(real.dense, real.batch)[0]

    model = copy.deepcopy(real.replayed)
    losses = call_model(model, real.batch, return_loss=True)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    fresh = real.fresh()
    apply_pruning(fresh, real.batch, real.history)
    fresh.load_state_dict(real.replayed.state_dict(), strict=True)
    assert model_digest(fresh) == model_digest(real.replayed)


def test_the_shipped_structure_recipe_fits_the_real_model(real: SimpleNamespace) -> None:
    from bevfusion_ext.compression.recipe import check_structure, parse_recipe
    from bevfusion_ext.runner.train import prepare_config

    structure = ROOT / "configs/compression/prune_structure.yaml"
    recipes = ["--recipe", str(ROOT / SYNTHETIC_CPU), "--recipe", str(structure)]
    cfg, _ = prepare_config(str(BEVFUSION_ROOT / SWINT_DET), recipes)
    recipe = parse_recipe(cfg.compression).pruning
    assert recipe.depth == {"encoders.camera.backbone.stages.2": 4, "decoder.backbone.blocks.0": 4,
                            "decoder.backbone.blocks.1": 4} and recipe.heads == {"heads.object": 6}
    check_structure(recipe, real.dense)
