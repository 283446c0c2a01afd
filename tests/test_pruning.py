"""Structured pruning core on the whole tiny reference model: plans, replays, kept maps, equivalences, targets."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bevfusion_ext.compression import model_digest
from bevfusion_ext.compression.pruning import (
    PruningSpec,
    apply_pruning,
    auto_protected,
    count_params_flops,
    group_channels,
    model_summary,
    plan_pruning,
    prune_report,
    scale_for_target,
)
from bevfusion_ext.compression.pruning.engine import replay
from bevfusion_ext.compression.pruning.pruners import (
    FusedQKVAttentionPruner,
    InProjAttentionPruner,
    UnfoldMergePruner,
)
from bevfusion_ext.compression.pruning.tracing import build_graph
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.models.swin import PatchMerging, WindowMSA
from bevfusion_ext.models.transfusion import MultiheadAttention

pytestmark = pytest.mark.usefixtures("one_thread")

GROUPS = {"encoders.camera.backbone": 0.25, "encoders.camera.neck": 0.3, "decoder": 0.2, "heads": 0.12}
BACKBONE = "encoders.camera.backbone"


def tiny(seed: int = 0, **overrides) -> nn.Module:
    """The tiny reference model with seeded weights (identical for equal seeds)."""
    torch.manual_seed(seed)
    return build_model(reference_config("tiny", **overrides))


def complement(size: int, idxs: list[int]) -> list[int]:
    return [i for i in range(size) if i not in idxs]


@pytest.fixture(scope="module")
def spec() -> PruningSpec:
    return PruningSpec(dict(GROUPS), round_to=4)


@pytest.fixture(scope="module")
def event(batch: dict, spec: PruningSpec) -> SimpleNamespace:
    """One planned + applied event on the tiny model: dense model, history, pruned model, kept maps."""
    dense = tiny()
    history = plan_pruning(dense, batch, spec, spec.groups)
    pruned = copy.deepcopy(dense)
    before = model_summary(pruned, batch, spec)
    kept = apply_pruning(pruned, batch, history)
    return SimpleNamespace(dense=dense, history=history, pruned=pruned, kept=kept, before=before)


def test_pruned_model_trains_keeps_contracts_and_shrinks_as_planned(event: SimpleNamespace, batch: dict,
                                                                    spec: PruningSpec) -> None:
    pruned, dense = copy.deepcopy(event.pruned), event.dense
    pruned.train()
    losses = pruned(return_loss=True, **batch)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
    pruned.eval()
    results = pruned(return_loss=False, **batch)
    assert len(results) == 2 and results[0]["boxes_3d"].shape[1] == 7 and results[0]["masks_bev"].shape == (2, 64, 64)

    dense_modules, pruned_modules = dict(dense.named_modules()), dict(pruned.named_modules())
    for name in auto_protected(dense):
        assert pruned_modules[name].weight.shape[0] == dense_modules[name].weight.shape[0], name
    vt, dense_vt = pruned.encoders.camera.vtransform, dense.encoders.camera.vtransform
    assert vt.depthnet[-1].out_channels == vt.D + vt.C
    for name in ("frustum", "dx", "bx", "nx"):
        assert torch.equal(getattr(vt, name), getattr(dense_vt, name)) and not getattr(vt, name).requires_grad

    for name, module in pruned.named_modules():
        old = dense_modules[name]
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and module.weight.shape != old.weight.shape:
            out = module.weight.shape[1 if isinstance(module, nn.ConvTranspose2d) else 0]
            assert out % spec.round_to == 0 or out == old.weight.shape[0], name
        if isinstance(module, (WindowMSA, MultiheadAttention)):
            width = module.proj.in_features if isinstance(module, WindowMSA) else module.embed_dim
            assert width % module.num_heads == 0 and module.num_heads == old.num_heads, name

    report = prune_report(event.before, pruned, batch, spec)
    json.dumps(report)
    assert report["params"]["after"] < report["params"]["before"]
    assert report["flops"]["after"] < report["flops"]["before"]
    for group, ratio in GROUPS.items():
        assert report["groups"][group]["removed"] == pytest.approx(ratio, abs=0.05), group
    assert f"{BACKBONE}.stages.0.blocks.0.attn.w_msa.qkv" in report["layers"]


def test_plan_leaves_model_and_rng_alone(batch: dict, spec: PruningSpec) -> None:
    model = tiny()
    digest, rng = model_digest(model), torch.get_rng_state()
    plan_pruning(model, batch, spec, {"decoder": 0.5})
    assert model_digest(model) == digest and torch.equal(torch.get_rng_state(), rng)


def test_a_one_camera_batch_plans_what_a_two_camera_batch_plans(event: SimpleNamespace, spec: PruningSpec) -> None:
    """With N = 1 the LSS camera split [B*N, C, H, W] -> [B, N, C, H, W] looked to Torch-Pruning like a flatten
    (IndexError inside its importance); magnitude ranks do not depend on the batch, so both plans are the event's."""
    for cameras in (1, 2):
        one_frame = collate([SyntheticBEVDataset(1, num_cameras=cameras)[0]])
        assert plan_pruning(tiny(), one_frame, spec, spec.groups) == event.history, cameras


