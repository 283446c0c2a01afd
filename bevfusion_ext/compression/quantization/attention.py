"""Quantized forwards of the attention modules, so TensorRT can run q @ k^T and attn @ v in INT8.

Both backends turn an attention module into a subclass whose forward is taken from ATTENTION_FORWARDS (ModelOpt via
its per-type QuantModuleRegistry, pytorch-quantization via our module conversion); the math is the model's own,
with the four matmul operands passed through per-tensor quantizers named ATTENTION_QUANTIZERS. The model classes are
matched by qualified name so this package never imports the model code (and with it mmcv).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


def _quantized_scores(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(q @ k^T) with both operands fake-quantized; q arrives already scaled."""
    return module.q_bmm_quantizer(q) @ module.k_bmm_quantizer(k).transpose(-2, -1)


def _quantized_context(module: nn.Module, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(attn @ v) with both operands fake-quantized."""
    return module.softmax_quantizer(attn) @ module.v_bmm_quantizer(v)


def window_msa_forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """bevfusion_ext.models.swin.WindowMSA.forward with quantized matmul operands."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = _quantized_scores(self, q * self.scale, k)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        num_windows = mask.shape[0]
        attn = attn.view(B // num_windows, num_windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = _quantized_context(self, attn, v).transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def transfusion_mha_forward(self: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor) -> torch.Tensor:
    """bevfusion_ext.models.transfusion.MultiheadAttention.forward with quantized matmul operands."""
    w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    b_q, b_k, b_v = self.in_proj_bias.chunk(3)
    q = self._split_heads(F.linear(query, w_q, b_q))
    k = self._split_heads(F.linear(key, w_k, b_k))
    v = self._split_heads(F.linear(value, w_v, b_v))
    attn = self.dropout(_quantized_scores(self, q * self.head_dim ** -0.5, k).softmax(dim=-1))
    out = _quantized_context(self, attn, v).transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim)
    return self.out_proj(out)


ATTENTION_FORWARDS: dict[str, Callable[..., torch.Tensor]] = {
    "bevfusion_ext.models.swin.WindowMSA": window_msa_forward,
    "bevfusion_ext.models.transfusion.MultiheadAttention": transfusion_mha_forward,
}


def class_key(cls: type) -> str:
    """The qualified class name ATTENTION_FORWARDS is keyed by."""
    return f"{cls.__module__}.{cls.__qualname__}"


def attention_forward(cls: type) -> Callable[..., torch.Tensor] | None:
    """The quantized forward for exactly this attention class (a subclass may change the math), else None."""
    return ATTENTION_FORWARDS.get(class_key(cls))
