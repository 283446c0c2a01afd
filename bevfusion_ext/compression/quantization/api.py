"""Insert, describe, save/restore and switch quantizers on a (possibly pruned) float model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .backend import get_backend
from .folding import fold_batchnorms
from .forwards import ROUTE
from .meta import META_ATTR, QuantMeta, attach_meta, get_meta, load_amax, quantizers
from .spec import QuantSpec
from .targets import Report, check_targets, eval_mode, format_report, model_device, plan_targets, unwrap

STATE_FORMAT = "bevfusion_ext.quantization/1"


def _check_float(root: nn.Module) -> None:
    """Quantizing twice would stack quantizers; say so instead."""
    if getattr(root, META_ATTR, None) is not None:
        raise ValueError(f"{type(root).__name__} is already quantized; build a fresh float model")


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Insert uncalibrated quantizers in place (same module objects and Parameters, so an optimizer stays valid).

    With spec.fold_bn the BNs are folded first (new conv biases: rebuild the optimizer then).
    """
    root = unwrap(model)
    _check_float(root)
    backend = get_backend(spec.backend)
    backend.check_calibrator(spec.calibrator)
    folded = fold_batchnorms(root) if spec.fold_bn else []
    targets, report = plan_targets(root, spec)
    if all(kind == ROUTE for kind in targets.values()):
        raise ValueError(f"nothing to quantize with {spec}:\n{format_report(report)}")
    with backend.quiet(), eval_mode(root):  # mtq.quantize leaves every module in the root's mode: keep each one's
        backend.insert(root, targets, spec)
    attach_meta(root, QuantMeta(spec.backend, spec, targets, folded, report=report))
    return model


def quantization_report(model: nn.Module) -> Report:
    """{module type: {kind, quantized: count, skipped: {reason: [module names]}}} of a quantized model.

    Lists every module of a quantizable family (layer types and their subclasses, sparse convs, attention-like and
    known residual blocks), so nothing stays float unexplained; format_report() renders it one line per type.
    """
    return get_meta(model).report


def quantizer_amax(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every calibrated amax by quantizer name (TensorRT scale = amax / 127), detached copies."""
    return {name: q._amax.detach().clone() for name, (q, _) in quantizers(model).items() if "_amax" in q._buffers}


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the modules carrying quantizers (layers, attention and residual blocks), in model order."""
    return [name for name, kind in get_meta(model).targets.items() if kind != ROUTE]


def quantizer_state(model: nn.Module) -> dict[str, Any]:
    """Everything restore_quantizers needs on a freshly built float model; torch.load(weights_only=True) safe."""
    root = unwrap(model)
    meta = get_meta(root)
    return {
        "format": STATE_FORMAT,
        "backend": meta.backend,
        "spec": meta.spec.to_dict(),
        "targets": dict(meta.targets),
        "folded_bn": [list(pair) for pair in meta.folded_bn],
        "shared_groups": [list(group) for group in meta.shared_groups],
        "amax": {name: amax.cpu() for name, amax in quantizer_amax(root).items()},
        "backend_state": meta.impl.backend_state(root),
    }


def restore_quantizers(model: nn.Module, state: dict[str, Any]) -> nn.Module:
    """Rebuild quantizers (and BN folds) from quantizer_state() on a float model of the same architecture.

    Order for a pruned model: rebuild the pruned float shapes, restore_quantizers, then load the weights strictly.
    """
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a quantizer state of format {STATE_FORMAT!r} (got {state.get('format')!r})")
    root = unwrap(model)
    _check_float(root)
    spec = QuantSpec.from_dict(state["spec"])
    backend = get_backend(state["backend"])
    folded = fold_batchnorms(root, state["folded_bn"])
    report = check_targets(root, state["targets"], spec)
    with backend.quiet(), eval_mode(root):
        backend.restore(root, state["targets"], spec, state["backend_state"])
    attach_meta(root, QuantMeta(state["backend"], spec, dict(state["targets"]), folded,
                                [list(group) for group in state["shared_groups"]], report))
    named = quantizers(root)
    unknown = set(state["amax"]) - set(named)
    if unknown:
        raise ValueError(f"quantizer state has amax for quantizers the model does not have: {sorted(unknown)[:5]}")
    device = model_device(root)
    for name, amax in state["amax"].items():
        load_amax(named[name][0], amax.to(device))
    return model


def set_quantizers_enabled(model: nn.Module, enabled: bool, layers: Iterable[str] | None = None) -> None:
    """Switch fake quantization on/off for all quantized layers or just `layers` (module names), e.g. FP32 eval."""
    wanted = None if layers is None else set(layers)
    unknown = set() if wanted is None else wanted - set(quantized_layers(model))
    if unknown:
        raise ValueError(f"not quantized layers: {sorted(unknown)}")
    for name, (quantizer, _) in quantizers(model).items():
        if wanted is None or name.rpartition(".")[0] in wanted:
            (quantizer.enable if enabled else quantizer.disable)()


def freeze_quantizers(model: nn.Module) -> None:
    """Fix amax for QAT: no quantizer collects statistics or falls back to per-batch dynamic amax."""
    uncalibrated = [name for name, (q, _) in quantizers(model).items() if "_amax" not in q._buffers]
    if uncalibrated:
        raise RuntimeError(f"{len(uncalibrated)} quantizers have no amax (e.g. {uncalibrated[:3]}); calibrate first")
    with get_meta(model).impl.quiet():
        for quantizer, _ in quantizers(model).values():
            quantizer.disable_calib()
            quantizer.enable_quant()
