"""Quantization of BEVFusion's real module classes (mmcv wrappers, mmdet Swin and ResNet blocks, TransFusion attention,
spconv), as small instances of the same classes (both backends) and on the whole real Swin-T camera+lidar model.

Each failure of the real-module issue is reproduced on a small model of the same structure: mmcv's Linear /
ConvTranspose2d wrappers (subclasses) left float, attention_matmuls a no-op on mmdet's WindowMSA, BEVFusion's
F.linear(out_proj.weight) leaving out_proj's input quantizer without amax, float residual Adds, float sparse convs.
"""

import copy
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import BEVFUSION_ROOT, ROOT, SWINT_DET, SYNTHETIC_CPU, needs_bevfusion, use_bevfusion
from torch import nn

from bevfusion_ext.compression.quantization import (
    BACKENDS,
    QuantSpec,
    calibrate,
    export_qdq_onnx,
    format_report,
    quantization_report,
    quantize_model,
    quantizer_amax,
    quantizer_state,
    restore_quantizers,
    set_quantizers_enabled,
)
from bevfusion_ext.compression.quantization.meta import get_meta, quantizers

pytestmark = pytest.mark.usefixtures("one_thread")

ALL_LAYERS = ["Conv2d", "ConvTranspose2d", "Linear", "Conv1d", "SubMConv3d", "SparseConv3d"]
# ORT vs fake-quant PyTorch on one Swin block: a rounding tie resolved differently flips one INT8 step.
ORT_MAX_ERROR = 0.05  # times max |output|


def run(module: nn.Module, inputs: tuple) -> object:
    return module(*inputs)


def first_tensor(out: object) -> torch.Tensor:
    """The tensor an output carries (a tuple's first item, a SparseConvTensor's features)."""
    out = out[0] if isinstance(out, tuple) else out
    return out.features if hasattr(out, "features") else out


def seeded(module: nn.Module, inputs: tuple) -> torch.Tensor:
    """One forward on a copy of the inputs with the RNG reset (dropout masks equal between two modules)."""
    torch.manual_seed(0)
    return first_tensor(run(module, copy.deepcopy(inputs)))


def quantize_and_compare(module: nn.Module, spec: QuantSpec, batches: list[tuple]) -> nn.Module:
    """Quantize `module`; with its quantizers off it must compute exactly what the float copy computes; after
    calibration every quantizer has an amax and, enabled, they change the output (so they really run)."""
    reference = copy.deepcopy(module)
    modes = {m: m.training for m in module.modules()}
    quantize_model(module, spec)
    assert {m: m.training for m in modes} == modes  # each module keeps its own train/eval mode
    set_quantizers_enabled(module, False)
    for inputs in batches:
        assert torch.equal(seeded(module, inputs), seeded(reference, inputs))
    set_quantizers_enabled(module, True)
    calibrate(module, spec, [copy.deepcopy(b) for b in batches], run)
    assert set(quantizer_amax(module)) == set(quantizers(module))
    assert not torch.equal(seeded(module, batches[0]), seeded(reference, batches[0]))
    return module


class Call(nn.Module):
    """`fn(modules, *inputs)` as a module, so blocks with extra forward arguments quantize and export as one."""

    def __init__(self, fn: object, modules: nn.Module) -> None:
        super().__init__()
        self.fn, self.blocks = fn, modules

    def forward(self, *inputs: object) -> object:
        return self.fn(self.blocks, *inputs)


