"""The backend interface: what differs between ModelOpt and pytorch-quantization; the rest of the package is shared.

Both libraries' TensorQuantizer expose the same calibration API (enable/disable, enable_calib/disable_calib,
enable_quant/disable_quant, `_calibrator.compute_amax`, an `_amax` buffer) and ship MaxCalibrator/HistogramCalibrator
with the same constructor, so calibration, sharing, state and sensitivity are written once against that API.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from functools import cache
from types import ModuleType
from typing import Any, ClassVar

from torch import nn

from .forwards import KIND_QUANTIZERS
from .sparse import output_channel_axis
from .spec import BACKENDS, QuantSpec
from .targets import SPARSE_CONV, join

INPUT, WEIGHT = "input", "weight"  # quantizer roles of layers; a forward's quantizers have its kind as role


def weight_axis(module: nn.Module, kind: str, spec: QuantSpec) -> int | None:
    """The output-channel axis of a target's weight quantizer (None: per tensor)."""
    if spec.weight != "per_channel":
        return None
    return output_channel_axis(module) if kind == SPARSE_CONV else 0


class QuantBackend(ABC):
    """One quantization library: how it inserts, restores and exports quantizers."""

    name: ClassVar[str]  # also the top-level package of the library's TensorQuantizer
    input_attr: ClassVar[str]
    weight_attr: ClassVar[str]
    calib: ModuleType  # the library's calibrator module (MaxCalibrator, HistogramCalibrator)

    def quantizer_names(self, targets: dict[str, str]) -> dict[str, str]:
        """{quantizer name: role} for the quantizers `insert` puts on `targets` ({module name: kind})."""
        names = {}
        for module_name, kind in targets.items():
            roles = ([(attr, kind) for attr in KIND_QUANTIZERS[kind]] if kind in KIND_QUANTIZERS
                     else [(self.input_attr, INPUT), (self.weight_attr, WEIGHT)])
            names.update({join(module_name, attr): role for attr, role in roles})
        return names

    def new_calibrator(self, quantizer: nn.Module, histogram: bool) -> Any:
        """A fresh calibrator for `quantizer`: max (per-channel capable) or histogram (per-tensor only)."""
        cls = self.calib.HistogramCalibrator if histogram else self.calib.MaxCalibrator
        return cls(quantizer._num_bits, quantizer._axis, quantizer._unsigned)

    def check_calibrator(self, method: str) -> None:
        """Fail before any forward pass if this library cannot run calibrator `method` on this machine."""
        reason = self.unavailable_calibrators().get(method)
        if reason:
            raise ValueError(f"calibrator {method!r} of the {self.name} backend {reason}")

    def unavailable_calibrators(self) -> dict[str, str]:
        """{calibrator: why it cannot run here}; every calibrator runs unless a backend says otherwise."""
        return {}

    @abstractmethod
    def insert(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec) -> None:
        """Convert every target module in place to its quantized form with uncalibrated quantizers."""

    @abstractmethod
    def restore(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec, backend_state: dict) -> None:
        """Rebuild the quantizers `insert` made, on a freshly built float model, from `backend_state`."""

    def backend_state(self, model: nn.Module) -> dict:
        """Library-specific state `restore` needs besides targets and spec (plain types and tensors only)."""
        return {}

    def quiet(self) -> AbstractContextManager:
        """Silence the library's per-quantizer log lines around bulk operations."""
        return nullcontext()

    def export_context(self) -> AbstractContextManager:
        """Make the quantizers trace to ONNX QuantizeLinear/DequantizeLinear pairs."""
        return nullcontext()


_IMPLEMENTATIONS = {
    "modelopt": (".modelopt_backend", "ModeloptBackend"),
    "pytorch_quantization": (".pq_backend", "PytorchQuantizationBackend"),
}
assert tuple(_IMPLEMENTATIONS) == BACKENDS


@cache
def get_backend(name: str) -> QuantBackend:
    """The backend called `name`, importing its library only when first asked for."""
    if name not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown quantization backend {name!r}; choose one of {list(_IMPLEMENTATIONS)}")
    module, cls = _IMPLEMENTATIONS[name]
    return getattr(importlib.import_module(module, __package__), cls)()


def detect_backend(model: nn.Module) -> QuantBackend:
    """The backend whose quantizers `model` (any sub-module of a quantized model) contains."""
    libraries = {type(m).__module__.split(".")[0] for m in model.modules() if type(m).__name__ == "TensorQuantizer"}
    found = [name for name in BACKENDS if name in libraries]
    if len(found) != 1:
        raise ValueError(f"expected quantizers of exactly one backend in {type(model).__name__}, found {found}; "
                         "quantize the model with quantize_model() (or restore_quantizers()) first")
    return get_backend(found[0])

