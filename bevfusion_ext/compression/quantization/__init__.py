"""Framework-free INT8 fake quantization (ModelOpt or pytorch-quantization) for TensorRT / Orin export.

See docs/quantization.md. Nothing here imports mmcv, mmdet or the model code.
"""

from .api import (
    freeze_quantizers,
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

__all__ = [
    "BACKENDS",
    "CALIBRATORS",
    "LAYER_TYPES",
    "QuantSpec",
    "calibrate",
    "export_qdq_onnx",
    "freeze_quantizers",
    "layer_sensitivity",
    "qdq_node_counts",
    "quantize_model",
    "quantized_layers",
    "quantizer_amax",
    "quantizer_state",
    "restore_quantizers",
    "set_quantizers_enabled",
]