class WrappedLinear(nn.Linear):
    """The structure of mmcv.cnn.bricks.wrappers.Linear: a subclass overriding forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features) if x.numel() == 0 else super().forward(x)


class FunctionalOutProj(nn.Module):
    """num_heads + a fused in-projection weight, out_proj applied functionally: an attention class we do not know."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.num_heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = nn.functional.linear(x, self.in_proj_weight).chunk(3, dim=-1)
        return nn.functional.linear((q @ k.transpose(-2, -1)).softmax(-1) @ v, self.out_proj.weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_subclasses_are_quantized_and_everything_else_reported(backend: str) -> None:
    model = nn.Sequential(WrappedLinear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Conv3d(1, 1, 1), FunctionalOutProj())
    spec = QuantSpec(backend=backend, layers=["Linear"], attention_matmuls=True, exclude=["4"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "attention_matmuls cannot reach")  # excluded: reported, not warned
        quantize_model(model, spec)
    batches = [(torch.randn(5, 8),) for _ in range(2)]
    calibrate(model, spec, batches, lambda m, b: m[:3](*b))
    report = quantization_report(model)
    assert report[f"{__name__}.WrappedLinear"] == {"kind": "layer", "quantized": 1, "skipped": {}}
    assert report["torch.nn.modules.linear.Linear"] == {"kind": "layer", "quantized": 1,
                                                        "skipped": {"excluded by '4'": ["4.out_proj"]}}
    assert report["torch.nn.modules.conv.Conv3d"]["skipped"] == {
        "type not configured (add 'Conv3d' to QuantSpec.layers)": ["3"]}
    assert report[f"{__name__}.FunctionalOutProj"]["skipped"] == {"excluded by '4'": ["4"]}
    assert f"{__name__}.WrappedLinear [layer]: 1 quantized" in format_report(report).splitlines()
    # The subclass really runs its quantizers: it was calibrated, and fake quantization changes its output.
    assert {"0", "2"} == {name.rpartition(".")[0] for name in quantizer_amax(model)}
    x = batches[0][0]
    set_quantizers_enabled(model, False, ["0"])
    float_out = model[0](x)
    set_quantizers_enabled(model, True, ["0"])
    assert not torch.equal(model[0](x), float_out)


class WrappedDeconv(nn.ConvTranspose2d):
    """The structure of mmcv.cnn.bricks.wrappers.ConvTranspose2d (SECONDFPN's upsampling, followed by its BN)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def test_fold_bn_folds_into_layer_subclasses() -> None:
    model = nn.Sequential(WrappedDeconv(2, 3, 2, stride=2), nn.BatchNorm2d(3))
    with torch.no_grad():
        model(torch.randn(4, 2, 5, 5) * 3 + 1)  # warm running statistics
    x = torch.randn(2, 2, 5, 5)
    expected = model.eval()(x)
    quantize_model(model, QuantSpec(fold_bn=True))
    assert get_meta(model).folded_bn == [["0", "1"]] and isinstance(model[1], nn.Identity)
    set_quantizers_enabled(model, False)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_an_attention_the_option_cannot_reach_is_a_warning_and_a_reason() -> None:
    with pytest.warns(UserWarning, match=f"attention_matmuls cannot reach {__name__}.FunctionalOutProj"):
        model = quantize_model(nn.Sequential(FunctionalOutProj(), nn.Conv2d(1, 1, 1)),
                               QuantSpec(attention_matmuls=True, layers=["Conv2d"]))
    assert quantization_report(model)[f"{__name__}.FunctionalOutProj"]["skipped"] == {
        "attention class without a quantized forward: its matmuls stay float": ["0"]}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "attention_matmuls cannot reach")  # not asked for: reported, not warned
        model = quantize_model(nn.Sequential(FunctionalOutProj(), nn.Conv2d(1, 1, 1)), QuantSpec(layers=["Conv2d"]))
    assert "FunctionalOutProj" in format_report(quantization_report(model))


# --- the real classes, small instances (BEVFusion's snapshot imported over the CPU op stand-ins) --------------------


@pytest.fixture(scope="module")
def real() -> SimpleNamespace:
    """The real module classes, from BEVFusion's snapshot imported as `--cpu-ops` runs it."""
    use_bevfusion()
    import mmdet3d.models.utils.transformer as transformer
    import mmdet3d.ops.spconv as spconv
    from mmcv.cnn.bricks import wrappers
    from mmdet.models.backbones import resnet, swin
    from mmdet3d.ops.sparse_block import SparseBasicBlock

    return SimpleNamespace(swin=swin, resnet=resnet, transformer=transformer, spconv=spconv, wrappers=wrappers,
                           SparseBasicBlock=SparseBasicBlock)


def sparse_input(real: SimpleNamespace, channels: int, seed: int, size: int = 6, sites: int = 60) -> tuple:
    """(SparseConvTensor,) of random sites in a size^3 grid, batch 1."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.unique(torch.randint(0, size, (sites, 3), generator=g), dim=0)
    indices = torch.cat([torch.zeros(len(coords), 1, dtype=torch.long), coords], 1).int()
    return (real.spconv.SparseConvTensor(torch.randn(len(coords), channels, generator=g), indices, [size] * 3, 1),)


@needs_bevfusion
@pytest.mark.parametrize("backend", BACKENDS)
def test_mmcv_wrapper_layers(backend: str, real: SimpleNamespace) -> None:
    model = nn.Sequential(real.wrappers.Linear(6, 8), nn.Unflatten(1, (2, 2, 2)),
                          real.wrappers.ConvTranspose2d(2, 3, 2, stride=2))
    quantize_and_compare(model, QuantSpec(backend=backend), [(torch.randn(4, 6),), (torch.randn(4, 6),)])
    report = quantization_report(model)
    assert report["mmcv.cnn.bricks.wrappers.Linear"]["quantized"] == 1
    assert report["mmcv.cnn.bricks.wrappers.ConvTranspose2d"]["quantized"] == 1


@needs_bevfusion
@pytest.mark.parametrize("backend", BACKENDS)
def test_mmdet_window_msa_matmuls(backend: str, real: SimpleNamespace) -> None:
    msa = real.swin.WindowMSA(embed_dims=16, num_heads=2, window_size=(3, 3)).eval()
    msa.init_weights()
    mask = torch.zeros(2, 9, 9).masked_fill(torch.rand(2, 9, 9) > 0.7, -100.0)
    quantize_and_compare(msa, QuantSpec(backend=backend, attention_matmuls=True),
                         [(torch.randn(4, 9, 16), mask), (torch.randn(2, 9, 16), None)])
    assert quantization_report(msa)["mmdet.models.backbones.swin.WindowMSA"]["quantized"] == 1
    assert {"q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer"} <= {
        name.rpartition(".")[2] for name in quantizer_amax(msa)}


def bevfusion_attention_batches(dim: int) -> list[tuple]:
    """Self-attention (q = k = v), cross-attention (k = v) with a key padding mask, all different with a mask."""
    q, kv = torch.randn(5, 2, dim), torch.randn(7, 2, dim)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True
    return [(q, q, q), (q, kv, kv, padding), (q, kv, torch.randn(7, 2, dim), None, True, torch.randn(5, 7))]


@needs_bevfusion
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("matmuls", [True, False])
def test_bevfusion_attention_runs_out_proj_as_a_module(backend: str, matmuls: bool, real: SimpleNamespace) -> None:
    """The issue's failure: F.linear(out_proj.weight) left out_proj's input quantizer without amax."""
    attention = real.transformer.MultiheadAttention(16, 4, dropout=0.1)  # train mode: seeded dropout must match
    quantize_and_compare(attention, QuantSpec(backend=backend, attention_matmuls=matmuls),
                         bevfusion_attention_batches(16))
    assert "out_proj" in {name.rpartition(".")[0] for name in quantizer_amax(attention)}
    entry = quantization_report(attention)["mmdet3d.models.utils.transformer.MultiheadAttention"]
    assert entry["quantized"] == int(matmuls)
    if not matmuls:
        assert entry["skipped"] == {
            "attention_matmuls is off (forward still replaced so out_proj runs as a module)": [""]}


@needs_bevfusion
def test_bevfusion_attention_options_its_forward_lacks_are_reported(real: SimpleNamespace) -> None:
    model = nn.Sequential(real.transformer.MultiheadAttention(16, 4, add_zero_attn=True), nn.Linear(16, 16))
    with pytest.warns(UserWarning, match="does not cover add_zero_attn=True"):
        quantize_model(model, QuantSpec(attention_matmuls=True, layers=["Linear"]))
    skipped = {"used functionally by its parent (add_zero_attn=True)": ["0.out_proj"]}
    assert quantization_report(model)["torch.nn.modules.linear.Linear"] == {"kind": "layer", "quantized": 1,
                                                                           "skipped": skipped}


def swin_blocks(blocks: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Two mmdet SwinBlocks (the second shifted) on a 6 x 6 token grid."""
    return blocks[1](blocks[0](x, (6, 6)), (6, 6))


def sequential(blocks: nn.Module, x: object) -> object:
    return blocks(x)


def residual_cases(real: SimpleNamespace) -> dict[str, tuple[Call, list[tuple], dict[str, int]]]:
    """{case: (model, batches, {block type: residual Adds expected})}; the ResNet stage has a downsample block."""
    swin = nn.ModuleList([real.swin.SwinBlock(16, 2, 32, window_size=3, shift=shift) for shift in (False, True)])
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2), nn.BatchNorm2d(16))
    resnet = nn.Sequential(real.resnet.BasicBlock(8, 16, stride=2, downsample=downsample),
                           real.resnet.BasicBlock(16, 16), real.resnet.Bottleneck(16, 4))
    conv_cfg = {"type": "SubMConv3d", "indice_key": "subm1"}
    norm_cfg = {"type": "BN1d", "eps": 1e-3, "momentum": 0.01}
    sparse = real.spconv.SparseSequential(*(real.SparseBasicBlock(8, 8, conv_cfg=conv_cfg, norm_cfg=norm_cfg)
                                            for _ in range(2)))
    return {
        "swin": (Call(swin_blocks, swin), [(torch.randn(2, 36, 16),) for _ in range(2)],
                 {"mmdet.models.backbones.swin.SwinBlock": 2, "mmcv.cnn.bricks.transformer.FFN": 2}),
        "resnet": (Call(sequential, resnet.eval()), [(torch.randn(2, 8, 12, 12),) for _ in range(2)],
                   {"mmdet.models.backbones.resnet.BasicBlock": 2, "mmdet.models.backbones.resnet.Bottleneck": 1}),
        "sparse": (Call(sequential, sparse.eval()), [sparse_input(real, 8, seed) for seed in range(2)],
                   {"mmdet3d.ops.sparse_block.SparseBasicBlock": 2}),
    }


