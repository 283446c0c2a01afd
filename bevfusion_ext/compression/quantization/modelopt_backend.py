"""ModelOpt backend: `mtq.quantize` with an explicit per-quantizer config; every class ModelOpt does not handle by
itself (layer subclasses, sparse convs, attention and residual forwards) is added to its QuantModuleRegistry."""

from __future__ import annotations

from functools import cache
from typing import Any

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
from modelopt.torch.quantization import calib
from modelopt.torch.quantization.nn import QuantLinearConvBase, QuantModule, QuantModuleRegistry, TensorQuantizer
from torch import nn

from .backend import WEIGHT, QuantBackend, weight_axis
from .forwards import ATTENTION, KIND_QUANTIZERS, RESIDUAL, ROUTE, bind_methods, class_key
from .sparse import with_features
from .spec import SPARSE_LAYER_TYPES, QuantSpec
from .targets import layer_type, quant_forward

# Classes this package put into ModelOpt's registry -> the quantized class registered for them.
_REGISTERED: dict[type, type] = {}


@cache
def _quant_forward_class(cls: type, kind: str) -> type:
    """ModelOpt quantized class for a known attention / residual class: its quantized methods, `kind`'s quantizers."""

    def _setup(self: QuantModule) -> None:
        """Called by ModelOpt on conversion: one per-tensor quantizer per attribute the methods call."""
        for attr in KIND_QUANTIZERS[kind]:
            self._register_temp_attribute(attr, TensorQuantizer())

    return type(f"Quant{cls.__name__}", (QuantModule,), {**bind_methods(quant_forward(cls), cls), "_setup": _setup})


@cache
def _quant_sparse_class(cls: type) -> type:
    """ModelOpt quantized class for an spconv 1.x conv: features through `input_quantizer`, and `weight` quantized
    inside the forward by QuantLinearConvBase's dynamic attribute (the raw Parameter outside it)."""

    def forward(self: QuantLinearConvBase, input: Any) -> Any:
        features = self.input_quantizer(input.features)
        with self.quantize_weight():
            return cls.forward(self, with_features(input, features))

    return type(f"Quant{cls.__name__}", (QuantLinearConvBase,), {"forward": forward})


def _quantized_class(cls: type, spec: QuantSpec) -> type | None:
    """What `spec` wants ModelOpt to convert `cls` to, when ModelOpt's own registry does not already cover it."""
    qf = quant_forward(cls)
    if qf is not None:
        if qf.kind == RESIDUAL:
            kind = RESIDUAL if spec.residual_adds else None
        else:
            kind = ATTENTION if spec.attention_matmuls else ROUTE if qf.routes else None
        return None if kind is None else _quant_forward_class(cls, kind)
    layer = layer_type(cls)
    if layer not in spec.layers:
        return None
    if layer in SPARSE_LAYER_TYPES:
        return _quant_sparse_class(cls)
    # A subclass that overrides forward (mmcv's wrappers) is not resolved by ModelOpt: give it the base's class.
    base = getattr(nn, layer)
    if cls is base or (cls in QuantModuleRegistry and cls not in _REGISTERED):
        return None
    return QuantModuleRegistry.get(base)


def _sync_registry(model: nn.Module, spec: QuantSpec) -> None:
    """Register exactly the classes `spec` wants among the model's, replacing or removing our earlier registrations.

    ModelOpt converts every registered type in the model, so the registry decides which quantizers exist; making it
    follow the spec keeps quantize and restore (possibly in another process) inserting the same quantizers.
    """
    for cls in {type(m) for m in model.modules()}:
        wanted, current = _quantized_class(cls, spec), _REGISTERED.get(cls)
        if wanted is current:
            continue
        if current is not None:
            QuantModuleRegistry.unregister(cls)
            del _REGISTERED[cls]
        if wanted is not None:
            QuantModuleRegistry.register({cls: class_key(cls)})(wanted)
            _REGISTERED[cls] = wanted


class ModeloptBackend(QuantBackend):
    """NVIDIA ModelOpt (`modelopt.torch.quantization`); state is `mto.modelopt_state`."""

    name = "modelopt"
    input_attr = "input_quantizer"
    weight_attr = "weight_quantizer"
    calib = calib

    def insert(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec) -> None:
        """`mtq.quantize` with every quantizer off except ours, and no calibration yet (algorithm None)."""
        _sync_registry(model, spec)
        entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
        for name, role in self.quantizer_names(targets).items():
            module_name = name.rpartition(".")[0]
            axis = weight_axis(model.get_submodule(module_name), targets[module_name], spec) if role == WEIGHT else None
            entries.append({"quantizer_name": name, "cfg": {"num_bits": 8, "axis": axis}})
        mtq.quantize(model, {"quant_cfg": entries, "algorithm": None}, forward_loop=None)

    def restore(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec, backend_state: dict) -> None:
        """`mto.restore_from_modelopt_state` after putting the registry in the state the model was quantized with."""
        _sync_registry(model, spec)
        mto.restore_from_modelopt_state(model, backend_state)

    def backend_state(self, model: nn.Module) -> dict:
        """`mto.modelopt_state`: the quantize config and every quantizer's properties (weights_only loadable)."""
        return mto.modelopt_state(model)
