"""Quantized residual Adds of known blocks, placed as CUDA-BEVFusion's qat/lean/quantize.py places them.

TensorRT runs an elementwise Add in INT8 when its inputs come through Q/DQ on one scale, and fuses a residual Add
into the convolution before it when the residual (identity) input is Q/DQ'd (TensorRT developer guide, "Q/DQ layer
placement": quantize the residual input of residual-like multi-input structures). Hence:
  * Swin blocks (attention and FFN residuals) and spconv SparseBasicBlocks: both Add inputs pass through one
    `residual_quantizer` (CUDA-BEVFusion's QuantAdd, one amax);
  * ResNet BasicBlock / Bottleneck: only the identity passes through `residual_quantizer`; the conv output is fused
    (CUDA-BEVFusion's Bottleneck `residual_quantizer`; without a downsample it reads conv1's input, so the sharing
    rule ties the two amax, as CUDA-BEVFusion shares that quantizer).
BEVFusion's SECOND / SECONDFPN have no residual blocks; the TransFusion decoder's Adds feed LayerNorms and stay float.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .forwards import RESIDUAL, RESIDUAL_QUANTIZER, QuantForward, quantized_add


def swin_block_inner(self: nn.Module, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
    """Our reference SwinBlock._forward: attention residual with a quantized Add (the FFN quantizes its own)."""
    x = quantized_add(self, x, self.attn(self.norm1(x), hw_shape))
    return self.ffn(self.norm2(x), identity=x)


def mmdet_swin_block_forward(self: nn.Module, x: torch.Tensor, hw_shape: tuple[int, int]) -> torch.Tensor:
    """mmdet.models.backbones.swin.SwinBlock.forward with the attention residual Add quantized."""

    def inner(x: torch.Tensor) -> torch.Tensor:
        identity = x
        x = quantized_add(self, self.attn(self.norm1(x), hw_shape), identity)
        return self.ffn(self.norm2(x), identity=x)

    if self.with_cp and x.requires_grad:
        return checkpoint(inner, x)
    return inner(x)


def reference_ffn_forward(self: nn.Module, x: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """bevfusion_ext.models.swin.FFN.forward with the residual Add quantized."""
    return quantized_add(self, identity, self.drop(self.layers(x)))


def mmcv_ffn_forward(self: nn.Module, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
    """mmcv.cnn.bricks.transformer.FFN.forward (add_identity=True) with the residual Add quantized."""
    out = self.layers(x)
    return quantized_add(self, x if identity is None else identity, self.dropout_layer(out))


def _ffn_unsupported(module: nn.Module) -> str | None:
    """An mmcv FFN built with add_identity=False has no residual Add."""
    return None if module.add_identity else "no residual Add (add_identity=False)"


def sparse_basic_block_forward(self: nn.Module, x: Any) -> Any:
    """mmdet3d.ops.sparse_block.SparseBasicBlock.forward with the residual Add quantized (CUDA-BEVFusion's
    quant_add)."""
    identity = x.features
    out = self.conv1(x)
    out.features = self.relu(self.norm1(out.features))
    out = self.conv2(out)
    out.features = self.norm2(out.features)
    if self.downsample is not None:
        identity = self.downsample(x)
    out.features = self.relu(quantized_add(self, out.features, identity))
    return out


def _identity_quantized(self: nn.Module, inner: Any, x: torch.Tensor) -> torch.Tensor:
    """mmdet ResNet blocks' outer forward: optional checkpointing, then the final ReLU."""
    out = checkpoint(inner, x) if self.with_cp and x.requires_grad else inner(x)
    return self.relu(out)


def resnet_basic_block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmdet.models.backbones.resnet.BasicBlock.forward with the identity input of the Add quantized."""

    def inner(x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.relu(self.norm1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        out += getattr(self, RESIDUAL_QUANTIZER)(identity)
        return out

    return _identity_quantized(self, inner, x)


def resnet_bottleneck_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """mmdet.models.backbones.resnet.Bottleneck.forward with the identity input of the Add quantized."""

    def plugins(out: torch.Tensor, names: str) -> torch.Tensor:
        return self.forward_plugin(out, getattr(self, names)) if self.with_plugins else out

    def inner(x: torch.Tensor) -> torch.Tensor:
        out = plugins(self.relu(self.norm1(self.conv1(x))), "after_conv1_plugin_names")
        out = plugins(self.relu(self.norm2(self.conv2(out))), "after_conv2_plugin_names")
        out = plugins(self.norm3(self.conv3(out)), "after_conv3_plugin_names")
        identity = x if self.downsample is None else self.downsample(x)
        out += getattr(self, RESIDUAL_QUANTIZER)(identity)
        return out

    return _identity_quantized(self, inner, x)


RESIDUAL_FORWARDS = {
    "bevfusion_ext.models.swin.SwinBlock": QuantForward(RESIDUAL, {"_forward": swin_block_inner}),
    "bevfusion_ext.models.swin.FFN": QuantForward(RESIDUAL, {"forward": reference_ffn_forward}),
    "mmdet.models.backbones.swin.SwinBlock": QuantForward(RESIDUAL, {"forward": mmdet_swin_block_forward}),
    "mmcv.cnn.bricks.transformer.FFN": QuantForward(RESIDUAL, {"forward": mmcv_ffn_forward},
                                                    unsupported=_ffn_unsupported),
    "mmdet3d.ops.sparse_block.SparseBasicBlock": QuantForward(RESIDUAL, {"forward": sparse_basic_block_forward}),
    "mmdet.models.backbones.resnet.BasicBlock": QuantForward(RESIDUAL, {"forward": resnet_basic_block_forward}),
    "mmdet.models.backbones.resnet.Bottleneck": QuantForward(RESIDUAL, {"forward": resnet_bottleneck_forward}),
}
