"""Group search through BEVFusion-style functional attention: finite, with the right channels (toy + real snapshot).


BEVFusion's TransFusion attention projects q/k/v with one ``F.linear`` on ``in_proj_weight`` and chunks the
*output*; traced through, that split maps k / v indices to +E / +2E and the search through the query stream's
reconvergent paths never ends. Our tracing makes such blocks one opaque node.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from helpers import BEVFUSION_ROOT, ROOT, SWINT_DET, SYNTHETIC_CPU, needs_bevfusion, use_bevfusion
from torch import Tensor, nn

from bevfusion_ext.compression.pruning import PruningSpec, apply_pruning, auto_protected, plan_pruning
from bevfusion_ext.compression.pruning.counting import call_model
from bevfusion_ext.compression.pruning.engine import pruned_copy
from bevfusion_ext.compression.pruning.tracing import build_graph

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, HEADS, CLASSES, PROPOSALS, LAYERS = 16, 4, 3, 6, 2
BRANCHES = {"center": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2, "heatmap": CLASSES}


class FunctionalAttention(nn.Module):
    """Fused in_proj Parameters whose projected output is chunked into q/k/v; out_proj applied functionally."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """[L, B, C] inputs -> ([L, B, C'] output, [B * heads, L, S] weights); key is value for cross-attention."""
        e = self.embed_dim
        if key is query and value is query:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            q = F.linear(query, self.in_proj_weight[:e], self.in_proj_bias[:e])
            k, v = F.linear(key, self.in_proj_weight[e:], self.in_proj_bias[e:]).chunk(2, dim=-1)
        q, k, v = (t.reshape(t.shape[0], -1, e // self.num_heads).transpose(0, 1) for t in (q, k, v))
        weights = torch.bmm(q * (e // self.num_heads) ** -0.5, k.transpose(1, 2)).softmax(-1)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(query.shape[0], query.shape[1], e)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), weights


def pos_embed(dim: int) -> nn.Sequential:
    """Learned embedding of 2-D positions, [B, 2, P] -> [B, dim, P]."""
    return nn.Sequential(nn.Conv1d(2, dim, 1), nn.BatchNorm1d(dim), nn.ReLU(), nn.Conv1d(dim, dim, 1))


class DecoderLayer(nn.Module):
    """Post-norm self-attention, cross-attention to the BEV map and FFN, each with a residual."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.self_attn, self.cross_attn = FunctionalAttention(dim, heads), FunctionalAttention(dim, heads)
        self.self_pos, self.cross_pos = pos_embed(dim), pos_embed(dim)
        self.linear1, self.linear2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))

    def forward(self, query: Tensor, key: Tensor, query_xy: Tensor, key_xy: Tensor) -> Tensor:
        """query [B, C, P], key [B, C, N], positions [B, 2, P] / [B, 2, N] -> [B, C, P]."""
        qpos, kpos = self.self_pos(query_xy).permute(2, 0, 1), self.cross_pos(key_xy).permute(2, 0, 1)
        query, key = query.permute(2, 0, 1), key.permute(2, 0, 1)
        q = query + qpos
        query = self.norm1(query + self.self_attn(q, q, q)[0])
        kv = key + kpos
        query = self.norm2(query + self.cross_attn(query + qpos, kv, kv)[0])
        query = self.norm3(query + self.linear2(F.relu(self.linear1(query))))
        return query.permute(1, 2, 0)


class Branches(nn.Module):
    """Conv1d prediction branches read by name (the ``heads`` attribute auto_protected looks for)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads = dict(BRANCHES)
        for name, out in BRANCHES.items():
            layers = [nn.Conv1d(dim, 8, 1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, out, 1)]
            self.add_module(name, nn.Sequential(*layers))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {name: getattr(self, name)(x) for name in self.heads}


class QueryHead(nn.Module):
    """TransFusion's shape: BEV conv, dense heatmap, top-k queries gathered from the map, decoder, branches."""

    def __init__(self) -> None:
        super().__init__()
        self.shared_conv = nn.Conv2d(8, DIM, 3, padding=1)
        self.heatmap_head = nn.Sequential(nn.Conv2d(DIM, DIM, 3, padding=1), nn.BatchNorm2d(DIM), nn.ReLU(),
                                          nn.Conv2d(DIM, CLASSES, 1))
        self.class_encoding = nn.Conv1d(CLASSES, DIM, 1)
        self.decoder = nn.ModuleList(DecoderLayer(DIM, HEADS) for _ in range(LAYERS))
        self.prediction_heads = nn.ModuleList(Branches(DIM) for _ in range(LAYERS))

    def forward(self, bev: Tensor) -> list[Tensor]:
        feat = self.shared_conv(bev)
        b, c, h, w = feat.shape
        flat, heat = feat.view(b, c, -1), self.heatmap_head(feat)
        top = heat.detach().view(b, -1).argsort(dim=-1, descending=True)[:, :PROPOSALS]
        cls, cell = top // (h * w), top % (h * w)
        key_xy = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).view(1, 2, -1).float()
        key_xy = key_xy.expand(b, -1, -1)
        query_xy = key_xy.gather(-1, cell[:, None].expand(-1, 2, -1))
        query = flat.gather(-1, cell[:, None].expand(-1, c, -1))
        query = query + self.class_encoding(F.one_hot(cls, CLASSES).permute(0, 2, 1).float())
        outputs = [heat]
        for layer, branches in zip(self.decoder, self.prediction_heads, strict=True):
            query = layer(query, flat, query_xy, key_xy)
            preds = branches(query)
            outputs.extend(preds.values())
            query_xy = (preds["center"] + query_xy).detach()
        return outputs


def assert_same_state(model: nn.Module, reference: nn.Module) -> None:
    """Same state-dict keys, shapes and values."""
    state, expected = model.state_dict(), reference.state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    assert all(torch.equal(v, expected[k]) for k, v in state.items())


def toy() -> tuple[QueryHead, tuple[Tensor]]:
    torch.manual_seed(0)
    return QueryHead(), (torch.randn(2, 8, 6, 6),)


def expected_query_group() -> set[tuple[str, str]]:
    """(layer, in/out) pairs that share the query stream's channels: every reconvergent path, both attentions."""
    found = {("shared_conv", "out"), ("heatmap_head.0", "in"), ("class_encoding", "out")}
    for i in range(LAYERS):
        d = f"decoder.{i}"
        found |= {(f"{d}.{a}", side) for a in ("self_attn", "cross_attn") for side in ("in", "out")}
        found |= {(f"{d}.{p}.3", "out") for p in ("self_pos", "cross_pos")}
        found |= {(f"{d}.norm{n}", "out") for n in (1, 2, 3)} | {(f"{d}.linear1", "in"), (f"{d}.linear2", "out")}
        found |= {(f"prediction_heads.{i}.{name}.0", "in") for name in BRANCHES}
    return found


def test_group_search_through_chunked_attention_is_finite_and_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = toy()
    graph = build_graph(model, inputs)
    edges = sum(len(node.dependencies) for node in graph.module2node.values())
    adds = []
    add_dep = tp.dependency.Group.add_dep

    def counted(group: tp.dependency.Group, dep: tp.Dependency, idxs: list) -> None:
        """Fail instead of hanging: a search that re-adds dependencies with new index lists is the bug."""
        adds.append(dep)
        assert len(adds) <= edges, "group search re-visits dependencies with ever new index lists"
        add_dep(group, dep, idxs)

    monkeypatch.setattr(tp.dependency.Group, "add_dep", counted)
    group = graph.get_pruning_group(model.shared_conv, graph.get_pruner_of_module(model.shared_conv).prune_out_channels,
                                    list(range(DIM)))
    names = {m: n for n, m in model.named_modules()}
    found = {(names[dep.target.module], "out" if graph.is_out_channel_pruning_fn(dep.handler) else "in")
             for dep, _ in group if dep.target.module in names}
    assert found == expected_query_group()
    assert all(sorted(item.idxs) == list(range(DIM)) == sorted(item.root_idxs) for item in group)


def test_attention_blocks_are_single_nodes_on_their_real_inputs() -> None:
    model, inputs = toy()
    graph = build_graph(model, inputs)
    for layer in model.decoder:
        assert len(graph.module2node[layer.self_attn].inputs) == 1  # q = k = v
        assert len(graph.module2node[layer.cross_attn].inputs) == 2  # query + pos, key + pos (= value)
    assert not any(node.type == tp.ops.OPTYPE.SPLIT for node in graph.module2node.values())  # internals hidden


def test_planned_toy_head_replays_runs_and_keeps_its_output_layers() -> None:
    model, inputs = toy()
    spec = PruningSpec({"": 0.25}, round_to=4)
    history = plan_pruning(model, inputs, spec, spec.groups)
    planned, _ = pruned_copy(model, inputs, spec, spec.groups, None, None)
    fresh = copy.deepcopy(model)
    apply_pruning(fresh, inputs, history)
    assert fresh.shared_conv.out_channels == DIM - 4
    assert fresh.decoder[1].cross_attn.in_proj_weight.shape == (3 * (DIM - 4), DIM - 4)
    assert_same_state(fresh, planned)
    dense_out, pruned_out = model.eval()(*inputs), fresh.eval()(*inputs)
    assert [t.shape for t in pruned_out] == [t.shape for t in dense_out]
    modules, dense_modules = dict(fresh.named_modules()), dict(model.named_modules())
    assert all(modules[n].weight.shape[0] == dense_modules[n].weight.shape[0] for n in auto_protected(model))


@pytest.fixture(scope="module")
def real_head_event() -> tuple[nn.Module, nn.Module, nn.Module, list, dict]:
    """The real Swin-T camera+lidar model at the synthetic CPU resolution and the seed recipe (heads included):
    (dense, history replayed into a copy of dense, the planner's own pruned copy, history, batch)."""
    use_bevfusion()
    from bevfusion_ext.compression.recipe import parse_recipe
    from bevfusion_ext.runner.builder import build_dataset, build_model, example_batch
    from bevfusion_ext.runner.train import prepare_config

    recipes = ["--recipe", str(ROOT / SYNTHETIC_CPU), "--recipe", str(ROOT / "configs/compression/prune_seed.yaml")]
    cfg, sources = prepare_config(str(BEVFUSION_ROOT / SWINT_DET), recipes)
    batch = example_batch(build_dataset(cfg.data.train, "data.train", sources))
    dense = build_model(cfg, sources)
    spec = parse_recipe(cfg.compression).pruning.spec()
    history = plan_pruning(dense, batch, spec, dict(spec.groups))
    replayed = copy.deepcopy(dense)
    apply_pruning(replayed, batch, history)
    planned, _ = pruned_copy(dense, batch, spec, dict(spec.groups), None, None)
    return dense, replayed, planned, history, batch


@needs_bevfusion
def test_real_transfusion_head_plans_replays_and_runs(real_head_event: tuple) -> None:
    dense, pruned, planned, history, batch = real_head_event
    assert_same_state(pruned, planned)
    head = pruned.heads.object
    assert {step[1] for step in history if step[1].startswith("heads.object.")}  # the heads group was pruned
    assert head.shared_conv.out_channels < dense.heads.object.shared_conv.out_channels
    width = head.shared_conv.out_channels
    for attn in (head.decoder[0].self_attn, head.decoder[0].multihead_attn):
        assert attn.in_proj_weight.shape[1] == attn.out_proj.out_features == width
    modules, dense_modules = dict(pruned.named_modules()), dict(dense.named_modules())
    protected = [n for n in auto_protected(dense) if n.startswith("heads.object.")]
    assert len(protected) == 1 + len(dense.heads.object.prediction_heads[0].heads)  # heatmap + every branch
    assert all(modules[n].weight.shape[0] == dense_modules[n].weight.shape[0] for n in protected)
    losses = call_model(pruned, batch, return_loss=True)
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total)
    total.backward()
    with torch.no_grad():
        results = call_model(pruned, batch, return_loss=False)
    assert {"boxes_3d", "scores_3d", "labels_3d"} <= set(results[0])
