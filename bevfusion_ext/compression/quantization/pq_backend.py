"""pytorch-quantization 2.1.3 backend: our own in-place module conversion (no `quant_modules.initialize` patching)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from absl import logging as absl_logging
from pytorch_quantization import calib
from pytorch_quantization import nn as quant_nn
from pytorch_quantization.tensor_quant import QuantDescriptor
from torch import nn

from .attention import ATTENTION_QUANTIZERS, attention_forward
from .backend import QuantBackend
from .spec import QuantSpec
from .targets import ATTENTION

QUANT_CLASSES = {
    nn.Conv1d: quant_nn.QuantConv1d, nn.Conv2d: quant_nn.QuantConv2d, nn.Conv3d: quant_nn.QuantConv3d,
    nn.ConvTranspose1d: quant_nn.QuantConvTranspose1d, nn.ConvTranspose2d: quant_nn.QuantConvTranspose2d,
    nn.Linear: quant_nn.QuantLinear,
}


@cache
def _quant_attention_class(cls: type) -> type:
    """Subclass of attention class `cls` whose forward quantizes the matmul operands."""
    return type(f"Quant{cls.__name__}", (cls,), {"forward": attention_forward(cls)})


def _convert_layer(module: nn.Module, weight_axis: tuple[int, ...] | None) -> None:
    """Turn a float layer into its quant_nn class in place, keeping its Parameter objects, hooks and device.

    This is what QuantMixin.init_quantizer sets up, without re-running the float constructor.
    """
    module.__class__ = QUANT_CLASSES[type(module)]
    module._fake_quant = True
    module._input_quantizer = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8))
    module._weight_quantizer = quant_nn.TensorQuantizer(QuantDescriptor(num_bits=8, axis=weight_axis))


def _convert_attention(module: nn.Module) -> None:
    """Turn a known attention module into its quantized subclass in place, with per-tensor operand quantizers."""
    module.__class__ = _quant_attention_class(type(module))
    for attr in ATTENTION_QUANTIZERS:
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
        weight_axis = (0,) if spec.weight == "per_channel" else None
        for name, kind in targets.items():
            module = model.get_submodule(name)
            if kind == ATTENTION:
                _convert_attention(module)
            else:
                _convert_layer(module, weight_axis)

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
