"""CPU stand-ins of BEVFusion's compiled ops (bevfusion_ext.ops) against slow, plain references.

Every stand-in is driven through BEVFusion's own Python layer (the snapshot at $BEVFUSION_ROOT) after
install_cpu_ops(), and compared with loops over small random inputs or with dense torch ops. The largest error of
each comparison is collected in ERRORS and printed when the module finishes (run with -s to see it).
"""

import itertools
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shapely.geometry import Polygon

from bevfusion_ext.ops import CPUOpUnavailable, install_cpu_ops

SNAPSHOT = Path(__file__).resolve().parents[2] / "shared/third_party/bevfusion"
BEVFUSION_ROOT = Path(os.environ.get("BEVFUSION_ROOT", SNAPSHOT))
if not (BEVFUSION_ROOT / "mmdet3d").is_dir():
    pytest.skip(f"no BEVFusion snapshot at {BEVFUSION_ROOT} (set BEVFUSION_ROOT)", allow_module_level=True)

# BEVFusion's SparseConvTensor.dense() indexes with a list (structure.py:17); torch warns but still supports it
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")
ERRORS: dict[str, float] = {}  # check -> max |stand-in - reference| (seconds for timings)
STAND_INS = {
    "mmdet3d.ops.bev_pool.bev_pool_ext": "bev_pool_ext",
    "mmdet3d.ops.voxel.voxel_layer": "voxel_layer",
    "mmdet3d.ops.spconv.sparse_conv_ext": "sparse_conv_ext",
    "mmdet3d.ops.iou3d.iou3d_cuda": "iou3d_cuda",
}


@pytest.fixture(scope="module", autouse=True)
def bevfusion():
    """The snapshot on sys.path, the stand-ins installed, then mmdet3d imported; prints the error table at the end."""
    if str(BEVFUSION_ROOT) not in sys.path:
        sys.path.insert(0, str(BEVFUSION_ROOT))
    status = install_cpu_ops()
    compiled = [name for name in STAND_INS if status[name] != "cpu"]
    if compiled:
        pytest.skip(f"these tests cover the CPU stand-ins, but BEVFusion's compiled {', '.join(compiled)} are in use")
    import mmdet3d.ops  # noqa: F401  (fails here, not mid-test, if the snapshot cannot be imported)

    yield
    print("\nmax |stand-in - reference| per check (timings: seconds):")
    for name, value in sorted(ERRORS.items()):
        print(f"  {name:45s} {value:.3g}")


@pytest.fixture(autouse=True)
def seeded():
    """Layer weights come from torch's global generator: fix it so every run checks (and reports) the same numbers."""
    torch.manual_seed(0)


