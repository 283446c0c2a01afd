"""Calibration: collect statistics in eval mode, compute amax, let the caller sync it, share it where TensorRT fuses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from .backend import WEIGHT
from .folding import warn_if_cold_bn
from .meta import QuantMeta, get_meta, load_amax, quantizers
from .sharing import SharedInputTracer
from .spec import QuantSpec
from .targets import eval_mode, model_device, unwrap

# A weight channel that is all zeros still needs a positive TensorRT scale; it quantizes to zero with any of them.
WEIGHT_AMAX_FLOOR = 1e-8

Named = dict[str, tuple[nn.Module, str]]
Sync = Callable[[torch.Tensor], torch.Tensor | None]


def _uses_histogram(role: str, spec: QuantSpec) -> bool:
    """Weights always use max (per-channel, as TensorRT wants); activations use spec.calibrator."""
    return role != WEIGHT and spec.calibrator != "max"


def _check_spec(meta: QuantMeta, spec: QuantSpec) -> None:
    """Calibration settings may differ from quantize time; where the quantizers sit may not."""
    if spec.structure() != meta.spec.structure():
        raise ValueError(f"calibrate() got a QuantSpec with a different structure than quantize_model() used: "
                         f"{spec.structure()} vs {meta.spec.structure()}")


@contextmanager
def _calibration_mode(model: nn.Module, named: Named, meta: QuantMeta, spec: QuantSpec) -> Iterator[None]:
    """Eval mode, no grad, every quantizer collecting (not quantizing) with a fresh calibrator; undone on exit."""
    disabled = {name: q._disabled for name, (q, _) in named.items()}
    with eval_mode(model), meta.impl.quiet():
        for quantizer, role in named.values():
            quantizer._calibrator = meta.impl.new_calibrator(quantizer, histogram=_uses_histogram(role, spec))
            quantizer.enable()
            quantizer.disable_quant()
            quantizer.enable_calib()
        try:
            with torch.no_grad():
                yield
        finally:
            for name, (quantizer, _) in named.items():
                quantizer.disable_calib()
                quantizer.enable_quant()
                quantizer._disabled = disabled[name]


def _collect_weights(root: nn.Module, named: Named) -> None:
    """Weight statistics straight from the weights (also for layers the forward never runs), then stop collecting."""
    for name, (quantizer, role) in named.items():
        if role == WEIGHT:
            quantizer(root.get_submodule(name.rpartition(".")[0]).weight)
            quantizer.disable_calib()


def _computed_amax(quantizer: nn.Module, histogram: bool, spec: QuantSpec, device: torch.device) -> torch.Tensor:
    """The calibrator's amax, or zeros if it saw nothing (every rank must still take part in the sync)."""
    calibrator = quantizer._calibrator
    if not histogram:
        amax = calibrator.compute_amax()
    elif calibrator._calib_hist is None:
        amax = None
    else:
        amax = calibrator.compute_amax(spec.calibrator, percentile=spec.percentile)
    amax = torch.zeros(()) if amax is None else torch.as_tensor(amax)
    amax = amax.detach().to(device=device, dtype=torch.float32)
    return amax.reshape(()) if quantizer._axis is None else amax.clone()


def _load_synced_amax(root: nn.Module, named: Named, spec: QuantSpec, sync: Sync | None) -> None:
    """Compute every amax, pass it through `sync` in model order, check it and load it."""
    device, missing = model_device(root), []  # the device a caller's NCCL all-reduce needs
    for name, (quantizer, role) in named.items():
        amax = _computed_amax(quantizer, _uses_histogram(role, spec), spec, device)
        if sync is not None:
            synced = sync(amax)
            amax = amax if synced is None else synced
        if role == WEIGHT:
            amax = amax.clamp(min=WEIGHT_AMAX_FLOOR)
        if not bool(torch.isfinite(amax).all() and (amax > 0).all()):
            missing.append(name)
        load_amax(quantizer, amax)
    if missing:
        raise RuntimeError(f"{len(missing)} quantizers got no usable amax (their layer never ran in forward_fn, or "
                           f"saw only zeros / non-finite values): {missing[:8]}; exclude them with QuantSpec.exclude "
                           "or make forward_fn run them")


def share_amax(named: Named, groups: list[list[str]]) -> None:
    """Set every quantizer of a group to the group's largest amax."""
    for group in groups:
        shared = torch.stack([named[name][0]._amax.reshape(()) for name in group]).max()
        for name in group:
            load_amax(named[name][0], shared)


def calibrate(model: nn.Module, spec: QuantSpec, batches: Iterable[Any], forward_fn: Callable[[nn.Module, Any], Any],
              sync: Sync | None = None) -> dict[str, float]:
    """Set every quantizer's amax from `forward_fn(model, batch)` runs, so fake quantization matches TensorRT INT8.

    Runs in eval mode without grad (BN uses its running statistics: warm them first), weights from the weights
    themselves. `sync(amax)` (e.g. an all-reduce MAX, in place or returning the result) sees every amax tensor in
    the same order on every rank before it is loaded, so all ranks end identical. Then quantizers that TensorRT
    wants on one scale (sharing.py) get the group maximum. Returns {quantizer name: amax (max over channels)}.
    """
    root, meta = unwrap(model), get_meta(model)
    _check_spec(meta, spec)
    meta.impl.check_calibrator(spec.calibrator)
    warn_if_cold_bn(root, "eval-mode calibration")
    named = quantizers(root)
    activations = {name: q for name, (q, role) in named.items() if role != WEIGHT}
    tracer = SharedInputTracer(activations) if spec.share_concat_add_inputs else None
    with _calibration_mode(root, named, meta, spec):
        _collect_weights(root, named)
        for index, batch in enumerate(batches):
            with tracer if tracer is not None and index == 0 else nullcontext():
                forward_fn(model, batch)
        _load_synced_amax(root, named, spec, sync)
    meta.spec, meta.shared_groups = spec, tracer.groups() if tracer is not None else []
    share_amax(named, meta.shared_groups)
    return {name: float(quantizer._amax.max()) for name, (quantizer, _) in named.items()}
