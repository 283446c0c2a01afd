"""Channel pruning of BEVFusion's sparse lidar encoder on a small model of the same structure.

The snapshot's own ``SparseEncoder`` (spconv 1.x SubMConv3d / SparseConv3d + BatchNorm1d, SparseBasicBlock
residuals, densify + ``view(N, C * D, H, W)``) at small widths, over our CPU op stand-ins, with a dense Conv2d head
reading the folded BEV: the structure that left the real encoder's sparse convs outside Torch-Pruning's graph (its
ratio did nothing; their weights were "unwrapped parameters" pruned along a guessed dim).
"""

import copy

import pytest
import torch
from helpers import needs_bevfusion, use_bevfusion
from torch import Tensor, nn

from bevfusion_ext.compression.pruning import PruningSpec, apply_pruning, plan_pruning
from bevfusion_ext.compression.pruning.engine import pruned_copy
from bevfusion_ext.compression.pruning.sparse import SparseConvPruner
from bevfusion_ext.compression.pruning.tracing import build_graph

pytestmark = [needs_bevfusion, pytest.mark.usefixtures("one_thread")]

SHAPE = (24, 24, 41)  # x, y, z cells: z folds to D = 2, as in BEVFusion's 41-slice grids
OUT, DEPTH = 32, 2


