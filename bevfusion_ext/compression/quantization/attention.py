"""Quantized attention forwards, so TensorRT can run q @ k^T and attn @ v in INT8.

The four matmul operands pass through per-tensor quantizers (ATTENTION_QUANTIZERS, TensorRT's MHA fusion pattern).
mmdet's WindowMSA computes exactly what our reference WindowMSA computes (its bias view uses window_size, which is N),
so both use one forward. BEVFusion's TransFusion MultiheadAttention applies `out_proj.weight` with F.linear; its
quantized forward calls the `out_proj` module instead, so that Linear's own quantizers see its input and weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .forwards import ATTENTION, QuantForward, operand


def _scores(module: nn.Module, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """(q @ k^T) with both operands fake-quantized; q arrives already scaled."""
    return operand(module, "q_bmm_quantizer", q) @ operand(module, "k_bmm_quantizer", k).transpose(-2, -1)


def _context(module: nn.Module, attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(attn @ v) with both operands fake-quantized."""
    return operand(module, "softmax_quantizer", attn) @ operand(module, "v_bmm_quantizer", v)


def window_msa_forward(self: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """WindowMSA.forward (ours and mmdet's) with quantized matmul operands."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = _scores(self, q * self.scale, k)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
    attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        num_windows = mask.shape[0]
        attn = attn.view(B // num_windows, num_windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, self.num_heads, N, N)
    attn = self.attn_drop(self.softmax(attn))
    x = _context(self, attn, v).transpose(1, 2).reshape(B, N, C)
    return self.proj_drop(self.proj(x))


def transfusion_mha_forward(self: nn.Module, query: torch.Tensor, key: torch.Tensor,
                            value: torch.Tensor) -> torch.Tensor:
    """bevfusion_ext.models.transfusion.MultiheadAttention.forward with quantized matmul operands."""
    w_q, w_k, w_v = self.in_proj_weight.chunk(3)
    b_q, b_k, b_v = self.in_proj_bias.chunk(3)
    q = self._split_heads(F.linear(query, w_q, b_q))
    k = self._split_heads(F.linear(key, w_k, b_k))
    v = self._split_heads(F.linear(value, w_v, b_v))
    attn = self.dropout(_scores(self, q * self.head_dim ** -0.5, k).softmax(dim=-1))
    out = _context(self, attn, v).transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim)
    return self.out_proj(out)


def _rows(t: torch.Tensor | None, start: int, end: int | None) -> torch.Tensor | None:
    """Rows start:end of an in-projection weight or bias (None stays None)."""
    return None if t is None else t[start:end]


def _in_projection(self: nn.Module, query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v exactly as BEVFusion's multi_head_attention_forward projects them (one GEMM when inputs are equal)."""
    e, w, b = self.embed_dim, self.in_proj_weight, self.in_proj_bias
    if torch.equal(query, key) and torch.equal(key, value):
        return F.linear(query, w, b).chunk(3, dim=-1)
    q = F.linear(query, w[:e, :], _rows(b, 0, e))
    if torch.equal(key, value):
        k, v = F.linear(key, w[e:, :], _rows(b, e, None)).chunk(2, dim=-1)
        return q, k, v
    return q, F.linear(key, w[e:2 * e, :], _rows(b, e, 2 * e)), F.linear(value, w[2 * e:, :], _rows(b, 2 * e, None))


def bevfusion_mha_forward(self: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                          attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """mmdet3d.models.utils.transformer.MultiheadAttention.forward (BEVFusion) with quantized matmul operands and
    out_proj run as a module; inputs [L, B, E] (sequence first)."""
    tgt_len, bsz, embed_dim = query.size()
    heads, head_dim = self.num_heads, embed_dim // self.num_heads
    q, k, v = _in_projection(self, query, key, value)
    q = (q * float(head_dim) ** -0.5).contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    weights = torch.bmm(operand(self, "q_bmm_quantizer", q), operand(self, "k_bmm_quantizer", k).transpose(1, 2))
    src_len = weights.shape[-1]
    if attn_mask is not None:
        weights += attn_mask.unsqueeze(0)
    if key_padding_mask is not None:
        weights = weights.view(bsz, heads, tgt_len, src_len).masked_fill(
            key_padding_mask.unsqueeze(1).unsqueeze(2), float("-inf")).view(bsz * heads, tgt_len, src_len)
    weights = F.dropout(F.softmax(weights, dim=-1), p=self.dropout, training=self.training)
    out = torch.bmm(operand(self, "softmax_quantizer", weights), operand(self, "v_bmm_quantizer", v))
    out = self.out_proj(out.transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim))
    if not need_weights:
        return out, None
    return out, weights.view(bsz, heads, tgt_len, src_len).sum(dim=1) / heads


def _bevfusion_mha_unsupported(module: nn.Module) -> str | None:
    """Options of BEVFusion's MultiheadAttention (unused by TransFusion) that the quantized forward leaves out."""
    if not module._qkv_same_embed_dim:
        return "separate q/k/v projection weights (kdim/vdim != embed_dim)"
    if module.bias_k is not None:
        return "add_bias_kv=True"
    return "add_zero_attn=True" if module.add_zero_attn else None


ATTENTION_FORWARDS = {
    "bevfusion_ext.models.swin.WindowMSA": QuantForward(ATTENTION, {"forward": window_msa_forward}),
    "mmdet.models.backbones.swin.WindowMSA": QuantForward(ATTENTION, {"forward": window_msa_forward}),
    "bevfusion_ext.models.transfusion.MultiheadAttention": QuantForward(ATTENTION,
                                                                        {"forward": transfusion_mha_forward}),
    "mmdet3d.models.utils.transformer.MultiheadAttention": QuantForward(
        ATTENTION, {"forward": bevfusion_mha_forward}, routes=("out_proj",), unsupported=_bevfusion_mha_unsupported),
}


def attention_like(module: nn.Module) -> bool:
    """num_heads plus a fused q/k/v projection (a `qkv` Linear three times as wide, or in-projection weights)."""
    if not isinstance(getattr(module, "num_heads", None), int):
        return False
    qkv = getattr(module, "qkv", None)
    if isinstance(qkv, nn.Linear) and qkv.out_features == 3 * qkv.in_features:
        return True
    return any(isinstance(getattr(module, name, None), nn.Parameter) for name in ("in_proj_weight", "q_proj_weight"))