@pytest.fixture
def cuda_is_cpu(monkeypatch):
    """BEVFusion's iou3d callers move tensors with .cuda() (base_box3d.overlaps, iou3d_utils.nms_*): keep them here."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)


def record(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """Assert |actual - expected| <= atol everywhere and keep the largest error seen under `name`."""
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    error = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    ERRORS[name] = max(ERRORS.get(name, 0.0), error)
    assert error <= atol, f"{name}: max error {error} > {atol}"


def test_stand_ins_expose_every_name_bevfusion_calls():
    text = "\n".join(p.read_text() for p in (BEVFUSION_ROOT / "mmdet3d").rglob("*.py"))
    for module, short in STAND_INS.items():
        called = set(re.findall(rf"\b{short}\.(\w+)", text))
        for imported in re.findall(rf"from \.{short} import ([\w, ]+)", text):
            called |= {name.strip() for name in imported.split(",")}
        assert called, short
        assert called <= set(sys.modules[module].__all__), called - set(sys.modules[module].__all__)


# ---------------------------------------------------------------- voxelization
RANGE = [-2.0, -1.5, -1.0, 2.0, 1.5, 1.4]
VOXEL = [0.5, 0.5, 0.8]  # grid (8, 6, 3): unequal axes catch a swapped coordinate order


def random_points(n: int, seed: int) -> torch.Tensor:
    """Points a bit beyond RANGE (some fall outside), a quarter of them exactly on voxel boundaries."""
    g = torch.Generator().manual_seed(seed)
    low, high = torch.tensor(RANGE[:3]) - 0.3, torch.tensor(RANGE[3:]) + 0.3
    xyz = low + torch.rand(n, 3, generator=g) * (high - low)
    edge = torch.tensor(RANGE[:3]) + torch.tensor(VOXEL) * torch.randint(-1, 9, (n // 4, 3), generator=g)
    xyz[: n // 4] = edge.float()
    return torch.cat([xyz, torch.randn(n, 2, generator=g)], 1)


def reference_coords(point: np.ndarray) -> tuple[int, list[int]]:
    """(first failing axis or 3, per-axis voxel index) in float32 as the kernel computes it."""
    low, size = np.float32(RANGE[:3]), np.float32(VOXEL)
    grid = [int(math.floor(float((np.float32(RANGE[3 + i]) - low[i]) / size[i]) + 0.5)) for i in range(3)]
    coords = [int(np.floor((np.float32(point[i]) - low[i]) / size[i])) for i in range(3)]
    bad = [i for i in range(3) if not 0 <= coords[i] < grid[i]]
    return (bad[0] if bad else 3), coords


def reference_hard_voxelize(points: torch.Tensor, max_points: int, max_voxels: int) -> dict:
    """Loop over points in order: a voxel is created by its first point while fewer than max_voxels exist."""
    voxels: dict[tuple, list] = {}
    for point in points.numpy():
        bad, coords = reference_coords(point)
        if bad < 3 or (tuple(coords) not in voxels and len(voxels) >= max_voxels):
            continue
        members = voxels.setdefault(tuple(coords), [])
        if len(members) < max_points:
            members.append(point)
    return voxels


@pytest.mark.parametrize("deterministic", [True, False])
def test_hard_voxelization_matches_the_loop(deterministic):
    from mmdet3d.ops import Voxelization

    points = random_points(600, seed=0)
    layer = Voxelization(VOXEL, RANGE, max_num_points=3, max_voxels=(30, 1000), deterministic=deterministic)
    for training, max_voxels in ((True, 30), (False, 1000)):
        voxels, coors, counts = layer.train(training)(points)
        expected = reference_hard_voxelize(points, 3, max_voxels)
        assert len(coors) == len(expected) == (30 if training else len(expected))
        assert coors.tolist() == [list(key) for key in expected]  # (x, y, z), first-come order
        assert counts.tolist() == [len(members) for members in expected.values()]
        for voxel, count, members in zip(voxels, counts, expected.values(), strict=True):
            record("voxel_layer.hard_voxelize", voxel[:count], torch.tensor(np.stack(members)), 0.0)
            assert not voxel[count:].any()


def test_hard_voxelization_documented_limits():
    from mmdet3d.ops import voxelization

    inside = torch.tensor([[0.1, 0.1, 0.1, float(i)] for i in range(5)])  # 5 points in voxel (4, 3, 1)
    points = torch.cat([torch.tensor([[9.0, 0, 0, -1], [-1.9, 1.4, 1.3, -2]]), inside])  # out of range, then (0, 5, 2)
    voxels, coors, counts = voxelization(points, VOXEL, RANGE, 3, 2, True)
    assert coors.tolist() == [[0, 5, 2], [4, 3, 1]] and counts.tolist() == [1, 3]
    assert voxels[1, :, 3].tolist() == [0.0, 1.0, 2.0]  # the first max_points points, in input order
    _, coors, _ = voxelization(points, VOXEL, RANGE, 3, 1, True)
    assert coors.tolist() == [[0, 5, 2]]  # max_voxels keeps the voxels that appeared first


def test_dynamic_voxelization_matches_the_loop():
    from mmdet3d.ops import voxelization

    points = random_points(400, seed=1)
    coors = voxelization(points, VOXEL, RANGE, -1)
    expected = []
    for point in points.numpy():
        bad, coords = reference_coords(point)
        expected.append(coords if bad == 3 else [-1] * (bad + 1) + [0] * (2 - bad))  # the kernel stops at bad axis
    record("voxel_layer.dynamic_voxelize", coors, torch.tensor(expected, dtype=torch.int32), 0.0)


@pytest.mark.parametrize("reduce", ["max", "mean", "sum"])
def test_dynamic_scatter_matches_the_loop(reduce):
    from mmdet3d.ops import dynamic_scatter

    g = torch.Generator().manual_seed(2)
    coors = torch.randint(0, 3, (80, 3), generator=g, dtype=torch.int32)
    coors[::9, 1] = -1  # dropped points
    feats = torch.randn(80, 4, generator=g, requires_grad=True)
    out, out_coors = dynamic_scatter(feats, coors, reduce)
    keys = sorted({tuple(c) for c in coors.tolist() if min(c) >= 0})
    members = [[i for i, c in enumerate(coors.tolist()) if tuple(c) == key] for key in keys]
    pool = {"max": lambda x: x.max(0).values, "mean": lambda x: x.mean(0), "sum": lambda x: x.sum(0)}[reduce]
    expected = torch.stack([pool(feats[m]) for m in members])
    assert out_coors.tolist() == [list(k) for k in keys]
    record(f"voxel_layer.dynamic_scatter_{reduce}", out, expected, 1e-6)
    grad = torch.randn(out.shape, generator=g)
    (ours,) = torch.autograd.grad(out, feats, grad)
    (reference,) = torch.autograd.grad(expected, feats, grad)
    record(f"voxel_layer.dynamic_scatter_{reduce}_grad", ours, reference, 1e-6)


# ---------------------------------------------------------------- bev_pool
def test_bev_pool_matches_the_loop():
    from mmdet3d.ops import bev_pool

    g = torch.Generator().manual_seed(3)
    B, D, H, W = 2, 2, 3, 4
    coords = torch.stack([torch.randint(0, n, (300,), generator=g) for n in (H, W, D, B)], 1)
    feats = torch.randn(300, 5, generator=g, requires_grad=True)
    out = bev_pool(feats, coords, B, D, H, W)
    expected = torch.zeros(B, 5, D, H, W, dtype=torch.float64)
    for feat, (x, y, z, b) in zip(feats.double(), coords.tolist(), strict=True):
        expected[b, :, z, x, y] += feat
    record("bev_pool_ext.bev_pool_forward", out, expected, 1e-5)
    grad = torch.randn(out.shape, generator=g)
    (ours,) = torch.autograd.grad(out, feats, grad)
    reference = torch.stack([grad[b, :, z, x, y] for x, y, z, b in coords.tolist()])
    record("bev_pool_ext.bev_pool_backward", ours, reference, 0.0)


def test_bev_pool_intervals_follow_the_kernel():
    ext = sys.modules["mmdet3d.ops.bev_pool.bev_pool_ext"]
    x = torch.arange(24.0).view(8, 3)
    geom = torch.tensor([[0, 1, 0, 0], [2, 2, 1, 1], [0, 0, 0, 0], [1, 3, 1, 0]] * 2, dtype=torch.int32)
    starts, lengths = torch.tensor([0, 3, 6], dtype=torch.int32), torch.tensor([2, 2, 1], dtype=torch.int32)
    out = ext.bev_pool_forward(x, geom, lengths, starts, 2, 2, 3, 4)
    expected = torch.zeros(2, 2, 3, 4, 3)
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        gx, gy, gz, gb = geom[start].tolist()  # an interval goes to the cell of its first point
        expected[gb, gz, gx, gy] = x[start : start + length].sum(0)
    record("bev_pool_ext.bev_pool_forward", out, expected, 0.0)
    grad = ext.bev_pool_backward(torch.ones(2, 2, 3, 4, 3), geom, lengths, starts, 2, 2, 3, 4)
    assert grad[:, 0].tolist() == [1, 1, 0, 1, 1, 0, 1, 0]  # points outside every interval get no gradient


# ---------------------------------------------------------------- sparse convolution
SHAPE = [7, 6, 5]  # unequal axes catch a permuted kernel or grid


def active_sites(per_batch: int, seed: int, shape: list[int] = SHAPE, batch: int = 2) -> torch.Tensor:
    """Distinct random [batch, x, y, z] int32 sites in random order."""
    g = torch.Generator().manual_seed(seed)
    cells = [torch.randperm(math.prod(shape), generator=g)[:per_batch] for _ in range(batch)]
    rows = [torch.stack([torch.full_like(c, b), c // (shape[1] * shape[2]), c // shape[2] % shape[1],
                         c % shape[2]], 1) for b, c in enumerate(cells)]
    sites = torch.cat(rows)
    return sites[torch.randperm(len(sites), generator=g)].int()


def densify(features: torch.Tensor, indices: torch.Tensor, shape: list[int], batch: int = 2) -> torch.Tensor:
    """[B, C, *shape] grid, zero where no site is active."""
    grid = features.new_zeros(batch, *shape, features.shape[1])
    grid = grid.index_put(tuple(indices.long().t()), features)
    return grid.movedim(-1, 1)


def at_sites(grid: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """[N, C] values of a [B, C, *shape] grid at [N, 1 + ndim] sites."""
    b, *xyz = indices.long().t()
    return grid.movedim(1, -1)[(b, *xyz)]


def sparse_input(channels: int, seed: int):
    """A SparseConvTensor of 2 batches with leaf features (requires grad)."""
    from mmdet3d.ops.spconv import SparseConvTensor

    indices = active_sites(60, seed)
    features = torch.randn(len(indices), channels, generator=torch.Generator().manual_seed(seed), requires_grad=True)
    return SparseConvTensor(features, indices, list(SHAPE), 2), features


def check_grads(name: str, out: torch.Tensor, expected: torch.Tensor, leaves: list[torch.Tensor]) -> None:
    """Gradients of <out, g> through the stand-in's backward equal torch autograd of the dense reference."""
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    ours = torch.autograd.grad(out, leaves, grad, retain_graph=True)  # the two may share a sparse prefix
    reference = torch.autograd.grad(expected, leaves, grad)
    for leaf, a, b in zip(("input", "weight"), ours, reference, strict=False):
        record(f"{name}_grad_{leaf}", a, b, 1e-4)


