"""Reference model: registry, module tree, contract formats, gradients, size, Swin layout, LSS geometry, BEV pool."""
import math
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bevfusion_ext.export.parity import run_onnx
from bevfusion_ext.export.parts import export_onnx
from bevfusion_ext.models import MODELS, BEVFusion, build_model, reference_config
from bevfusion_ext.models.swin import ShiftWindowMSA, WindowMSA
from bevfusion_ext.models.vtransforms import bev_pool, gen_dx_bx

IMAGE_SIZE = (96, 160)
NUM_CAMERAS = 4


def camera_rig(n: int = NUM_CAMERAS, image_size: tuple[int, int] = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Cameras at (0, 0, 1.6) yawed CCW from +x, 100 deg horizontal FOV: intrinsics and camera2lidar [n, 4, 4]."""
    h, w = image_size
    f = (w / 2) / math.tan(math.radians(50))
    intrinsics = torch.eye(4).repeat(n, 1, 1)
    intrinsics[:, 0, 0] = intrinsics[:, 1, 1] = f
    intrinsics[:, 0, 2], intrinsics[:, 1, 2] = (w - 1) / 2, (h - 1) / 2
    camera2lidar = torch.eye(4).repeat(n, 1, 1)
    for i in range(n):
        c, s = math.cos(2 * math.pi * i / n), math.sin(2 * math.pi * i / n)
        camera2lidar[i, :3, :3] = torch.tensor([[s, 0.0, c], [-c, 0.0, s], [0.0, -1.0, 0.0]])
        camera2lidar[i, 2, 3] = 1.6
    return intrinsics, camera2lidar


def random_batch(batch_size: int = 2, seed: int = 0) -> dict:
    """A contract-shaped batch of random images, points, boxes and masks (stand-in until the dataset is used)."""
    g = torch.Generator().manual_seed(seed)
    intrinsics, camera2lidar = camera_rig()
    points, boxes, labels = [], [], []
    for _ in range(batch_size):
        num = 2000
        xy = torch.rand(num, 2, generator=g) * 51.2 - 25.6
        points.append(torch.cat([xy, torch.rand(num, 1, generator=g) * 3 - 0.5, torch.rand(num, 1, generator=g)], 1))
        m = 5
        centre = torch.rand(m, 2, generator=g) * 40 - 20
        size = torch.tensor([[4.5, 1.9, 1.6], [0.7, 0.7, 1.75], [0.5, 2.5, 1.0]])[torch.arange(m) % 3]
        yaw = torch.rand(m, 1, generator=g) * 2 * math.pi - math.pi
        boxes.append(torch.cat([centre, size[:, 2:] / 2, size, yaw], 1))
        labels.append(torch.arange(m) % 3)
    return dict(
        img=torch.randn(batch_size, NUM_CAMERAS, 3, *IMAGE_SIZE, generator=g),
        camera_intrinsics=intrinsics.expand(batch_size, -1, -1, -1).clone(),
        camera2lidar=camera2lidar.expand(batch_size, -1, -1, -1).clone(),
        points=points, gt_bboxes_3d=boxes, gt_labels_3d=labels,
        gt_masks_bev=(torch.rand(batch_size, 2, 64, 64, generator=g) > 0.5).float(),
        metas=[{"index": i} for i in range(batch_size)],
    )


def trainable(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def tiny() -> BEVFusion:
    torch.manual_seed(0)
    return build_model(reference_config("tiny"))


@pytest.mark.parametrize("size", ["tiny", "full"])
def test_both_sizes_build_from_the_registry(size: str) -> None:
    cfg = reference_config(size)
    model = MODELS.build(cfg)
    assert isinstance(model, BEVFusion) and cfg == reference_config(size), "building must not mutate the config"
    assert type(model.encoders.camera.backbone).__name__ == "SwinTransformer"
    assert [type(m).__name__ for m in (model.encoders.camera.neck, model.encoders.camera.vtransform, model.fuser,
                                       model.decoder.backbone, model.decoder.neck, model.heads.object,
                                       model.heads.map)] == [
        "GeneralizedLSSFPN", "DepthLSSTransform", "ConvFuser", "SECOND", "SECONDFPN", "TransFusionHead",
        "BEVSegmentationHead"]


def test_reference_config_rejects_unknown_knobs() -> None:
    with pytest.raises(KeyError, match="unknown reference_config knobs"):
        reference_config("tiny", image_sise=(1, 2))


def test_module_tree_matches_bevfusion(tiny: BEVFusion) -> None:
    assert set(tiny.encoders) == {"camera", "lidar"} and set(tiny.heads) == {"object", "map"}
    assert set(tiny.encoders.camera) == {"backbone", "neck", "vtransform"}
    assert set(tiny.encoders.lidar) == {"voxelize", "backbone"}
    assert sum(1 for _ in tiny.encoders.lidar.voxelize.parameters()) == 0
    assert set(tiny.decoder) == {"backbone", "neck"}
    vtransform = tiny.encoders.camera.vtransform
    assert not vtransform.frustum.requires_grad and vtransform.nx.dtype == torch.long  # BEVFusion's frozen params
    tiny.init_weights()  # tools/train.py calls it; mmcv's generic BaseModule.init_weights would fail on nx
    det_only = build_model(reference_config("tiny", map_classes=()))
    assert set(det_only.heads) == {"object"}


def test_prediction_format_follows_the_contract(tiny: BEVFusion) -> None:
    tiny.eval()
    with torch.no_grad():
        results = tiny(return_loss=False, **random_batch())
    assert len(results) == 2
    for res in results:
        k = len(res["boxes_3d"])
        assert res["boxes_3d"].shape == (k, 7) and res["scores_3d"].shape == (k,) and 0 < k <= 32
        assert res["labels_3d"].dtype == torch.int64 and int(res["labels_3d"].max()) < 3
        assert torch.all(res["scores_3d"][:-1] >= res["scores_3d"][1:])
        assert res["masks_bev"].shape == (2, 64, 64)
        assert 0 <= float(res["masks_bev"].min()) and float(res["masks_bev"].max()) <= 1


def test_train_step_gives_finite_losses_and_a_gradient_on_every_parameter(tiny: BEVFusion) -> None:
    tiny.train()
    tiny.zero_grad(set_to_none=True)
    out = tiny.train_step(random_batch(), optimizer=None)
    assert out["num_samples"] == 2 and torch.isfinite(out["loss"])
    assert all(name.startswith("loss") and math.isfinite(value) for name, value in out["log_vars"].items())
    assert {"loss/object/loss_heatmap", "loss/object/layer_-1_loss_cls", "loss/object/layer_-1_loss_bbox",
            "loss/map/drivable_area/focal", "loss/map/walkway/focal"} <= set(out["log_vars"])
    out["loss"].backward()
    missing = [name for name, p in tiny.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_tiny_is_small_and_a_one_thread_training_step_is_fast(tiny: BEVFusion) -> None:
    assert trainable(tiny) < 1_000_000
    batch = random_batch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tiny.train()
        times = []
        for _ in range(4):
            start = time.perf_counter()
            tiny.train_step(batch)["loss"].backward()
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert statistics.median(times[1:]) < 1.0, times


def test_full_det_only_parameter_count_is_near_bevfusion_swin_t() -> None:
    model = build_model(reference_config("full", map_classes=()))
    assert abs(trainable(model) / 40.8e6 - 1) < 0.2, trainable(model)


def test_window_msa_uses_one_fused_qkv_and_a_relative_position_bias_table() -> None:
    swin = build_model(reference_config("full")["encoders"]["camera"]["backbone"])
    msa = swin.stages[2].blocks[1].attn.w_msa
    assert isinstance(msa, WindowMSA) and swin.stages[2].blocks[1].attn.shift_size == 3
    assert msa.qkv.weight.shape == (3 * 384, 384) and msa.qkv.bias.shape == (3 * 384,)
    assert msa.relative_position_bias_table.shape == (13 * 13, 12)
    assert msa.relative_position_index.shape == (49, 49) and int(msa.relative_position_index.max()) == 13 * 13 - 1
    assert swin.stages[0].downsample.reduction.weight.shape == (192, 4 * 96)
    outs = swin(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 8, 12), (1, 384, 4, 6), (1, 768, 2, 3)]


BOUNDS = ([-2.0, 2.0, 1.0], [-1.0, 2.0, 1.0], [-1.0, 1.0, 2.0])


def naive_bev_pool(geom: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Python-loop reference of bev_pool for BOUNDS."""
    (x0, _, dx), (y0, _, dy), (z0, _, dz) = BOUNDS
    B, C = x.shape[0], x.shape[-1]
    out = torch.zeros(B, C, 3, 4)
    for idx in np.ndindex(*x.shape[:-1]):
        px, py, pz = geom[idx].tolist()
        col, row, level = math.floor((px - x0) / dx), math.floor((py - y0) / dy), math.floor((pz - z0) / dz)
        if 0 <= col < 4 and 0 <= row < 3 and level == 0:
            out[idx[0], :, row, col] += x[idx]
    return out


def random_frustum(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometry reaching past the BEV grid on every side (with repeated cells) and features, [2, 2, 3, 2, 3, .]."""
    g = torch.Generator().manual_seed(seed)
    geom = torch.rand(2, 2, 3, 2, 3, 3, generator=g) * torch.tensor([6.0, 5.0, 3.0]) - torch.tensor([3.0, 2.0, 1.5])
    return geom, torch.randn(2, 2, 3, 2, 3, 5, generator=g)


def mmdet_region_ids(Hp: int, Wp: int, ws: int, shift: int) -> torch.Tensor:
    """mmdet's ShiftWindowMSA mask regions, written as it does: in-place writes over three slices per axis."""
    region = torch.zeros(Hp, Wp)
    spans = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in spans for w in spans):
        region[h, w] = i
    return region


@pytest.mark.parametrize(("Hp", "Wp"), [(7, 7), (7, 14), (14, 21)])
def test_shifted_window_mask_equals_mmdet_regions(Hp: int, Wp: int) -> None:
    msa = ShiftWindowMSA(32, 2, 7, 3)
    ids = msa.window_partition(mmdet_region_ids(Hp, Wp, 7, 3)[None, :, :, None]).squeeze(-1)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    assert torch.equal(msa.attention_mask(Hp, Wp, torch.device("cpu")), diff.masked_fill(diff != 0, -100.0))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:Constant folding:UserWarning")
@pytest.mark.parametrize("hw", [(3, 5), (7, 7), (9, 16)])
def test_shifted_window_attention_exports_and_matches_onnxruntime(hw: tuple[int, int], tmp_path) -> None:
    """A padded grid of exactly one window once exported an empty ScatterND that onnxruntime rejects."""
    class OnGrid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.msa = ShiftWindowMSA(32, 2, 7, 3)

        def forward(self, query: torch.Tensor) -> torch.Tensor:
            return self.msa(query, hw)

    module = OnGrid().eval()
    query = torch.randn(1, hw[0] * hw[1], 32, generator=torch.Generator().manual_seed(0))
    export_onnx(module, {"query": query}, ("out",), tmp_path / "msa.onnx")
    (out,) = run_onnx(tmp_path / "msa.onnx", {"query": query}).values()
    with torch.no_grad():
        np.testing.assert_allclose(out, module(query).numpy(), rtol=1e-4, atol=1e-5)


def test_bev_pool_scatter_add_matches_a_python_loop() -> None:
    geom, x = random_frustum(0)
    pooled = bev_pool(geom, x, *gen_dx_bx(*BOUNDS))
    assert pooled.shape == (2, 5, 3, 4)
    torch.testing.assert_close(pooled, naive_bev_pool(geom, x))


class BEVPoolModule(nn.Module):
    """bev_pool with its grid as buffers, for export."""

    def __init__(self) -> None:
        super().__init__()
        for name, value in zip(("dx", "bx", "nx"), gen_dx_bx(*BOUNDS), strict=True):
            self.register_buffer(name, value)

    def forward(self, geom: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return bev_pool(geom, x, self.dx, self.bx, self.nx)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_bev_pool_exports_to_onnx_scatter_elements_and_matches_onnxruntime(tmp_path) -> None:
    geom, x = random_frustum(1)
    path = str(tmp_path / "bev_pool.onnx")
    torch.onnx.export(BEVPoolModule(), (geom, x), path, opset_version=17, dynamo=False,
                      input_names=["geom", "x"], output_names=["bev"])
    scatters = [n for n in onnx.load(path).graph.node if n.op_type == "ScatterElements"]
    assert len(scatters) == 1 and any(a.name == "reduction" and a.s == b"add" for a in scatters[0].attribute)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (bev,) = session.run(None, {"geom": geom.numpy(), "x": x.numpy()})
    np.testing.assert_allclose(bev, BEVPoolModule()(geom, x).numpy(), rtol=1e-5, atol=1e-5)


def test_lss_frustum_point_lands_in_the_expected_bev_cell(tiny: BEVFusion) -> None:
    vt = tiny.encoders.camera.vtransform
    intrinsics, camera2lidar = camera_rig()
    geom = vt.get_geometry(camera2lidar[None], intrinsics[None])
    d, i, j = 9, 4, 13  # depth bin, feature row, feature column of camera 0 (looking along +x)
    u, v, depth = vt.frustum[d, i, j].tolist()
    f, cx, cy = intrinsics[0, 0, 0].item(), intrinsics[0, 0, 2].item(), intrinsics[0, 1, 2].item()
    expected = torch.tensor([depth, -(u - cx) * depth / f, 1.6 - (v - cy) * depth / f])
    torch.testing.assert_close(geom[0, 0, d, i, j], expected)
    x = torch.zeros(*geom.shape[:-1], 1)
    x[0, 0, d, i, j] = 1.0
    bev = bev_pool(geom, x, vt.dx, vt.bx, vt.nx)
    row, col = math.floor((expected[1] + 25.6) / 0.4), math.floor((expected[0] + 25.6) / 0.4)
    assert bev.shape == (1, 1, 128, 128) and bev[0, 0, row, col] == 1.0 and bev.sum() == 1.0


def test_lidar_depth_image_puts_a_point_at_its_pixel(tiny: BEVFusion) -> None:
    vt = tiny.encoders.camera.vtransform
    intrinsics, camera2lidar = camera_rig()
    point = torch.tensor([[10.0, 2.0, 1.0, 0.5], [10.5, 2.0, 1.0, 0.5]])  # the nearer one wins the pixel
    depth = vt.depth_image([point], intrinsics[None], camera2lidar[None])
    f, cx, cy = intrinsics[0, 0, 0].item(), intrinsics[0, 0, 2].item(), intrinsics[0, 1, 2].item()
    u, v = math.floor(-2.0 * f / 10.0 + cx), math.floor((1.6 - 1.0) * f / 10.0 + cy)
    assert depth.shape == (1, NUM_CAMERAS, 1, *IMAGE_SIZE) and depth[0, 0, 0, v, u] == 10.0
    assert int((depth > 0).sum()) == 1


def test_box_coding_round_trips_and_heatmap_peaks_at_the_box_cell(tiny: BEVFusion) -> None:
    head = tiny.heads.object
    boxes = torch.tensor([[5.3, -3.1, 0.8, 4.5, 1.9, 1.6, 2.5], [-20.0, 11.0, 0.5, 0.5, 2.5, 1.0, -0.7]])
    code = head.bbox_coder.encode(boxes).T.unsqueeze(0)
    preds = dict(center=code[:, :2], height=code[:, 2:3], dim=code[:, 3:6], rot=code[:, 6:8])
    torch.testing.assert_close(head.bbox_coder.decode(preds)[0], boxes)
    target = head.heatmap_target(boxes, torch.tensor([0, 2]), (64, 64))
    assert target[0, math.floor((-3.1 + 25.6) / 0.8), math.floor((5.3 + 25.6) / 0.8)] == 1.0
    assert target[2, math.floor((11.0 + 25.6) / 0.8), math.floor((-20.0 + 25.6) / 0.8)] == 1.0
    assert int(target.eq(1).sum()) == 2 and target[1].sum() == 0
