"""INT8 fake quantization on the tiny reference model, for both backends: insertion, calibration, sync, sharing,

save/restore, BN folding, QAT, calibrators, Q/DQ ONNX parity with onnxruntime, layer sensitivity."""

import copy
import io
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from helpers import warm_bn
from torch import nn

from bevfusion_ext.compression.quantization import (
    BACKENDS,
    CALIBRATORS,
    QuantSpec,
    calibrate,
    export_qdq_onnx,
    freeze_quantizers,
    layer_sensitivity,
    qdq_node_counts,
    quantize_model,
    quantized_layers,
    quantizer_amax,
    quantizer_state,
    restore_quantizers,
    set_quantizers_enabled,
)
from bevfusion_ext.compression.quantization.meta import get_meta
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.models import build_model, reference_config

pytestmark = pytest.mark.usefixtures("one_thread")

QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
ATTENTION_CLASSES = ("WindowMSA", "MultiheadAttention")
# INT8 fake quantization of the (untrained, BN-warmed) tiny model moves the fused BEV map by ~1% (relative L2).
MAX_BEV_FEATURE_ERROR = 0.05
# ORT vs fake-quant PyTorch: a rounding tie resolved differently flips one INT8 step (~0.8% of a tensor's range),
# which later layers propagate; everything else agrees to float rounding.
ORT_MAX_ERROR, ORT_MEAN_ERROR = 0.02, 1e-3  # times max |output|


def predict(model: nn.Module, batch: dict) -> list[dict]:
    return model(return_loss=False, **batch)


def bev_features(model: nn.Module, batch: dict) -> torch.Tensor:
    """The decoder's fused BEV map: a continuous output (the heads' top-k proposal choice is discrete)."""
    with torch.no_grad():
        return model.extract_features(batch["img"], batch["points"], batch["camera_intrinsics"],
                                      batch["camera2lidar"])[0]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    dataset = SyntheticBEVDataset(6, seed=0)
    return [collate([dataset[i], dataset[i + 1]]) for i in range(0, 6, 2)]



@pytest.fixture(scope="module")
def float_state(batches: list[dict]) -> dict:
    """Weights of a tiny model with warm BN statistics."""
    torch.manual_seed(0)
    return copy.deepcopy(warm_bn(build_model(reference_config("tiny")), batches * 2).state_dict())


def make_model(float_state: dict) -> nn.Module:
    model = build_model(reference_config("tiny"))
    model.load_state_dict(float_state)
    return model.eval()


def decoder_of(model: nn.Module) -> nn.Module:
    """SECOND + SECONDFPN as one module: a small, exportable part of the model."""
    return nn.Sequential(model.decoder["backbone"], model.decoder["neck"]).eval()


def random_inputs(shape: tuple[int, ...], count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(count)]


def call(module: nn.Module, x: torch.Tensor) -> object:
    return module(x)


@pytest.fixture(scope="module", params=BACKENDS)
def calibrated(request: pytest.FixtureRequest, float_state: dict, batches: list[dict]) -> SimpleNamespace:
    """The whole tiny model quantized (attention matmuls included) and max-calibrated on two batches."""
    model = make_model(float_state)
    spec = QuantSpec(backend=request.param, attention_matmuls=True)
    quantize_model(model, spec)
    report = calibrate(model, spec, batches[:2], predict)
    return SimpleNamespace(backend=request.param, model=model, spec=spec, report=report)


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantizers_sit_on_configured_types_and_not_on_excluded(backend: str, float_state: dict) -> None:
    model = make_model(float_state)
    params = {name: id(p) for name, p in model.named_parameters()}
    types = {name: type(m) for name, m in model.named_modules()}  # before the in-place conversion
    exclude = ["heads.map", "encoders.camera.backbone.stages.0"]
    quantize_model(model, QuantSpec(backend=backend, attention_matmuls=True, exclude=exclude))

    excluded = [n for n in types if n.startswith(("heads.map", "encoders.camera.backbone.stages.0."))]
    expected = {n for n, t in types.items()
                if (t in QUANTIZABLE or t.__name__ in ATTENTION_CLASSES) and n not in excluded}
    assert set(quantized_layers(model)) == expected
    assert any(types[n].__name__ == "WindowMSA" for n in expected)
    assert "heads.object.decoder.0.self_attn.out_proj" in expected  # the fused in_proj (F.linear) has no module
    # Exactly our quantizers are active (ModelOpt also wraps BN / LayerNorm, with disabled quantizers).
    active = {n for n, m in model.named_modules() if type(m).__name__ == "TensorQuantizer" and not m._disabled}
    assert active == set(get_meta(model).roles())
    assert not [n for n in active if n.startswith(tuple(excluded))]
    # Conversion is in place: the same Parameter objects, so an existing optimizer stays valid.
    assert {name: id(p) for name, p in model.named_parameters()} == params

    only_linear = make_model(float_state)
    quantize_model(only_linear, QuantSpec(backend=backend, layers=["Linear"]))
    assert {types[n] for n in quantized_layers(only_linear)} == {nn.Linear}