def test_subm_conv_equals_dense_conv_at_active_sites():
    from mmdet3d.ops.spconv import SubMConv3d

    x, features = sparse_input(3, seed=4)
    conv = SubMConv3d(3, 4, 3, indice_key="subm1")
    y = conv(x)
    assert y.indices is x.indices
    dense = F.conv3d(densify(features, x.indices, SHAPE), conv.weight.permute(4, 3, 0, 1, 2), conv.bias, padding=1)
    expected = at_sites(dense, x.indices)
    record("sparse_conv_ext.subm_conv", y.features, expected, 1e-5)
    check_grads("sparse_conv_ext.subm_conv", y.features, expected, [features, conv.weight])
    assert conv(x).features.equal(y.features)  # the indice_key rulebook is reused


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), ((1, 1, 3), (1, 1, 2), 0), (3, 2, (1, 1, 0))],
                         ids=["k3s2p1", "conv_out", "padding110"])
def test_strided_conv_equals_dense_conv_at_active_outputs(kernel, stride, padding):
    from mmdet3d.ops.spconv import SparseConv3d

    x, features = sparse_input(3, seed=5)
    conv = SparseConv3d(3, 4, kernel, stride=stride, padding=padding)
    y = conv(x)
    occupied = F.conv3d(densify(torch.ones(len(x.indices), 1), x.indices, SHAPE),
                        torch.ones(1, 1, *conv.kernel_size), stride=stride, padding=padding)
    assert y.spatial_shape == list(occupied.shape[2:])
    assert y.indices.long().equal(occupied.nonzero()[:, [0, 2, 3, 4]])  # reachable outputs, in linear-index order
    dense = F.conv3d(densify(features, x.indices, SHAPE), conv.weight.permute(4, 3, 0, 1, 2), conv.bias,
                     stride=stride, padding=padding)
    expected = at_sites(dense, y.indices)
    record("sparse_conv_ext.sparse_conv", y.features, expected, 1e-5)
    check_grads("sparse_conv_ext.sparse_conv", y.features, expected, [features, conv.weight])


