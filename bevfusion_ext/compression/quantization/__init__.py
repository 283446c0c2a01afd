"""Framework-free INT8 fake quantization (ModelOpt or pytorch-quantization) for TensorRT / Orin export.

See docs/quantization.md. Nothing here imports mmcv, mmdet or the model code.
"""

from .api import (
    freeze_quantizers,
    quantization_report,
    quantize_model,
    quantized_layers,
    quantizer_amax,
    quantizer_state,
    restore_quantizers,
    set_quantizers_enabled,
)
from .calibration import calibrate
from .export import export_qdq_onnx, qdq_node_counts
from .sensitivity import layer_sensitivity
from .spec import BACKENDS, CALIBRATORS, LAYER_TYPES, QuantSpec
from .targets import format_report

__all__ = [
    "BACKENDS",
    "CALIBRATORS",
    "LAYER_TYPES",
    "QuantSpec",
    "calibrate",
    "export_qdq_onnx",
    "format_report",
    "freeze_quantizers",
    "layer_sensitivity",
    "qdq_node_counts",
    "quantization_report",
    "quantize_model",
    "quantized_layers",
    "quantizer_amax",
    "quantizer_state",
    "restore_quantizers",
    "set_quantizers_enabled",
]
