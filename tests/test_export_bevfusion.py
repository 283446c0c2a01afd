"""Export of BEVFusion's real model (the snapshot at BEVFUSION_ROOT, synthetic CPU overlay): every ONNX part through
the real modules, quantized and in every flavour, with onnxruntime parity; BEVFusion's own TransFusion head (top-k as
one bounded TopK, the unbatched max-pool, the quantized BEV-grid constant kept in noqdq) and segmentation head; the
sparse encoder as a named kernel contract; and tools/export_engine.py on a real-model checkpoint."""

import copy
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from helpers import BEVFUSION_ROOT, ROOT, SWINT_DET, SYNTHETIC_CPU, needs_bevfusion, run_tool, use_bevfusion
from torch import nn

from bevfusion_ext.compression import atomic_save
from bevfusion_ext.compression.quantization import QuantSpec, calibrate, quantize_model
from bevfusion_ext.export import calib_tag
from bevfusion_ext.export.parity import TOLERANCES, StableSorts, check_part, compare, run_onnx
from bevfusion_ext.export.parts import (
    BEVFUSION_TRANSFUSION,
    PARTS,
    TENSORRT_TOPK_MAX_K,
    capture,
    export_onnx,
    first_sample,
    kernel_contracts,
    part_for,
    unavailable_reason,
)
from bevfusion_ext.export.pipeline import export_part

pytestmark = [
    needs_bevfusion,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
TAG = calib_tag("10.3")
OVERLAY = ["--recipe", str(ROOT / SYNTHETIC_CPU)]
SEG = "configs/nuscenes/seg/fusion-bev256d2-lss.yaml"
EXPORTED = ("camera.backbone", "camera.vtransform", "fuser", "head.object")  # the det model's ONNX parts
SPEC = QuantSpec()  # the default layers, TransFusion's out_proj included (it runs as a module once quantized)
GRID_QUANTIZER = "heads.object.decoder.0.cross_posembed.position_embedding_head.0.input_quantizer"


def fresh_batchnorm_statistics(model: nn.Module, forward: Callable[[], object]) -> nn.Module:
    """BN running statistics of one training-mode `forward` (a freshly built BEVFusion's decoder outputs ~1e-5, whose
    flat heatmap ties every top-k pick), then eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one forward sets the statistics
    model.train()
    with torch.no_grad():
        forward()
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


@pytest.fixture(scope="module")
def real() -> tuple[nn.Module, dict]:
    """BEVFusion's Swin-T camera+lidar det model at the synthetic CPU resolution, with real BN statistics."""
    use_bevfusion()
    from bevfusion_ext.runner.builder import build_dataset, build_model, example_batch
    from bevfusion_ext.runner.train import prepare_config

    cfg, sources = prepare_config(str(BEVFUSION_ROOT / SWINT_DET), OVERLAY)
    np.random.seed(0)  # BEVFusion's augmentations draw from np.random: one batch, so one model, per run
    batch = example_batch(build_dataset(cfg.data.train, "data.train", sources))
    torch.manual_seed(0)
    model = build_model(cfg, sources)
    return fresh_batchnorm_statistics(model, lambda: model(**copy.deepcopy(batch))), batch


@pytest.fixture(scope="module")
def quantized(real: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, dict[str, dict]]:
    """A quantized, calibrated copy and every ONNX part of it exported in all flavours."""
    model, batch = real
    model = quantize_model(copy.deepcopy(model), SPEC)
    calibrate(model, SPEC, [batch], lambda m, b: m(**copy.deepcopy(b)))
    acts = capture(model, first_sample(batch))
    root = tmp_path_factory.mktemp("real-parts")
    return model, root, {name: export_part(model, part_for(model, name), acts, root, TAG, 0) for name in EXPORTED}


def test_the_det_model_has_every_part_but_the_sparse_encoder_and_the_map_head(real: tuple) -> None:
    model, _ = real
    reasons = {name: unavailable_reason(model, part_for(model, name)) for name in PARTS}
    assert [name for name, why in reasons.items() if why is None] == list(EXPORTED)
    assert "libspconv" in reasons["lidar.backbone"] and "lidar.sparse_encoder" in reasons["lidar.backbone"]
    assert reasons["head.map"] == "the model has no heads.map"
    assert part_for(model, "head.object").upstream == BEVFUSION_TRANSFUSION


def test_sparse_encoder_contract_feeds_the_fuser(real: tuple) -> None:
    model, batch = real
    acts = capture(model, first_sample(batch))
    kernels = {k["name"]: k for k in kernel_contracts(model, acts)}
    encoder = kernels["lidar.sparse_encoder"]
    assert "libspconv" in encoder["runs_as"]
    assert [(t["name"], t["dtype"]) for t in encoder["inputs"]] == [("voxels", "float32"), ("voxel_coords", "int32")]
    lidar_bev = acts["fuser"][0][0][1]  # ConvFuser([camera_bev, lidar_bev])
    assert encoder["outputs"] == [{"name": "lidar_bev", "shape": list(lidar_bev.shape), "dtype": "float32"}]
    decode = kernels["head.object.decode"]
    assert [t["name"] for t in decode["inputs"]][-2:] == ["query_heatmap_score", "query_labels"]


@pytest.mark.parametrize("name", EXPORTED)
def test_quantized_real_part_passes_parity_in_every_flavour(name: str, quantized: tuple) -> None:
    model, root, entries = quantized
    entry = entries[name]
    assert {f: p["passed"] for f, p in entry["parity"].items()} == {"fp32": True, "qdq": True, "noqdq": True}, {
        f: {o: r for o, r in p["outputs"].items() if not r["passed"]} for f, p in entry["parity"].items()}
    assert entry["fidelity_max_abs"] <= 1e-5  # the part reproduces the whole model's own tensors
    counts = entry["qdq_nodes"]
    assert counts["QuantizeLinear"] == counts["DequantizeLinear"] > 0
    qdq = onnx.load(str(root / entry["files"]["qdq"]))
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) == counts["QuantizeLinear"]
    assert entry["parity"]["noqdq"]["weight_rounding_flips"] >= 0
    assert [n["name"] for n in entry["placement"]["nodes"]]  # every layer got a DLA / GPU verdict