class LidarNet(nn.Module):
    """BEVFusion's SparseEncoder (basic blocks, the Swin-T config's paddings) and a dense head on its folded BEV."""

    def __init__(self) -> None:
        super().__init__()
        from mmdet3d.models.backbones.sparse_encoder import SparseEncoder

        self.backbone = SparseEncoder(
            in_channels=5, sparse_shape=list(SHAPE), output_channels=OUT, block_type="basicblock",
            encoder_channels=((16, 16, 24), (24, 24, 32), (32, 32, 48), (48, 48)),
            encoder_paddings=((0, 0, 1), (0, 0, 1), (0, 0, (1, 1, 0)), (0, 0)),
        )
        self.head = nn.Sequential(nn.Conv2d(OUT * DEPTH, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, voxels: Tensor, coors: Tensor, batch_size: int) -> Tensor:
        return self.head(self.backbone(voxels, coors, batch_size))


def lidar_net(seed: int) -> LidarNet:
    """Seeded weights and BN statistics (identical for equal seeds)."""
    use_bevfusion()
    torch.manual_seed(seed)
    model = LidarNet()
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
        bn.running_mean.uniform_(-0.1, 0.1)
        bn.running_var.uniform_(0.5, 1.5)
    return model


def voxels(count: int = 600, batch_size: int = 2) -> dict:
    """Random occupied voxels, unique per sample: features [N, 5], coors [N, 4] (batch, x, y, z)."""
    generator = torch.Generator().manual_seed(0)
    cells = torch.randperm(batch_size * SHAPE[0] * SHAPE[1] * SHAPE[2], generator=generator)[:count]
    coors = torch.stack(torch.unravel_index(cells, (batch_size, *SHAPE)), 1).int()
    return {"voxels": torch.randn(count, 5, generator=generator), "coors": coors, "batch_size": batch_size}


def sparse_convs(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if SparseConvPruner.matches(m)}


@pytest.fixture(scope="module")
def event() -> tuple[LidarNet, LidarNet, list, dict]:
    """(dense model, its pruned replay, the history, the batch): backbone 0.25 and head 0.25."""
    batch = voxels()
    dense = lidar_net(0).eval()
    spec = PruningSpec({"backbone": 0.25, "head": 0.25}, round_to=8)
    history = plan_pruning(dense, batch, spec, spec.groups)
    pruned = copy.deepcopy(dense)
    apply_pruning(pruned, batch, history)
    return dense, pruned, history, batch


def test_sparse_convs_are_customized_layers_of_the_graph() -> None:
    """Every SubMConv3d / SparseConv3d is a graph node with our pruner, no sparse weight is left to Torch-Pruning's
    guessed-dim unwrapped parameters, and an encoder channel removes its D consecutive folded BEV channels."""
    model = lidar_net(0)
    graph = build_graph(model, voxels())
    convs = sparse_convs(model)
    assert len(convs) == 1 + 8 * 2 + 3 + 1  # conv_input, 8 basic blocks, 3 down convs, conv_out
    assert all(isinstance(graph.get_pruner_of_module(m), SparseConvPruner) for m in convs.values())
    assert all(m in graph.module2node for m in convs.values())
    assert not [p for p, _ in graph.unwrapped_parameters if p in graph.module2node]
    conv_out = model.backbone.conv_out[0]
    group = graph.get_pruning_group(conv_out, graph.get_pruner_of_module(conv_out).prune_out_channels, [1, 5])
    touched = {(dep.target.module, dep.handler.__name__): sorted(idxs) for dep, idxs in group}
    assert touched[(model.backbone.conv_out[1], "prune_out_channels")] == [1, 5]
    assert touched[(model.head[0], "prune_in_channels")] == [2, 3, 10, 11]


def test_residual_stream_is_one_group() -> None:
    """The residual adds of SparseBasicBlock couple conv_input with both blocks' conv2 outputs and every reader."""
    model = lidar_net(0)
    graph = build_graph(model, voxels())
    conv_input = model.backbone.conv_input[0]
    group = graph.get_pruning_group(conv_input, graph.get_pruner_of_module(conv_input).prune_out_channels, [3])
    touched = {(dep.target.module, dep.handler.__name__) for dep, _ in group}
    stage = model.backbone.encoder_layers.encoder_layer1
    expected = {(conv_input, "prune_out_channels"), (model.backbone.conv_input[1], "prune_out_channels"),
                (stage[2][0], "prune_in_channels")}
    for block in (stage[0], stage[1]):
        expected |= {(block.conv1, "prune_in_channels"), (block.conv2, "prune_out_channels"),
                     (block.bn2, "prune_out_channels")}
    assert expected <= touched
    assert not {(block.conv1, "prune_out_channels") for block in (stage[0], stage[1])} & touched


def test_encoder_plan_replays_exactly_and_trains(event: tuple) -> None:
    dense, pruned, history, batch = event
    convs, before = sparse_convs(pruned), sparse_convs(dense)
    assert {step[1] for step in history if step[1].startswith("backbone.")} <= set(convs)
    assert sum(p.numel() for p in pruned.backbone.parameters()) < sum(p.numel() for p in dense.backbone.parameters())
    assert any(m.out_channels < before[name].out_channels for name, m in convs.items())
    for m in convs.values():
        assert tuple(m.weight.shape[-2:]) == (m.in_channels, m.out_channels) and m.out_channels % 8 == 0
    assert pruned.head[0].in_channels == DEPTH * pruned.backbone.conv_out[0].out_channels
    spec = PruningSpec({"backbone": 0.25, "head": 0.25}, round_to=8)
    planned, _ = pruned_copy(dense, batch, spec, spec.groups, None, None)
    assert_same_state(pruned, planned)
    trained = copy.deepcopy(pruned).train()
    trained(**batch).square().mean().backward()
    assert all(p.grad is not None for p in trained.parameters())


def test_pruned_encoder_rebuilds_for_a_strict_load(event: tuple) -> None:
    _, pruned, history, batch = event
    rebuilt = lidar_net(7)
    apply_pruning(rebuilt, batch, history)
    rebuilt.load_state_dict(pruned.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(**batch), pruned.eval()(**batch), rtol=0, atol=0)


def test_pruned_encoder_equals_the_dense_one_with_pruned_channels_silenced(event: tuple) -> None:
    """Zero the BN scale and shift of every removed channel in the dense model: its outputs equal the pruned
    model's, so the residual coupling and the C x D fold into the head are the right channels."""
    dense, pruned, history, batch = event
    kept = apply_pruning(copy.deepcopy(dense), batch, history)
    silenced = copy.deepcopy(dense)
    state = silenced.state_dict()
    bns = [n for n, m in silenced.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for name in (n for n in bns if f"{n}.weight" in kept):
        removed = sorted(set(range(len(state[f"{name}.weight"]))) - set(kept[f"{name}.weight"].tolist()))
        state[f"{name}.weight"][removed] = 0.0
        state[f"{name}.bias"][removed] = 0.0
    assert "backbone.conv_out.1.weight" in kept
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(**batch), silenced.eval()(**batch), rtol=1e-4, atol=1e-5)


class ChannelMix(nn.Module):
    """A layer of a layout no pruner knows, applied to sparse features by SparseSequential: features @ weight."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(channels) + 0.01 * torch.randn(channels, channels))

    def forward(self, features: Tensor) -> Tensor:
        return features @ self.weight


def test_sparse_layers_without_a_pruner_are_named_not_guessed() -> None:
    """A traced layer whose weight layout is unknown is an error naming it, instead of Torch-Pruning pruning its
    last dim; a sparse conv the forward never reaches is an error naming it too."""
    model = lidar_net(0)
    stage = model.backbone.encoder_layers.encoder_layer2
    stage.add_module("mix", ChannelMix(32))
    with pytest.raises(ValueError, match=r"encoder_layer2\.mix.*ChannelMix"):
        build_graph(model, voxels())
    del stage.mix
    model.backbone.spare = copy.deepcopy(model.backbone.conv_out[0])
    with pytest.raises(ValueError, match=r"not reached.*backbone\.spare"):
        build_graph(model, voxels())


def assert_same_state(model: nn.Module, reference: nn.Module) -> None:
    """Same state-dict keys, shapes and values."""
    state, expected = model.state_dict(), reference.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    assert all(torch.equal(v, expected[k]) for k, v in state.items())
