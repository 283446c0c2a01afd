"""Q/DQ ONNX export of a quantized (sub-)module for TensorRT explicit quantization."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from .backend import detect_backend
from .targets import eval_mode

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _check_calibrated(model: nn.Module) -> None:
    """An enabled quantizer without amax would export a per-batch dynamic range TensorRT cannot use."""
    missing = [name for name, m in model.named_modules()
               if type(m).__name__ == "TensorQuantizer" and not m._disabled and "_amax" not in m._buffers]
    if missing:
        raise RuntimeError(f"{len(missing)} enabled quantizers are not calibrated (e.g. {missing[:3]}); "
                           "calibrate() or restore_quantizers() + load the weights first")


def qdq_node_counts(path: str) -> dict[str, int]:
    """How many QuantizeLinear / DequantizeLinear nodes an ONNX file has."""
    nodes = onnx.load(path).graph.node
    return {op: sum(node.op_type == op for node in nodes) for op in QDQ_OPS}


def export_qdq_onnx(model: nn.Module, example_inputs: tuple, path: str, input_names: Sequence[str],
                    output_names: Sequence[str]) -> None:
    """Export with opset 17 and the TorchScript exporter (dynamo=False: amax checks are data-dependent for dynamo).

    The model is exported in eval mode (each module's mode is restored after); raises if the file has no Q/DQ.
    """
    backend = detect_backend(model)
    _check_calibrated(model)
    with eval_mode(model), backend.export_context(), backend.quiet(), torch.no_grad(), warnings.catch_warnings():
        # Tracing bakes each calibrated amax in as a constant, which is the point; the libraries warn about it.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning, module=r"(modelopt|pytorch_quantization)\.")
        torch.onnx.export(model, example_inputs, path, opset_version=17, dynamo=False,
                          input_names=list(input_names), output_names=list(output_names))
    counts = qdq_node_counts(path)
    if not all(counts.values()):
        raise RuntimeError(f"{path} has no Q/DQ pairs ({counts}); are all quantizers of this module disabled?")