def test_inverse_conv_equals_dense_transposed_conv_at_input_sites():
    from mmdet3d.ops.spconv import SparseConv3d, SparseInverseConv3d

    x, features = sparse_input(3, seed=6)
    down = SparseConv3d(3, 4, 3, stride=2, padding=1, indice_key="down")
    up = SparseInverseConv3d(4, 2, 3, indice_key="down")
    y = down(x)
    z = up(y)
    assert z.indices is x.indices and z.spatial_shape == SHAPE
    weight = up.weight.permute(3, 4, 0, 1, 2)
    extra = [s - ((d - 1) * 2 - 2 + 3) for s, d in zip(SHAPE, y.spatial_shape, strict=True)]
    dense = F.conv_transpose3d(y.dense(), weight, up.bias, stride=2, padding=1, output_padding=extra)
    expected = at_sites(dense, x.indices)
    record("sparse_conv_ext.inverse_conv", z.features, expected, 1e-5)
    check_grads("sparse_conv_ext.inverse_conv", z.features, expected, [features, up.weight])


def test_transposed_conv_equals_dense_transposed_conv():
    from mmdet3d.ops.spconv import SparseConvTranspose3d

    x, features = sparse_input(3, seed=7)
    conv = SparseConvTranspose3d(3, 2, 3, stride=2, padding=1)
    y = conv(x)
    occupied = F.conv_transpose3d(densify(torch.ones(len(x.indices), 1), x.indices, SHAPE), torch.ones(1, 1, 3, 3, 3),
                                  stride=2, padding=1)
    assert y.indices.long().equal(occupied.nonzero()[:, [0, 2, 3, 4]])
    dense = F.conv_transpose3d(densify(features, x.indices, SHAPE), conv.weight.permute(3, 4, 0, 1, 2), conv.bias,
                               stride=2, padding=1)
    expected = at_sites(dense, y.indices)
    record("sparse_conv_ext.transposed_conv", y.features, expected, 1e-5)
    check_grads("sparse_conv_ext.transposed_conv", y.features, expected, [features, conv.weight])