def test_bad_specs_fail_clearly(float_state: dict) -> None:
    with pytest.raises(ValueError, match="calibrator"):
        QuantSpec(calibrator="kl_divergence")
    with pytest.raises(ValueError, match="backend"):
        QuantSpec(backend="tensorrt")
    with pytest.raises(ValueError, match="layers"):
        QuantSpec(layers=["Conv2d", "BatchNorm2d"])
    with pytest.raises(ValueError, match="match no module"):
        quantize_model(make_model(float_state), QuantSpec(exclude=["heads.objekt.*"]))
    model = quantize_model(make_model(float_state), QuantSpec())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, QuantSpec())


def test_calibrated_amax_finite_and_output_close_to_float(calibrated: SimpleNamespace, float_state: dict,
                                                          batches: list[dict]) -> None:
    model, report = calibrated.model, calibrated.report
    amax = quantizer_amax(model)
    assert set(amax) == set(report) == set(get_meta(model).roles())
    assert all(bool(torch.isfinite(a).all() and (a > 0).all()) for a in amax.values())

    reference = make_model(float_state)
    error = relative_error(bev_features(model, batches[2]), bev_features(reference, batches[2]))
    assert 1e-4 < error < MAX_BEV_FEATURE_ERROR, error
    # With the quantizers off, the converted modules (attention forwards included) compute exactly the float model.
    set_quantizers_enabled(model, False)
    try:
        assert torch.equal(bev_features(model, batches[2]), bev_features(reference, batches[2]))
        with torch.no_grad():
            quantized, original = predict(model, batches[2]), predict(reference, batches[2])
        assert all(torch.equal(q[k], o[k]) for q, o in zip(quantized, original, strict=True) for k in o)
    finally:
        set_quantizers_enabled(model, True)


def test_sync_sees_every_amax_and_its_result_is_loaded(calibrated: SimpleNamespace, float_state: dict,
                                                       batches: list[dict]) -> None:
    seen = []

    def double(amax: torch.Tensor) -> None:  # stands in for an all-reduce MAX: in place, like dist.all_reduce
        seen.append(amax.clone())
        amax.mul_(2)

    model = quantize_model(make_model(float_state), calibrated.spec)
    calibrate(model, calibrated.spec, batches[:2], predict, sync=double)
    assert len(seen) == len(get_meta(model).roles())
    doubled, reference = quantizer_amax(model), quantizer_amax(calibrated.model)
    for name, amax in reference.items():
        torch.testing.assert_close(doubled[name], 2 * amax, msg=name)


