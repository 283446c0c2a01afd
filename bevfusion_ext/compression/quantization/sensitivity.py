"""Per-layer quantization sensitivity: which layers to keep in FP16."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .api import quantize_model, quantized_layers, set_quantizers_enabled
from .calibration import calibrate
from .spec import QuantSpec
from .targets import unwrap


def layer_sensitivity(model: nn.Module | Callable[[], nn.Module], spec: QuantSpec, batches: Iterable[Any],
                      forward_fn: Callable[[nn.Module, Any], Any], metric_fn: Callable[[nn.Module], float],
                      layers: Iterable[str] | None = None) -> list[tuple[str, float]]:
    """[(layer, metric drop)] most sensitive first, the drop measured with only that layer quantized (calibrated).

    `model` is a float model (deep-copied, left untouched) or a factory building one; `metric_fn(model)` returns a
    higher-is-better score (e.g. NDS on a few validation batches). The caller keeps the top-k in float via
    QuantSpec.exclude.
    """
    qmodel = copy.deepcopy(unwrap(model)) if isinstance(model, nn.Module) else model()
    quantize_model(qmodel, spec)
    calibrate(qmodel, spec, batches, forward_fn)
    names = quantized_layers(qmodel) if layers is None else list(layers)
    set_quantizers_enabled(qmodel, False)
    baseline = metric_fn(qmodel)
    drops = []
    for name in names:
        set_quantizers_enabled(qmodel, True, [name])
        drops.append((name, baseline - metric_fn(qmodel)))
        set_quantizers_enabled(qmodel, False, [name])
    return sorted(drops, key=lambda item: item[1], reverse=True)