def test_history_is_json_and_replays_identically_on_separate_models(event: SimpleNamespace, batch: dict) -> None:
    history = json.loads(json.dumps(event.history))
    first, second = tiny(), tiny()
    apply_pruning(first, batch, history)
    apply_pruning(second, batch, history)
    assert model_digest(first) == model_digest(second) == model_digest(event.pruned)


def test_kept_maps_equal_a_replay_on_the_real_tensors(event: SimpleNamespace, batch: dict) -> None:
    real = tiny()
    replay(build_graph(real, batch), real, event.history)
    pruned, dense, real_sd = event.pruned.state_dict(), event.dense.state_dict(), real.state_dict()
    assert pruned.keys() == real_sd.keys()
    assert all(torch.equal(pruned[k], real_sd[k]) for k in pruned)
    changed = {k for k, v in dense.items() if v.is_floating_point() and v.shape != pruned[k].shape}
    assert set(event.kept) == changed
    for name, kept in event.kept.items():
        assert torch.equal(dense[name].flatten()[kept].view(pruned[name].shape), pruned[name]), name


def test_swin_channels_stay_consistent_across_residual_attention_and_patch_merging(event: SimpleNamespace) -> None:
    """The kept maps show one residual channel set per stage, in every layer that reads or writes it."""
    kept, dense = event.kept, event.dense.state_dict()
    stage = f"{BACKBONE}.stages.0"

    def rows_cols(name: str) -> tuple[list[int], list[int]]:
        cols = dense[name].shape[1]
        idx = kept[name].view(-1, event.pruned.state_dict()[name][0].numel())
        return idx[:, 0].div(cols, rounding_mode="floor").tolist(), (idx[0] % cols).tolist()

    residual = kept[f"{stage}.blocks.0.norm1.weight"].tolist()
    qkv_rows, qkv_cols = rows_cols(f"{stage}.blocks.0.attn.w_msa.qkv.weight")
    proj_rows, proj_cols = rows_cols(f"{stage}.blocks.0.attn.w_msa.proj.weight")
    assert qkv_cols == proj_rows == residual == rows_cols(f"{stage}.blocks.0.ffn.layers.3.weight")[0]
    assert residual == rows_cols(f"{stage}.blocks.0.ffn.layers.0.weight")[1]
    inner = proj_cols
    assert qkv_rows == inner + [16 + i for i in inner] + [32 + i for i in inner]
    assert kept[f"{BACKBONE}.patch_embed.projection.bias"].tolist() == residual
    unfold = [4 * c + j for c in residual for j in range(4)]
    assert kept[f"{stage}.downsample.norm.weight"].tolist() == unfold
    assert rows_cols(f"{stage}.downsample.reduction.weight")[1] == unfold
    kept_dims = rows_cols(f"{BACKBONE}.stages.2.blocks.0.attn.w_msa.proj.weight")[1]  # 4 heads of 16 dims
    assert [sum(d // 16 == head for d in kept_dims) for head in range(4)] == [12] * 4


def test_window_msa_pruning_is_the_dense_attention_on_kept_channels() -> None:
    torch.manual_seed(0)
    msa = WindowMSA(embed_dims=16, num_heads=4, window_size=2)
    x, mask = torch.randn(6, 4, 16), torch.randint(0, 2, (3, 4, 4)).float() * -100.0
    channels, dims = [1, 5, 6, 12], [0, 6, 9, 15]  # one inner dim in each of the 4 heads
    dense = copy.deepcopy(msa)
    with torch.no_grad():
        dense.qkv.weight.view(3, 16, 16)[:, dims] = 0.0
        dense.qkv.bias.view(3, 16)[:, dims] = 0.0
    keep = complement(16, channels)
    expected = dense(x.index_fill(2, torch.tensor(channels), 0.0), mask)[..., keep]
    pruner = FusedQKVAttentionPruner()
    pruner.prune_head_dims(msa, dims)
    pruner.prune_in_channels(msa, channels)
    pruner.prune_out_channels(msa, channels)
    torch.testing.assert_close(msa(x[..., keep], mask), expected)
    assert (msa.num_heads, msa.embed_dims, msa.scale) == (4, 12, dense.scale)
    assert msa.relative_position_bias_table.shape == dense.relative_position_bias_table.shape
    with pytest.raises(ValueError, match="every head"):
        pruner.prune_head_dims(msa, [0, 1, 2, 3])


def test_transfusion_attention_pruning_is_the_dense_attention_on_kept_channels() -> None:
    torch.manual_seed(0)
    attn = MultiheadAttention(16, 4)
    nn.init.normal_(attn.in_proj_bias)
    query, key = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    channels, dims = [0, 3, 8, 11], [1, 7, 8, 14]
    dense = copy.deepcopy(attn)
    with torch.no_grad():
        dense.in_proj_weight.view(3, 16, 16)[:, dims] = 0.0
        dense.in_proj_bias.view(3, 16)[:, dims] = 0.0
    keep = complement(16, channels)
    zero = torch.tensor(channels)
    expected = dense(query.index_fill(2, zero, 0.0), key.index_fill(2, zero, 0.0), key.index_fill(2, zero, 0.0))
    pruner = InProjAttentionPruner()
    pruner.prune_head_dims(attn, dims)
    pruner.prune_in_channels(attn, channels)
    pruner.prune_out_channels(attn, channels)
    torch.testing.assert_close(attn(query[..., keep], key[..., keep], key[..., keep]), expected[..., keep])
    assert (attn.embed_dim, attn.head_dim, attn.num_heads) == (12, 4, 4)


def test_patch_merging_drops_the_unfold_channels_of_pruned_inputs() -> None:
    torch.manual_seed(0)
    merge = PatchMerging(8, 16)
    nn.init.normal_(merge.norm.weight)
    nn.init.normal_(merge.norm.bias)
    x = torch.randn(2, 16, 8)
    channels, outputs = [1, 4], [0, 3, 7, 9]
    keep_in, keep_out = complement(8, channels), complement(16, outputs)
    # Which unfold rows carry input channel c, found by unfolding one-hot inputs (independent of the c*4+j rule).
    rows = sorted(r for c in keep_in
                  for r in merge.sampler(F.one_hot(torch.tensor(c), 8).float().view(1, 8, 1, 1).expand(1, 8, 2, 2))
                  .view(-1).nonzero().view(-1).tolist())
    unfolded = merge.sampler(x.view(2, 4, 4, 8).permute(0, 3, 1, 2)).transpose(1, 2)[..., rows]
    normed = F.layer_norm(unfolded, (len(rows),), merge.norm.weight[rows], merge.norm.bias[rows])
    expected = F.linear(normed, merge.reduction.weight[keep_out][:, rows])
    pruner = UnfoldMergePruner()
    pruner.prune_in_channels(merge, channels)
    pruner.prune_out_channels(merge, outputs)
    got, hw = merge(x[..., keep_in], (4, 4))
    torch.testing.assert_close(got, expected)
    assert hw == (2, 2) and pruner.get_in_channels(merge) == 6


def test_conv_bn_groups_equal_the_dense_model_with_pruned_channels_silenced(batch: dict) -> None:
    """Neck concat, fuser concat, SECOND, SECONDFPN deconv, lidar encoder: silence the pruned channels' BN in the
    dense model and its BEV features equal the pruned model's."""
    spec = PruningSpec({"encoders.camera.neck": 0.3, "encoders.lidar": 0.3, "fuser": 0.3, "decoder": 0.3},
                       round_to=4)
    dense = tiny().eval()
    pruned = copy.deepcopy(dense)
    kept = apply_pruning(pruned, batch, plan_pruning(dense, batch, spec, spec.groups))
    silenced = copy.deepcopy(dense)
    bns = [name for name, m in silenced.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    state = silenced.state_dict()
    for name in bns:
        if f"{name}.weight" in kept:
            removed = complement(len(state[f"{name}.weight"]), kept[f"{name}.weight"].tolist())
            state[f"{name}.weight"][removed] = 0.0
            state[f"{name}.bias"][removed] = 0.0
    assert any(f"{name}.weight" in kept for name in bns)
    outputs = [kept.get(f"decoder.neck.deblocks.{i}.1.weight", torch.arange(32)) + 32 * i for i in range(2)]
    inputs = (batch["img"], batch["points"], batch["camera_intrinsics"], batch["camera2lidar"])
    with torch.no_grad():
        expected = silenced.extract_features(*inputs)[0][:, torch.cat(outputs)]
        torch.testing.assert_close(pruned.extract_features(*inputs)[0], expected, rtol=1e-4, atol=1e-4)


def test_depth_bins_are_kept_and_camera_lidar_groups_stay_separate(batch: dict) -> None:
    """Identity vtransform downsample: the fuser concat's camera input is the BEV pool of the depth x context
    product, where Torch-Pruning's own shape inference merges camera and lidar channels."""
    model = tiny(camera_bev_resolution=0.8)
    spec = PruningSpec({"encoders.camera.vtransform": 0.5, "encoders.lidar": 0.5}, round_to=4)
    apply_pruning(model, batch, plan_pruning(model, batch, spec, spec.groups))
    vt = model.encoders.camera.vtransform
    lidar_out = model.encoders.lidar.backbone.conv_out[0].out_channels
    assert vt.depthnet[-1].out_channels == vt.D + vt.C and vt.depthnet[0].out_channels == 16
    assert lidar_out == 24 and model.fuser[0].in_channels == vt.C + lidar_out
    model(return_loss=True, **batch)


def test_saved_histories_rebuild_the_architecture_for_a_strict_load(event: SimpleNamespace, batch: dict,
                                                                    spec: PruningSpec) -> None:
    second = plan_pruning(event.pruned, batch, spec, {"decoder": 0.25, "heads": 0.1})
    twice = copy.deepcopy(event.pruned)
    apply_pruning(twice, batch, second)
    once, now = group_channels(event.pruned, spec), group_channels(twice, spec)
    assert now["decoder"] < once["decoder"] and now["heads"] < once["heads"] and now[BACKBONE] == once[BACKBONE]
    rebuilt = tiny(seed=7)
    for history in (event.history, second):
        apply_pruning(rebuilt, batch, history)
    rebuilt.load_state_dict(twice.state_dict(), strict=True)
    assert model_digest(rebuilt) == model_digest(twice)


def test_scale_for_target_hits_a_params_reduction(batch: dict, spec: PruningSpec) -> None:
    model = tiny()
    dense_params = count_params_flops(model, batch)[0]
    scale = scale_for_target(model, batch, spec, params_reduction=0.3)
    ratios = {group: min(scale * ratio, 0.9) for group, ratio in GROUPS.items()}
    apply_pruning(model, batch, plan_pruning(model, batch, spec, ratios))
    assert 1 - count_params_flops(model, batch)[0] / dense_params == pytest.approx(0.3, abs=0.01)
    with pytest.raises(ValueError, match="unreachable"):
        scale_for_target(model, batch, PruningSpec({"decoder": 0.5}, round_to=4), params_reduction=0.9)


@pytest.mark.parametrize("importance", ["taylor", "bn_scale"])
def test_taylor_and_bn_scale_importance(importance: str, batch: dict) -> None:
    model = tiny()
    spec = PruningSpec({"encoders.camera.backbone": 0.25, "decoder": 0.25}, importance=importance, round_to=4)
    history = plan_pruning(model, batch, spec, spec.groups)
    assert all(p.grad is None for p in model.parameters())
    magnitude = plan_pruning(model, batch, PruningSpec(spec.groups, round_to=4), spec.groups)
    assert [step[:2] for step in history] == [step[:2] for step in magnitude] and history != magnitude
    params = count_params_flops(model, batch)[0]
    apply_pruning(model, batch, history)
    assert count_params_flops(model, batch)[0] < params


def test_taylor_uses_the_given_loss(batch: dict) -> None:
    model = tiny()
    spec = PruningSpec({"decoder": 0.25}, importance="taylor", round_to=4)
    calls = []

    def loss_fn(m: nn.Module, inputs: dict) -> torch.Tensor:
        calls.append(1)
        return sum(m(return_loss=True, **inputs).values())

    plan_pruning(model, batch, spec, spec.groups, loss_fn=loss_fn)
    assert calls == [1]


def test_a_history_that_does_not_fit_raises(batch: dict) -> None:
    with pytest.raises(ValueError, match="decoder.nope"):
        apply_pruning(tiny(), batch, [["channels", "decoder.nope", True, [0]]])
    with pytest.raises(ValueError, match="head_dims"):
        apply_pruning(tiny(), batch, [["head_dims", "decoder.backbone.blocks.0.0", [0]]])


@pytest.mark.parametrize("groups, ratios, key", [
    ({"encoders.camera.backbnoe": 0.2}, None, "encoders.camera.backbnoe"),
    ({"decoder": 0.95}, None, "decoder"),
    ({"decoder": -0.1}, None, "decoder"),
    ({"decoder": 0.2}, {"heads": 0.1}, "heads"),
    ({"decoder": 0.2}, {"decoder": 1.5}, "decoder"),
])
def test_bad_spec_raises_naming_the_key(groups: dict, ratios: dict | None, key: str, batch: dict) -> None:
    model = tiny()
    with pytest.raises(ValueError, match=key):
        plan_pruning(model, batch, PruningSpec(groups), ratios if ratios is not None else groups)


def test_auto_protected_finds_the_reference_contracts() -> None:
    assert auto_protected(tiny()) == [
        "encoders.camera.vtransform.depthnet.6", "encoders.camera.vtransform.downsample.6",
        "heads.object.heatmap_head.1", *[f"heads.object.prediction_heads.0.{name}.3" for name in
                                         ("center", "height", "dim", "rot", "vel", "heatmap")],
        "heads.map.classifier.6",
    ]


class Toy(nn.Module):
    """A plain module: conv stem -> conv body (mmdet-style reentrant checkpointing) -> conv head (the output)."""

    def __init__(self, spare: bool = False) -> None:
        super().__init__()
        self.with_cp = True
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)
        self.spare = nn.Conv2d(16, 4, 1) if spare else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = checkpoint(self.body, x, use_reentrant=True) if self.with_cp and x.requires_grad else self.body(x)
        return self.head(x)


def test_any_module_with_a_tensor_input_and_untraced_layers_are_refused() -> None:
    x = torch.randn(2, 3, 8, 8)
    toy, spec = Toy(), PruningSpec({"": 0.5}, round_to=4)
    apply_pruning(toy, x, plan_pruning(toy, x, spec, spec.groups))
    assert toy.stem[0].out_channels == toy.body[0].out_channels == 8 and toy.with_cp and toy(x).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="spare"):
        plan_pruning(Toy(spare=True), x, spec, spec.groups)
