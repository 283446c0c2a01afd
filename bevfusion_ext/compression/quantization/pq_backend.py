"""pytorch-quantization 2.1.3 backend: our own in-place module conversion (no `quant_modules.initialize` patching)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from absl import logging as absl_logging
from pytorch_quantization import calib
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import nn

from .backend import QuantBackend, weight_axis
from .forwards import KIND_QUANTIZERS, bind_methods
from .sparse import with_features
from .spec import QuantSpec
from .targets import LAYER, SPARSE_CONV, layer_type, quant_forward

QUANT_CLASSES = {
    nn.Conv1d: quant_nn.QuantConv1d, nn.Conv2d: quant_nn.QuantConv2d, nn.Conv3d: quant_nn.QuantConv3d,
    nn.ConvTranspose1d: quant_nn.QuantConvTranspose1d, nn.ConvTranspose2d: quant_nn.QuantConvTranspose2d,
    nn.Linear: quant_nn.QuantLinear,
}


@cache
def _quant_layer_class(cls: type) -> type:
    """quant_nn's class for a torch layer type; for a subclass (mmcv's wrappers) one deriving from both, which runs
    quant_nn's forward of the base type (mmcv's wrappers differ from it only for empty inputs on torch < 1.5)."""
    quant = QUANT_CLASSES[getattr(nn, layer_type(cls))]
    return quant if cls in QUANT_CLASSES else type(f"Quant{cls.__name__}", (quant, cls), {})


def _sparse_weight(self: nn.Module) -> torch.Tensor:
    """`weight` of a quantized sparse conv: fake-quantized inside its forward, the raw Parameter elsewhere."""
    weight = self._parameters["weight"]
    return self._weight_quantizer(weight) if self.__dict__.get("_quantizing_weight") else weight


@cache
def _quant_sparse_class(cls: type) -> type:
    """Subclass of an spconv 1.x conv class whose forward quantizes the input features and the weight."""

    def forward(self: nn.Module, input: Any) -> Any:
        features = self._input_quantizer(input.features)
        self._quantizing_weight = True
        try:
            return cls.forward(self, with_features(input, features))
        finally:
            self._quantizing_weight = False

    return type(f"Quant{cls.__name__}", (cls,), {"forward": forward, "weight": property(_sparse_weight)})


@cache
def _quant_forward_class(cls: type) -> type:
    """Subclass of a known attention / residual class with its quantized methods."""
    return type(f"Quant{cls.__name__}", (cls,), bind_methods(quant_forward(cls), cls))


def _convert_layer(module: nn.Module, kind: str, axis: int | None) -> None:
    """Turn a float layer into its quantized class in place, keeping its Parameter objects, hooks and device.

    This is what QuantMixin.init_quantizer sets up, without re-running the float constructor.
    """
    module.__class__ = _quant_layer_class(type(module)) if kind == LAYER else _quant_sparse_class(type(module))
    module._fake_quant = True
    module._input_quantizer = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8))
    module._weight_quantizer = quant_nn.TensorQuantizer(
        QuantDescriptor(num_bits=8, axis=None if axis is None else (axis,)))


def _convert_forward(module: nn.Module, kind: str) -> None:
    """Turn a known attention / residual module into its quantized subclass in place, with per-tensor quantizers."""
    module.__class__ = _quant_forward_class(type(module))
    for attr in KIND_QUANTIZERS[kind]:
        setattr(module, attr, quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8)))


class PytorchQuantizationBackend(QuantBackend):
    """NVIDIA pytorch-quantization (deprecated upstream in favour of ModelOpt, used by CUDA-BEVFusion)."""

    name = "pytorch_quantization"
    input_attr = "_input_quantizer"
    weight_attr = "_weight_quantizer"
    calib = calib

    def unavailable_calibrators(self) -> dict[str, str]:
        """pytorch-quantization 2.1.3 computes the mse amax on CUDA only (its calib/histogram.py calls .cuda())."""
        if torch.cuda.is_available():
            return {}
        return {"mse": "needs a CUDA GPU (pytorch-quantization 2.1.3); on the CPU use 'entropy' or 'percentile', "
                       "or the modelopt backend, whose mse runs on the CPU"}

    def insert(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec) -> None:
        """Convert each target in place; quantizers compute amax dynamically until calibrated."""
        for name, kind in targets.items():
            module = model.get_submodule(name)
            if kind in (LAYER, SPARSE_CONV):
                _convert_layer(module, kind, weight_axis(module, kind, spec))
            else:
                _convert_forward(module, kind)

    def restore(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec, backend_state: dict) -> None:
        """The conversion is fully described by targets and spec; amax buffers are loaded by the caller."""
        self.insert(model, targets, spec)

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """pytorch-quantization logs a warning per quantizer on every calibration switch; keep errors only."""
        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)
        try:
            yield
        finally:
            absl_logging.set_verbosity(verbosity)

    @contextmanager
    def export_context(self) -> Iterator[None]:
        """TensorQuantizer.use_fb_fake_quant makes quantizers trace to torch fake-quant ops, i.e. ONNX Q/DQ."""
        previous = quant_nn.TensorQuantizer.use_fb_fake_quant
        quant_nn.TensorQuantizer.use_fb_fake_quant = True
        try:
            yield
        finally:
            quant_nn.TensorQuantizer.use_fb_fake_quant = previous