def test_max_pool_equals_dense_pool_floored_at_zero():
    from mmdet3d.ops.spconv import SparseMaxPool3d

    x, features = sparse_input(3, seed=8)
    y = SparseMaxPool3d(3, 2, 1)(x)
    dense = F.max_pool3d(densify(features, x.indices, SHAPE), 3, 2, 1).clamp(min=0)  # the kernel starts from 0
    expected = at_sites(dense, y.indices)
    record("sparse_conv_ext.maxpool", y.features, expected, 0.0)
    check_grads("sparse_conv_ext.maxpool", y.features, expected, [features])


def reference_rulebook(indices: torch.Tensor, kernel: int, stride: int, padding: int, subm: bool) -> tuple:
    """Loop over inputs and offsets: (sorted output sites, per offset [(input, output site)] in input order)."""
    shape = SHAPE if subm else [(s + 2 * padding - kernel) // stride + 1 for s in SHAPE]
    inputs = [tuple(row) for row in indices.tolist()]
    pairs = {k: [] for k in range(kernel**3)}
    for j, (b, *site) in enumerate(inputs):
        for k, offset in enumerate(itertools.product(range(kernel), repeat=3)):
            reach = [s + padding - o for s, o in zip(site, offset, strict=True)]
            out = tuple(r // stride for r in reach)
            if all(r % stride == 0 for r in reach) and all(0 <= o < n for o, n in zip(out, shape, strict=True)):
                if not subm or (b, *out) in inputs:
                    pairs[k].append((j, (b, *out)))
    outputs = inputs if subm else sorted({site for found in pairs.values() for _, site in found})
    return outputs, pairs


@pytest.mark.parametrize("subm", [True, False], ids=["subm", "strided"])
def test_rulebook_layout_matches_the_loop(subm):
    from mmdet3d.ops.spconv.ops import get_indice_pairs

    indices = active_sites(25, seed=10)
    stride, padding = (1, 1) if subm else (2, 1)
    outids, pairs, counts = get_indice_pairs(indices, 2, SHAPE, 3, stride, padding, 1, 0, subm)
    outputs, expected = reference_rulebook(indices, 3, stride, padding, subm)
    assert [tuple(row) for row in outids.tolist()] == outputs
    assert pairs.dtype == counts.dtype == outids.dtype == torch.int32 and pairs.shape == (27, 2, len(indices))
    position = {site: i for i, site in enumerate(outputs)}
    for k, found in expected.items():
        assert counts[k] == len(found)
        assert pairs[k, 0, : len(found)].tolist() == [j for j, _ in found]
        assert pairs[k, 1, : len(found)].tolist() == [position[site] for _, site in found]
        assert (pairs[k, :, len(found) :] == -1).all()
    grid = torch.zeros(2 * math.prod(SHAPE), dtype=torch.int32)  # the pre-allocated grid variant
    with_grid = get_indice_pairs(indices, 2, SHAPE, 3, stride, padding, 1, 0, subm, grid=grid)
    assert all(a.equal(b) for a, b in zip(with_grid, (outids, pairs, counts), strict=True)) and (grid == -1).all()


def test_fused_and_half_convs_follow_the_bindings():
    from mmdet3d.ops.spconv import ops

    indices = active_sites(40, seed=11)
    features, weight, bias = torch.randn(len(indices), 3), torch.randn(3, 3, 3, 3, 4), torch.randn(4)
    for subm, stride in ((False, 2), (True, 1)):
        outids, pairs, counts = ops.get_indice_pairs(indices, 2, SHAPE, 3, stride, 1, 1, 0, subm)
        plain = ops.indice_conv(features, weight, pairs, counts, len(outids), False, subm)
        fused = ops.fused_indice_conv(features, weight, bias, pairs, counts, len(outids), False, subm)
        record("sparse_conv_ext.fused_conv", fused, plain if subm else plain + bias, 1e-6)  # subm: C++ drops bias
        half = ops.indice_conv(features.half(), weight.half(), pairs, counts, len(outids), False, subm)
        record("sparse_conv_ext.half_conv_vs_fp32", half, plain, 2e-2 * plain.abs().max().item())


def test_sparse_encoder_of_the_configs_runs_forward_and_backward():
    from mmdet3d.models.backbones import SparseEncoder

    encoder = SparseEncoder(5, [32, 32, 41], output_channels=128, encoder_channels=[[16, 16, 32], [32, 32, 64],
                            [64, 64, 128], [128, 128]], encoder_paddings=[[0, 0, 1], [0, 0, 1], [0, 0, [1, 1, 0]],
                            [0, 0]], block_type="basicblock")
    indices = active_sites(800, seed=12, shape=[32, 32, 41])
    features = torch.randn(len(indices), 5, requires_grad=True)
    out = encoder(features, indices, 2)
    assert out.shape == (2, 256, 4, 4)  # [B, C * D, H, W] as the configs' decoder expects (in_channels 256)
    out.square().mean().backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0


def test_rulebook_is_fast_at_bevfusion_scale():
    from mmdet3d.ops import Voxelization
    from mmdet3d.ops.spconv.ops import get_indice_pairs

    g = torch.Generator().manual_seed(13)
    scale, shift = torch.tensor([108.0, 108, 8, 1, 1]), torch.tensor([54.0, 54, 5, 0, 0])
    points = torch.rand(150_000, 5, generator=g) * scale - shift
    start = time.perf_counter()
    _, coors, _ = Voxelization([0.075, 0.075, 0.2], [-54, -54, -5, 54, 54, 3], 10, 120_000)(points)
    ERRORS["seconds: voxelize 150k points"] = time.perf_counter() - start
    indices = F.pad(coors, (1, 0))
    for subm, stride in ((True, 1), (False, 2)):
        start = time.perf_counter()
        get_indice_pairs(indices, 1, [1440, 1440, 41], 3, stride, 1, 1, 0, subm)
        seconds = time.perf_counter() - start
        ERRORS[f"seconds: rulebook {'subm' if subm else 'strided'} 120k voxels"] = seconds
        assert seconds < 5.0  # loose: catches a per-voxel Python loop, not a busy shared CPU (~0.2 s when idle)


# ---------------------------------------------------------------- iou3d
def random_boxes(n: int, seed: int) -> torch.Tensor:
    """LiDAR boxes [x, y, z, dx, dy, dz, yaw] packed close enough to overlap."""
    g = torch.Generator().manual_seed(seed)
    centre, z = torch.rand(n, 2, generator=g) * 3, torch.rand(n, 1, generator=g)
    size, yaw = torch.rand(n, 3, generator=g) * 2 + 0.5, torch.rand(n, 1, generator=g) * 2 * math.pi - math.pi
    return torch.cat([centre, z, size, yaw], 1)


def special_pairs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Identical boxes, a quarter-turned copy, and two axis-aligned boxes sharing an edge."""
    b[0] = a[0]
    b[1] = a[1]
    b[1, 6] += math.pi / 2
    a[2] = torch.tensor([0.0, 0, 0, 2, 1, 1, 0])
    b[2] = torch.tensor([2.0, 0, 0, 2, 1, 1, 0])


def footprints(corners: torch.Tensor) -> list[Polygon]:
    """Shapely BEV polygons from BEVFusion's own box corners (bottom face: corners 0, 4, 7, 3)."""
    return [Polygon(c[[0, 4, 7, 3], :2].tolist()) for c in corners.double()]


def test_lidar_box_overlaps_match_shapely(cuda_is_cpu):
    from mmdet3d.core.bbox import LiDARInstance3DBoxes
    from mmdet3d.core.bbox.iou_calculators import BboxOverlaps3D

    a, b = random_boxes(10, seed=14), random_boxes(8, seed=15)
    special_pairs(a, b)
    boxes_a, boxes_b = LiDARInstance3DBoxes(a), LiDARInstance3DBoxes(b)
    expected = torch.zeros(10, 8, dtype=torch.float64)
    for (i, pa), (j, pb) in itertools.product(enumerate(footprints(boxes_a.corners)),
                                              enumerate(footprints(boxes_b.corners))):
        height = max(0.0, min(a[i, 2] + a[i, 5], b[j, 2] + b[j, 5]) - max(a[i, 2], b[j, 2]))
        inter = pa.intersection(pb).area * height
        expected[i, j] = inter / max(a[i, 3:6].prod() + b[j, 3:6].prod() - inter, 1e-8)
    assert expected[0, 0] == pytest.approx(1) and expected[2, 2] == 0
    record("iou3d_cuda.boxes_overlap_bev_gpu (3D IoU)", LiDARInstance3DBoxes.overlaps(boxes_a, boxes_b), expected, 1e-5)
    record("iou3d_cuda.boxes_overlap_bev_gpu (3D IoU)", BboxOverlaps3D("lidar")(a, b), expected, 1e-5)


def kernel_polygon(box: list[float]) -> Polygon:
    """An [x1, y1, x2, y2, r] box as the kernel places it: the rectangle turned by -r about its centre."""
    x1, y1, x2, y2, r = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    return Polygon([((x - cx) * math.cos(r) + (y - cy) * math.sin(r) + cx,
                     -(x - cx) * math.sin(r) + (y - cy) * math.cos(r) + cy) for x, y in corners])


def xyxyr(boxes: torch.Tensor) -> torch.Tensor:
    """LiDAR boxes to the kernels' BEV [x1, y1, x2, y2, r]."""
    half = boxes[:, 3:5] / 2
    return torch.cat([boxes[:, :2] - half, boxes[:, :2] + half, boxes[:, 6:]], 1)


def shapely_iou(a: Polygon, b: Polygon) -> float:
    """BEV IoU of two polygons with the kernel's 1e-8 floor on the union."""
    inter = a.intersection(b).area
    return inter / max(a.area + b.area - inter, 1e-8)


def axis_aligned_iou(a: list[float], b: list[float]) -> float:
    """IoU of two [x1, y1, x2, y2, r] boxes ignoring r, as nms_normal's kernel defines it."""
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / max((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter, 1e-8)


def test_bev_iou_matches_shapely():
    from mmdet3d.ops.iou3d import boxes_iou_bev

    a, b = random_boxes(12, seed=16), random_boxes(9, seed=17)
    special_pairs(a, b)
    bev_a, bev_b = xyxyr(a), xyxyr(b)
    expected = torch.tensor([[shapely_iou(kernel_polygon(p), kernel_polygon(q)) for q in bev_b.tolist()]
                             for p in bev_a.tolist()], dtype=torch.float64)
    record("iou3d_cuda.boxes_iou_bev_gpu", boxes_iou_bev(bev_a, bev_b), expected, 1e-6)


def greedy_nms(iou: list[list[float]], order: list[int], thresh: float) -> list[int]:
    """Plain greedy NMS: walk boxes by score, keep one unless a kept box overlaps it by more than thresh."""
    kept: list[int] = []
    for i in order:
        if all(iou[i][j] <= thresh for j in kept):
            kept.append(i)
    return kept


@pytest.mark.parametrize("thresh", [0.1, 0.3])
def test_nms_matches_the_greedy_loop(cuda_is_cpu, thresh):
    from mmdet3d.ops.iou3d import nms_gpu, nms_normal_gpu

    boxes = xyxyr(random_boxes(60, seed=18))
    scores = torch.rand(60, generator=torch.Generator().manual_seed(19))
    order = scores.argsort(descending=True).tolist()
    polygons = [kernel_polygon(box) for box in boxes.tolist()]
    rotated = [[shapely_iou(p, q) for q in polygons] for p in polygons]
    aligned = [[axis_aligned_iou(p, q) for q in boxes.tolist()] for p in boxes.tolist()]
    assert nms_gpu(boxes, scores, thresh).tolist() == greedy_nms(rotated, order, thresh)
    assert nms_gpu(boxes, scores, thresh, pre_maxsize=30, post_max_size=5).tolist() == greedy_nms(
        rotated, order[:30], thresh)[:5]
    assert nms_normal_gpu(boxes, scores, thresh).tolist() == greedy_nms(aligned, order, thresh)
    ERRORS["iou3d_cuda.nms_gpu/nms_normal_gpu keep mismatches"] = 0.0


# ---------------------------------------------------------------- mmcv._ext
def test_focal_loss_of_the_configs_runs_without_mmcv_ops():
    from mmcv.ops import sigmoid_focal_loss
    from mmdet.models.losses import FocalLoss

    pred, target = torch.randn(6, 10), torch.randint(0, 11, (6,))
    assert torch.isfinite(FocalLoss(use_sigmoid=True, gamma=2.0, alpha=0.25)(pred, target))  # CPU: pure torch path
    with pytest.raises(CPUOpUnavailable, match="mmcv._ext"):
        sigmoid_focal_loss(pred, target, 2.0, 0.25)  # the compiled op itself stays a raising stand-in