@needs_bevfusion
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["swin", "resnet", "sparse"])
def test_residual_adds_keep_the_float_math(backend: str, case: str, real: SimpleNamespace) -> None:
    model, batches, expected = residual_cases(real)[case]
    quantize_and_compare(model, QuantSpec(backend=backend, residual_adds=True, layers=ALL_LAYERS), batches)
    report = quantization_report(model)
    assert {cls: report[cls]["quantized"] for cls in expected} == expected
    assert all(report[cls]["kind"] == "residual" for cls in expected)
    if case == "resnet":  # the identity of a block without downsample is conv1's input: one amax, as CUDA-BEVFusion
        names = {f"blocks.1.conv1.{get_meta(model).impl.input_attr}", "blocks.1.residual_quantizer"}
        assert any(names <= set(group) for group in get_meta(model).shared_groups)


def input_sources(graph: onnx.GraphProto, op_type: str) -> list[list[str]]:
    """For each `op_type` node, the op producing each input, looking through layout ops (Transpose / Reshape), which
    TensorRT moves Q/DQ across; initializers show as 'Constant'."""
    producer = {out: node for node in graph.node for out in node.output}

    def source(name: str) -> str:
        node = producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Reshape"):
            node = producer.get(node.input[0])
        return "Constant" if node is None else node.op_type

    return [[source(name) for name in node.input] for node in graph.node if node.op_type == op_type]


