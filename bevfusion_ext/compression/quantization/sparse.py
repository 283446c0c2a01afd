"""BEVFusion's spconv 1.x sparse convolutions (mmdet3d.ops.spconv), recognised by class name, quantized as
CUDA-BEVFusion's qat/lean/quantize.py does: input features per tensor, weights per output channel on the Cout axis
of the [*kernel, Cin, Cout] layout (axis 4 for 3-D kernels)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .forwards import class_key

SPCONV_MODULE = "mmdet3d.ops.spconv.conv"
SPCONV_BASE = f"{SPCONV_MODULE}.SparseConvolution"


def sparse_conv_type(cls: type) -> str | None:
    """The spconv 1.x class a SparseConvolution class is or derives from (e.g. 'SubMConv3d'), else None."""
    spconv = [base for base in cls.__mro__ if base.__module__ == SPCONV_MODULE]
    if not any(class_key(base) == SPCONV_BASE for base in spconv):
        return None
    return spconv[0].__name__


def layout_problem(module: nn.Module) -> str | None:
    """Why the weight is not spconv 1.x's [*kernel, Cin, Cout] (so its Cout axis is unknown), else None."""
    expected = (*module.kernel_size, module.in_channels, module.out_channels)
    if tuple(module.weight.shape) != tuple(expected):
        return f"weight shape {tuple(module.weight.shape)} is not spconv 1.x's [*kernel, Cin, Cout] = {expected}"
    return None


def output_channel_axis(module: nn.Module) -> int:
    """The Cout axis of the weight (its last)."""
    return module.weight.dim() - 1


def with_features(sparse: Any, features: torch.Tensor) -> Any:
    """A shallow copy of a SparseConvTensor carrying other features; the caller's tensor is left as it was and the
    rulebook cache (indice_dict) stays shared, as between spconv layers."""
    out = copy.copy(sparse)
    out.features = features
    return out