def test_transfusion_proposals_are_one_bounded_topk_and_pools_are_batched(real: tuple, quantized: tuple) -> None:
    model, root, entries = quantized
    for flavour in ("onnx", "qdq", "noqdq"):
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(root / entries["head.object"]["files"][flavour])))
        topks = [n for n in graph.graph.node if n.op_type == "TopK"]
        assert len(topks) == 1, flavour
        k = onnx.numpy_helper.to_array(next(i for i in graph.graph.initializer if i.name == topks[0].input[1]))
        assert int(k[0]) == model.heads["object"].num_proposals <= TENSORRT_TOPK_MAX_K
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.graph.value_info}
        pools = [n for n in graph.graph.node if n.op_type == "MaxPool"]
        assert len(pools) == 3 and all(ranks[n.input[0]] == 4 for n in pools), flavour  # NMS + classes 8 and 9


def test_transfusion_reference_takes_onnxruntime_picks_only_where_tied(real: tuple) -> None:
    """Two tied picks swapped (the order runtimes may give a near-tie) swap those two queries' outputs and nothing else;
    a swap of untied picks is refused, so a wrong top-k still shows as mismatched `query_proposals`."""
    model, batch = real
    part = part_for(model, "head.object")
    module, examples = part.build(model).eval(), part.inputs(model, capture(model, first_sample(batch)))
    [bev] = examples.values()
    head = model.heads["object"]
    P, layers = head.num_proposals, head.num_decoder_layers

    def outputs(*imposed: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return dict(zip(part.outputs, module.aligned(bev, *imposed), strict=True))

    own = outputs()
    first, second = own["query_proposals"][0, :2]
    tied = own["dense_heatmap"].flatten().clone()
    tied[second] = tied[first]  # the second pick's logit up to the first's: a tie, still a local maximum
    tied = tied.view_as(own["dense_heatmap"])
    ref = outputs(tied)
    picks = ref["query_proposals"].clone()
    picks[:, [0, 1]] = picks[:, [1, 0]]
    swapped = outputs(tied, picks)
    order = torch.arange(P)
    order[[0, 1]] = order[[1, 0]]
    cells = tied[0, 0].numel()
    assert torch.equal(swapped["query_proposals"], picks) and torch.equal(swapped["query_labels"], picks // cells)
    torch.testing.assert_close(swapped["query_heatmap_score"], ref["query_heatmap_score"][..., order])
    per_layer = torch.cat([order + i * P for i in range(layers)])
    for name in ("center", "height", "dim", "rot", "vel", "heatmap"):
        torch.testing.assert_close(swapped[name], ref[name][..., per_layer], msg=name)

    untied = own["query_proposals"].clone()
    untied[:, [0, P - 1]] = untied[:, [P - 1, 0]]
    scores = own["dense_heatmap"].flatten().sigmoid()
    assert scores[untied[0, 0]] < scores[untied[0, P - 1]] - 1e-3
    assert torch.equal(outputs(own["dense_heatmap"], untied)["query_proposals"], own["query_proposals"])


def test_noqdq_keeps_the_quantized_bev_grid_and_would_drift_without_it(quantized: tuple, real: tuple) -> None:
    """The cause of the full-size head.object [noqdq] drift: the Q/DQ graph folds the quantization of the constant
    BEV-grid coordinates (cross-attention position embedding input) into a constant, which the Q/DQ-free graph keeps."""
    model, root, entries = quantized
    entry = entries["head.object"]
    assert entry["noqdq_constant_quantizers"] == [GRID_QUANTIZER]
    part, (_, batch) = part_for(model, "head.object"), real
    module, examples = part.build(model).eval(), part.inputs(model, capture(model, first_sample(batch)))
    path = root / entry["files"]["noqdq"]
    kept = check_part(model, part, module, path, examples, "noqdq", 0, [GRID_QUANTIZER], path)
    dropped = check_part(model, part, module, path, examples, "noqdq", 0, (), path)
    worst = [max(r["max_abs"] for o, r in c["outputs"].items() if o.startswith("center")) for c in (kept, dropped)]
    assert kept["passed"] and worst[1] > 10 * worst[0], worst


class Unbatched(nn.Module):
    """F.max_pool2d on a (C, H, W) slice, as BEVFusion's TransFusionHead pools its pedestrian heatmap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.max_pool2d(x[:, 1], kernel_size=3, stride=1, padding=1).unsqueeze(1)


class SortedCut(nn.Module):
    """BEVFusion's proposal pick: a full descending argsort cut to its first k."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        top = x.flatten(1).argsort(dim=-1, descending=True)[..., :7]
        return top, x.flatten(1).gather(1, top)


def test_unbatched_max_pool_exports_with_a_batch_axis(tmp_path: Path) -> None:
    x = {"x": torch.randn(1, 3, 6, 5)}
    raw = tmp_path / "raw.onnx"
    torch.onnx.export(Unbatched(), tuple(x.values()), str(raw), opset_version=17, dynamo=False, input_names=["x"])
    with pytest.raises(Exception, match="dilations has incorrect size"):  # the exporter's own graph (pytorch#127875)
        ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"])
    export_onnx(Unbatched(), x, ("y",), tmp_path / "fixed.onnx")
    result = compare(Unbatched()(**x), run_onnx(tmp_path / "fixed.onnx", x)["y"], TOLERANCES["fp32"])
    assert result["passed"] and result["max_abs"] == 0.0, result


def test_sorted_cut_becomes_topk_of_k(tmp_path: Path) -> None:
    x = {"x": torch.randperm(5000).float().view(1, 2, 50, 50)}  # distinct values: one right answer
    graph = export_onnx(SortedCut(), x, ("index", "score"), tmp_path / "topk.onnx")
    [topk] = [n for n in graph.graph.node if n.op_type == "TopK"]
    assert not [n for n in graph.graph.node if n.op_type == "Slice"]
    k = next(i for i in graph.graph.initializer if i.name == topk.input[1])
    assert onnx.numpy_helper.to_array(k).tolist() == [7]
    onnx.checker.check_model(graph, full_check=True)
    out = run_onnx(tmp_path / "topk.onnx", x)
    index, score = SortedCut()(**x)
    assert np.array_equal(out["index"], index.numpy()) and np.array_equal(out["score"], score.numpy())


def test_reference_sorts_break_ties_like_onnx_topk(tmp_path: Path) -> None:
    x = {"x": (torch.arange(5000) % 3).float().view(1, 2, 50, 50)}  # every value 1666-fold: the order is the ties'
    export_onnx(SortedCut(), x, ("index", "score"), tmp_path / "topk.onnx")
    out = run_onnx(tmp_path / "topk.onnx", x)
    with StableSorts():
        index, _ = SortedCut()(**x)
    assert np.array_equal(out["index"], index.numpy())  # the lowest indices of the largest value, in order


@pytest.fixture(scope="module")
def segmentation_head() -> tuple[nn.Module, list[torch.Tensor]]:
    """BEVFusion's BEVSegmentationHead of its fusion seg config (overlay map classes), built alone: that config's
    full forward fails inside BEVFusion (LSSTransform.forward takes no img_metas), so it is fed BEV maps directly."""
    use_bevfusion()
    from mmdet3d.models import build_head

    from bevfusion_ext.runner.train import prepare_config

    cfg, _ = prepare_config(str(BEVFUSION_ROOT / SEG), [*OVERLAY, "--model.heads.object", "None"])
    head_cfg = copy.deepcopy(cfg.model.heads.map)
    head_cfg.grid_transform.output_scope = [[-50, 50, 2.0], [-50, 50, 2.0]]  # 50 x 50 map cells (BEVFusion: 200 x 200)
    holder = nn.Module()
    holder.heads = nn.ModuleDict({"map": build_head(head_cfg)})
    g = torch.Generator().manual_seed(0)
    head = holder.heads["map"]
    bevs = [torch.randn(1, head.in_channels, 40, 40, generator=g).relu() for _ in range(2)]
    return fresh_batchnorm_statistics(holder, lambda: head.classifier(head.transform(torch.cat(bevs)))), bevs


def test_segmentation_head_exports_in_every_flavour(segmentation_head: tuple, tmp_path: Path) -> None:
    holder, bevs = segmentation_head
    part = part_for(holder, "head.map")
    assert part.outputs == ("masks_bev",) and part is not PARTS["head.map"]

    def acts(model: nn.Module) -> dict:
        with torch.no_grad():
            return {"heads.map": (([bevs[0]],), model.heads["map"]([bevs[0]]))}  # BEVFusion calls head(x_list)

    dense = export_part(holder, part, acts(holder), tmp_path / "fp32", TAG, 0)
    assert dense["parity"]["fp32"]["passed"] and dense["outputs"][0]["shape"] == [1, 2, 50, 50]
    spec = QuantSpec()
    model = quantize_model(copy.deepcopy(holder), spec)
    calibrate(model, spec, bevs, lambda m, bev: m.heads["map"](bev))
    entry = export_part(model, part_for(model, "head.map"), acts(model), tmp_path / "int8", TAG, 0)
    assert {f: p["passed"] for f, p in entry["parity"].items()} == {"fp32": True, "qdq": True, "noqdq": True}
    assert entry["qdq_nodes"]["QuantizeLinear"] == 2 * 3  # input + weight of the classifier's three convs
    assert "GridSample" in {n.op_type for n in onnx.load(str(tmp_path / "int8" / entry["files"]["onnx"])).graph.node}


def test_export_cli_on_a_real_checkpoint_lists_every_part(real: tuple, tmp_path: Path) -> None:
    model, _ = real
    checkpoint = tmp_path / "bevfusion.pth"
    atomic_save({"meta": {}, "state_dict": model.state_dict()}, checkpoint)
    out = tmp_path / "deploy"
    proc = run_tool([sys.executable, "tools/export_engine.py", str(BEVFUSION_ROOT / SWINT_DET), str(checkpoint),
                     "--out", str(out), "--allow-dense", "--cpu-ops", *OVERLAY], timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert list(report["parts"]) == list(EXPORTED)
    assert all(p["passed"] for e in report["parts"].values() for p in e["parity"].values())
    assert set(report["skipped_parts"]) == {"lidar.backbone", "head.map"}
    text = (out / "report.md").read_text()
    for name in EXPORTED:
        assert f"| {name} |" in text, name
    assert "- not exported: lidar.backbone (" in text and "libspconv" in text
    assert "### lidar.sparse_encoder (CUDA sparse-conv library" in text and "- not exported: head.map (" in text
    for name in EXPORTED:
        assert (out / "models" / name / f"{name}.onnx").is_file(), name