@needs_bevfusion
@pytest.mark.parametrize("backend", BACKENDS)
def test_swin_block_qdq_onnx_adds_between_qdq_inputs(backend: str, real: SimpleNamespace, tmp_path: Path) -> None:
    block = real.swin.SwinBlock(16, 2, 32, window_size=3, shift=True).eval()
    model = Call(lambda b, x: b(x, (6, 6)), block)
    spec = QuantSpec(backend=backend, attention_matmuls=True, residual_adds=True)
    batches = [(torch.randn(1, 36, 16),) for _ in range(2)]
    quantize_and_compare(model, spec, batches)
    path = str(tmp_path / "swin_block.onnx")
    export_qdq_onnx(model, batches[0], path, ["x"], ["y"])
    graph = onnx.load(path).graph
    # The attention and the FFN residual: both inputs dequantized from INT8 on one scale.
    assert sum(inputs == ["DequantizeLinear"] * 2 for inputs in input_sources(graph, "Add")) == 2
    # Every MatMul reads INT8: qkv, q @ k^T, attn @ v, proj and the two FFN Linears (the float MatMuls).
    assert input_sources(graph, "MatMul") == [["DequantizeLinear"] * 2] * 6
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": batches[0][0].numpy()})
    with torch.no_grad():
        expected = model(*batches[0]).numpy()
    assert np.abs(got - expected).max() <= ORT_MAX_ERROR * np.abs(expected).max()