class ConcatAdd(nn.Module):
    """cat(a, b) -> fuse, a -> side (reads a Concat input); c + d -> mix, c -> left, d -> right (read Add inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(3, 4, 1) for _ in range(4))
        self.fuse, self.mix = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)
        self.side, self.left, self.right = (nn.Conv2d(4, 4, 1) for _ in range(3))
        self.unused = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = self.a(x), 5 * self.b(x), self.c(x), 3 * self.d(x)
        return self.fuse(torch.cat([a, b], 1)) + self.side(a) + self.mix(c + d) + self.left(c) + self.right(d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concat_and_add_inputs_share_one_amax(backend: str) -> None:
    inputs = random_inputs((2, 3, 8, 8), 2, seed=1)
    amax = {}
    for share in (True, False):
        torch.manual_seed(0)
        model = ConcatAdd()
        spec = QuantSpec(backend=backend, exclude=["unused"], share_concat_add_inputs=share)
        calibrate(quantize_model(model, spec), spec, inputs, call)
        amax[share] = {name.split(".")[0]: float(a) for name, a in quantizer_amax(model).items() if "input" in name}
        groups = [{name.split(".")[0] for name in group} for group in get_meta(model).shared_groups]
    assert groups == []
    assert amax[True]["fuse"] == amax[True]["side"] > amax[False]["side"]  # side alone sees only a, not 5 * b
    assert amax[True]["left"] == amax[True]["right"] == max(amax[False]["left"], amax[False]["right"])
    assert len({amax[True][k] for k in "abcd"}) == 1  # all four read the same input x
    assert amax[True]["mix"] == amax[False]["mix"]  # reads the Add output: not tied to its inputs

    model = ConcatAdd()
    spec = QuantSpec(backend=backend)
    with pytest.raises(RuntimeError, match="unused"):
        calibrate(quantize_model(model, spec), spec, inputs, call)


def test_reference_model_shared_groups_are_equal(calibrated: SimpleNamespace) -> None:
    groups, amax = get_meta(calibrated.model).shared_groups, quantizer_amax(calibrated.model)
    names = {name.rsplit(".", 1)[0] for group in groups for name in group}
    assert {"decoder.backbone.blocks.1.0", "decoder.neck.deblocks.0.0"} <= names  # SECOND stage 1 fans out
    for group in groups:
        assert len({float(amax[name]) for name in group}) == 1, group


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_state_restores_exactly_on_a_fresh_float_model(calibrated: SimpleNamespace, float_state: dict,
                                                       batches: list[dict]) -> None:
    restored = make_model(float_state)
    restore_quantizers(restored, roundtrip(quantizer_state(calibrated.model)))
    restored.load_state_dict(calibrated.model.state_dict(), strict=True)
    assert list(restored.state_dict()) == list(calibrated.model.state_dict())
    with torch.no_grad():
        expected, got = predict(calibrated.model, batches[2]), predict(restored, batches[2])
    assert all(torch.equal(e[k], g[k]) for e, g in zip(expected, got, strict=True) for k in e)
    assert get_meta(restored).shared_groups == get_meta(calibrated.model).shared_groups

    det_only = build_model(reference_config("tiny", map_classes=()))
    with pytest.raises(ValueError, match="does not fit"):
        restore_quantizers(det_only, quantizer_state(calibrated.model))


# Channel counts a pruner leaves behind (odd, not multiples of 8); heads stay divisible by the attention heads.
PRUNED = dict(camera_channels=23, lidar_channels=37, fuser_channels=45, second_channels=(31, 63),
              fpn_channels=(29, 35), neck_channels=27, head_conv=19)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fold_bn", [False, True])
def test_pruned_model_quantizes_and_restores(backend: str, fold_bn: bool, batches: list[dict]) -> None:
    torch.manual_seed(1)
    model = warm_bn(build_model(reference_config("tiny", **PRUNED)), batches)
    float_state = copy.deepcopy(model.state_dict())
    reference = bev_features(model, batches[0])
    spec = QuantSpec(backend=backend, fold_bn=fold_bn)
    quantize_model(model, spec)
    if fold_bn:
        assert not [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        set_quantizers_enabled(model, False)
        torch.testing.assert_close(bev_features(model, batches[0]), reference, rtol=1e-4, atol=1e-4)
        set_quantizers_enabled(model, True)
    calibrate(model, spec, batches[:1], predict)
    assert relative_error(bev_features(model, batches[0]), reference) < MAX_BEV_FEATURE_ERROR

    fresh = build_model(reference_config("tiny", **PRUNED))
    fresh.load_state_dict(float_state)
    restore_quantizers(fresh.eval(), roundtrip(quantizer_state(model)))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(bev_features(fresh, batches[1]), bev_features(model, batches[1]))


def qat_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    loss = sum(model(return_loss=True, **batch).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def restored_copy(calibrated: SimpleNamespace, float_state: dict) -> nn.Module:
    model = make_model(float_state)
    restore_quantizers(model, quantizer_state(calibrated.model))
    model.load_state_dict(calibrated.model.state_dict(), strict=True)
    return model


def test_qat_trains_with_finite_loss_and_frozen_amax(calibrated: SimpleNamespace, float_state: dict,
                                                     batches: list[dict]) -> None:
    model = restored_copy(calibrated, float_state)
    freeze_quantizers(model)
    amax = quantizer_amax(model)
    weights = {n: model.get_submodule(n).weight for n in quantized_layers(model)
               if isinstance(getattr(model.get_submodule(n), "weight", None), torch.Tensor)}  # not attention
    before = {n: w.detach().clone() for n, w in weights.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for batch in batches:
        loss = sum(model(return_loss=True, **batch).values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        grads = {n: w.grad for n, w in weights.items()}
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads.values())
        assert sum(bool(g.abs().sum() > 0) for g in grads.values()) >= 0.9 * len(grads)
        optimizer.step()
    assert all(not torch.equal(before[n], w) for n, w in weights.items() if w.grad.abs().sum() > 0)
    after = quantizer_amax(model)
    assert all(torch.equal(after[name], a) for name, a in amax.items())


def test_report_qat_step_time_vs_fp32(calibrated: SimpleNamespace, float_state: dict, batches: list[dict],
                                      capsys: pytest.CaptureFixture) -> None:
    models = {"fp32": make_model(float_state).train(), "qat": restored_copy(calibrated, float_state).train()}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    times = {k: [] for k in models}
    for step in range(6):  # alternate, so load from other processes hits both alike; step 0 is warm-up
        for key, model in models.items():
            start = time.perf_counter()
            qat_step(model, optimizers[key], batches[step % len(batches)])
            times[key].append(time.perf_counter() - start)
    fp32, qat = (statistics.median(times[k][1:]) for k in ("fp32", "qat"))
    with capsys.disabled():
        print(f"\n[timing] {calibrated.backend}: train step FP32 {fp32 * 1e3:.0f} ms, QAT {qat * 1e3:.0f} ms "
              f"(x{qat / fp32:.2f}), tiny model, batch 2, {torch.get_num_threads()} thread(s)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", CALIBRATORS)
def test_every_calibrator_gives_usable_amax_or_a_clear_error(backend: str, method: str, float_state: dict) -> None:
    conv = make_model(float_state).decoder["backbone"].blocks[0][0]  # the model's first BEV decoder conv
    if backend == "pytorch_quantization" and method == "mse" and not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            quantize_model(conv, QuantSpec(backend=backend, calibrator=method))
        return
    inputs = random_inputs((2, conv.in_channels, 32, 32), 2, seed=2)
    amax = {}
    for name in ("max", method):
        quantized = copy.deepcopy(conv)
        spec = QuantSpec(backend=backend, calibrator=name)
        calibrate(quantize_model(quantized, spec), spec, inputs, call)
        amax[name] = quantizer_amax(quantized)
    activation = next(n for n in amax["max"] if "input" in n)
    assert bool(torch.isfinite(amax[method][activation]) and amax[method][activation] > 0)
    if method == "max":
        assert torch.isclose(amax[method][activation], max(x.abs().max() for x in inputs))
    else:  # histogram methods clip below the largest value seen
        assert amax[method][activation] < amax["max"][activation]
    weight = next(n for n in amax["max"] if "weight" in n)
    assert torch.equal(amax[method][weight], amax["max"][weight])  # weights always use per-channel max


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_tensor_weights(backend: str, float_state: dict) -> None:
    conv = make_model(float_state).decoder["backbone"].blocks[0][0]
    spec = QuantSpec(backend=backend, weight="per_tensor")
    calibrate(quantize_model(conv, spec), spec, random_inputs((1, conv.in_channels, 16, 16), 1, seed=5), call)
    weight_amax = next(a for n, a in quantizer_amax(conv).items() if "weight" in n)
    assert weight_amax.shape == () and torch.equal(weight_amax, conv.weight.detach().abs().max())


def assert_ort_matches(path: str, module: nn.Module, x: torch.Tensor) -> None:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = module(x)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    for e, g in zip(expected, got, strict=True):
        scale = float(e.abs().max())
        diff = np.abs(e.numpy() - g)
        assert diff.max() <= ORT_MAX_ERROR * scale and diff.mean() <= ORT_MEAN_ERROR * scale, (diff.max(), scale)


def test_qdq_onnx_export_matches_onnxruntime(calibrated: SimpleNamespace, tmp_path: Path) -> None:
    model = calibrated.model
    parts = {"decoder": (decoder_of(model), (1, 48, 64, 64), 1),
             "swin": (model.encoders["camera"]["backbone"], (1, 3, 96, 160), 3)}
    for name, (module, shape, outputs) in parts.items():
        path = str(tmp_path / f"{name}.onnx")
        export_qdq_onnx(module, (torch.zeros(shape),), path, ["x"], [f"y{i}" for i in range(outputs)])
        active = sum(type(m).__name__ == "TensorQuantizer" and not m._disabled for m in module.modules())
        assert qdq_node_counts(path) == {"QuantizeLinear": active, "DequantizeLinear": active}
        for x in random_inputs(shape, 2, seed=3):
            assert_ort_matches(path, module, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_sensitivity_ranks_every_quantized_layer(backend: str, float_state: dict) -> None:
    decoder = decoder_of(make_model(float_state))
    inputs = random_inputs((2, 48, 64, 64), 2, seed=4)
    with torch.no_grad():
        reference = decoder(inputs[0])[0]

    def negative_mse(model: nn.Module) -> float:
        with torch.no_grad():
            return -float(((model(inputs[0])[0] - reference) ** 2).mean())

    ranking = layer_sensitivity(decoder, QuantSpec(backend=backend), inputs, call, negative_mse)
    expected = [n for n, m in decoder.named_modules() if type(m) in QUANTIZABLE]
    assert sorted(name for name, _ in ranking) == sorted(expected)
    drops = [drop for _, drop in ranking]
    assert drops == sorted(drops, reverse=True) and all(d >= 0 for d in drops) and drops[0] > 0
    assert not any(type(m).__name__ == "TensorQuantizer" for m in decoder.modules())  # the input model is untouched
