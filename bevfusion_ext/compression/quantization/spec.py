"""QuantSpec: the one description of what to quantize and how, shared by every entry point and saved with the model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

BACKENDS = ("modelopt", "pytorch_quantization")
CALIBRATORS = ("max", "percentile", "entropy", "mse")
# torch layer types (their subclasses too, e.g. mmcv's Linear / ConvTranspose2d wrappers) and BEVFusion's spconv 1.x
# sparse convolutions (weights per output channel on the Cout axis of [*kernel, Cin, Cout], as CUDA-BEVFusion does).
TORCH_LAYER_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "Linear")
SPARSE_LAYER_TYPES = ("SparseConv3d", "SubMConv3d")
LAYER_TYPES = TORCH_LAYER_TYPES + SPARSE_LAYER_TYPES
WEIGHT_GRANULARITY = ("per_channel", "per_tensor")
ACTIVATION_GRANULARITY = ("per_tensor",)
# Fields that decide which quantizers exist; calibration settings may change between quantize and calibrate.
STRUCTURE_FIELDS = ("backend", "layers", "attention_matmuls", "residual_adds", "weight", "activation", "exclude",
                    "fold_bn")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    """Reject a value outside `choices`, naming the field and the allowed values."""
    if value not in choices:
        raise ValueError(f"QuantSpec.{name}={value!r} is not supported; choose one of {list(choices)}")


@dataclass
class QuantSpec:
    """INT8 symmetric fake quantization as TensorRT consumes it (see docs/quantization.md for every field)."""

    backend: str = "modelopt"
    layers: list[str] = field(default_factory=lambda: ["Conv2d", "ConvTranspose2d", "Linear", "Conv1d"])
    attention_matmuls: bool = False
    residual_adds: bool = False
    weight: str = "per_channel"
    activation: str = "per_tensor"
    calibrator: str = "max"
    percentile: float = 99.99
    exclude: list[str] = field(default_factory=list)
    share_concat_add_inputs: bool = True
    fold_bn: bool = False

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("weight", self.weight, WEIGHT_GRANULARITY)
        _check_choice("activation", self.activation, ACTIVATION_GRANULARITY)
        _check_choice("calibrator", self.calibrator, CALIBRATORS)
        for layer in self.layers:
            _check_choice("layers[]", layer, LAYER_TYPES)
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"QuantSpec.percentile={self.percentile} must be in (0, 100]")
        self.layers, self.exclude = list(self.layers), list(self.exclude)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so the spec can travel inside a weights_only checkpoint."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """Rebuild a spec from `to_dict()`, naming unknown keys instead of failing with a bare TypeError."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown QuantSpec keys {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def structure(self) -> dict[str, Any]:
        """The fields that decide where quantizers sit (two specs with equal structure fit the same model)."""
        return {name: getattr(self, name) for name in STRUCTURE_FIELDS}