@needs_bevfusion
@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_convs_per_output_channel_and_trainable(backend: str, real: SimpleNamespace) -> None:
    sp = real.spconv
    model = sp.SparseSequential(sp.SubMConv3d(4, 8, 3, indice_key="subm1", bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                                sp.SparseConv3d(8, 16, 3, stride=2, padding=1, bias=False))
    wrapper = Call(sequential, model.eval())
    spec = QuantSpec(backend=backend, layers=ALL_LAYERS)
    quantize_and_compare(wrapper, spec, [sparse_input(real, 4, seed) for seed in range(2)])
    report = quantization_report(wrapper)
    assert report["mmdet3d.ops.spconv.conv.SubMConv3d"] == {"kind": "sparse_conv", "quantized": 1, "skipped": {}}
    assert report["mmdet3d.ops.spconv.conv.SparseConv3d"]["quantized"] == 1
    amax = quantizer_amax(wrapper)
    impl = get_meta(wrapper).impl
    for index in (0, 3):
        weight = model[index].weight.detach()  # [k, k, k, Cin, Cout]: one amax per Cout (axis 4)
        assert torch.allclose(amax[f"blocks.{index}.{impl.weight_attr}"].flatten(), weight.abs().amax((0, 1, 2, 3)))
        assert amax[f"blocks.{index}.{impl.input_attr}"].numel() == 1
    wrapper.train()
    first_tensor(wrapper(*sparse_input(real, 4, 5))).square().sum().backward()
    assert all(float(model[i].weight.grad.abs().sum()) > 0 for i in (0, 3))


def every_kind(real: SimpleNamespace) -> nn.ModuleDict:
    """One module of each kind: mmcv Linear in a Swin block (residual Adds, WindowMSA), BEVFusion's attention, an
    spconv stage with a SparseBasicBlock."""
    torch.manual_seed(0)
    sp = real.spconv
    block = real.SparseBasicBlock(8, 8, conv_cfg={"type": "SubMConv3d", "indice_key": "subm1"},
                                  norm_cfg={"type": "BN1d", "eps": 1e-3, "momentum": 0.01})
    return nn.ModuleDict({"swin": real.swin.SwinBlock(16, 2, 32, window_size=3, shift=True),
                          "attention": real.transformer.MultiheadAttention(16, 4),
                          "sparse": sp.SparseSequential(block, sp.SparseConv3d(8, 4, 3, stride=2, padding=1))}).eval()


def every_kind_forward(model: nn.Module, batch: tuple) -> torch.Tensor:
    x, q, sparse = copy.deepcopy(batch)
    outputs = (model["swin"](x, (6, 6)), model["attention"](q, q, q)[0], model["sparse"](sparse).features)
    return torch.cat([t.flatten() for t in outputs])


@needs_bevfusion
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("matmuls", [True, False])
def test_every_kind_round_trips_through_the_state(backend: str, matmuls: bool, real: SimpleNamespace,
                                                   tmp_path: Path) -> None:
    model = every_kind(real)
    spec = QuantSpec(backend=backend, layers=ALL_LAYERS, attention_matmuls=matmuls, residual_adds=True)
    batches = [(torch.randn(2, 36, 16), torch.randn(5, 2, 16), *sparse_input(real, 8, seed)) for seed in range(2)]
    quantize_model(model, spec)
    calibrate(model, spec, batches, every_kind_forward)
    torch.save({"quant": quantizer_state(model), "state_dict": model.state_dict()}, tmp_path / "ckpt.pth")
    saved = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    fresh = every_kind(real)
    restore_quantizers(fresh, saved["quant"])
    fresh.load_state_dict(saved["state_dict"], strict=True)
    assert quantization_report(fresh) == quantization_report(model)
    assert set(get_meta(fresh).targets.values()) == {"layer", "sparse_conv", "residual",
                                                     "attention" if matmuls else "route"}
    with torch.no_grad():
        assert torch.equal(every_kind_forward(fresh, batches[0]), every_kind_forward(model, batches[0]))


# --- the whole real model --------------------------------------------------------------------------------------------

REAL_COUNTS = {  # quantized modules per type on the Swin-T camera+lidar model with every option
    "mmcv.cnn.bricks.wrappers.Linear": 24, "mmcv.cnn.bricks.wrappers.ConvTranspose2d": 1,
    "mmdet.models.backbones.swin.WindowMSA": 12, "mmdet3d.models.utils.transformer.MultiheadAttention": 2,
    "mmdet.models.backbones.swin.SwinBlock": 12, "mmcv.cnn.bricks.transformer.FFN": 12,
    "mmdet3d.ops.sparse_block.SparseBasicBlock": 8, "mmdet3d.ops.spconv.conv.SubMConv3d": 17,
    "mmdet3d.ops.spconv.conv.SparseConv3d": 4,
}


def build_real() -> tuple[nn.Module, dict]:
    """BEVFusion's Swin-T camera+lidar model at the synthetic CPU overlay and one training batch."""
    use_bevfusion()
    from bevfusion_ext.runner.builder import build_dataset, build_model, example_batch
    from bevfusion_ext.runner.train import prepare_config

    cfg, sources = prepare_config(str(BEVFUSION_ROOT / SWINT_DET), ["--recipe", str(ROOT / SYNTHETIC_CPU)])
    batch = example_batch(build_dataset(cfg.data.train, "data.train", sources))
    return build_model(cfg, sources), batch


def real_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """BEVFusion's training loss (seeded: its attention dropout is functional)."""
    from bevfusion_ext.compression.pruning.engine import training_loss

    torch.manual_seed(0)
    return training_loss(model, batch)


@pytest.fixture(scope="module")
def real_quantized() -> SimpleNamespace:
    """The real model quantized with every option (default layers + sparse convs, attention, residual Adds) and
    max-calibrated on one batch."""
    from bevfusion_ext.compression.pruning.counting import call_model

    model, batch = build_real()
    spec = QuantSpec(layers=ALL_LAYERS, attention_matmuls=True, residual_adds=True)
    tic = time.perf_counter()
    quantize_model(model, spec)
    quantize_seconds = time.perf_counter() - tic
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "BatchNorm layers have cold running statistics")
        tic = time.perf_counter()
        amax = calibrate(model, spec, [batch], lambda m, b: call_model(m, b, return_loss=False))
    return SimpleNamespace(model=model, batch=batch, spec=spec, amax=amax, quantize_seconds=quantize_seconds,
                           calibrate_seconds=time.perf_counter() - tic)


@needs_bevfusion
def test_real_model_every_quantizer_calibrates(real_quantized: SimpleNamespace) -> None:
    report = quantization_report(real_quantized.model)
    print(f"\n{format_report(report)}\n[real model] {len(real_quantized.amax)} quantizers, quantize "
          f"{real_quantized.quantize_seconds:.1f} s, calibration (1 batch) {real_quantized.calibrate_seconds:.1f} s")
    assert {cls: report[cls]["quantized"] for cls in REAL_COUNTS} == REAL_COUNTS
    assert {cls: entry["skipped"] for cls, entry in report.items() if entry["skipped"]} == {}
    assert set(quantizer_amax(real_quantized.model)) == set(quantizers(real_quantized.model))
    assert all(np.isfinite(v) and v > 0 for v in real_quantized.amax.values())


@needs_bevfusion
def test_real_model_qat_step_reaches_sparse_conv_weights(real_quantized: SimpleNamespace) -> None:
    model = real_quantized.model
    model.zero_grad(set_to_none=True)
    loss = real_loss(model, real_quantized.batch)
    loss.backward()
    sparse = [model.get_submodule(name) for name, kind in get_meta(model).targets.items() if kind == "sparse_conv"]
    assert len(sparse) == 21
    grads = [m.weight.grad for m in sparse]
    assert all(g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0 for g in grads)
    model.zero_grad(set_to_none=True)


@needs_bevfusion
def test_real_model_state_round_trip(real_quantized: SimpleNamespace) -> None:
    state = copy.deepcopy(quantizer_state(real_quantized.model))
    fresh, _ = build_real()
    restore_quantizers(fresh, state)
    fresh.load_state_dict(real_quantized.model.state_dict(), strict=True)
    assert quantization_report(fresh) == quantization_report(real_quantized.model)
    with torch.no_grad():
        expected = real_loss(real_quantized.model, real_quantized.batch)
        assert torch.equal(real_loss(fresh, real_quantized.batch), expected)
