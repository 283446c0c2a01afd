"""Whole-head removal checks shared by the reference-model and real-model head pruning tests.

A block with heads `heads` and input channels `channels` removed must compute what the dense block computes when
those heads' values and those input channels are zero.
"""

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from bevfusion_ext.compression.pruning.pruners import FusedQKVAttentionPruner, InProjAttentionPruner


def head_dims(heads: list[int], width: int) -> list[int]:
    """Inner dims of `heads` when every head is `width` wide."""
    return [h * width + i for h in heads for i in range(width)]


def complement(size: int, idxs: list[int]) -> list[int]:
    """Indices of 0..size-1 not in idxs."""
    return [i for i in range(size) if i not in idxs]


def _zero_values(weight: Tensor, bias: Tensor, heads: list[int], width: int) -> None:
    """Zero the value rows of `heads` in a fused [3E, C] projection."""
    dims = weight.shape[0] // 3
    with torch.no_grad():
        weight.view(3, dims, -1)[2, head_dims(heads, width)] = 0.0
        bias.view(3, dims)[2, head_dims(heads, width)] = 0.0


def check_window_msa_heads(msa: nn.Module, x: Tensor, mask: Tensor, heads: list[int], channels: list[int],
                           width: int) -> nn.Module:
    """Prune `heads` + `channels` from a WindowMSA in place, assert it equals the zeroed dense block; return that."""
    dense = copy.deepcopy(msa)
    _zero_values(dense.qkv.weight, dense.qkv.bias, heads, width)
    expected = dense(x.index_fill(2, torch.tensor(channels), 0.0), mask)
    pruner = FusedQKVAttentionPruner()
    pruner.prune_heads(msa, heads)
    pruner.prune_in_channels(msa, channels)
    torch.testing.assert_close(msa(x[..., complement(x.shape[-1], channels)], mask), expected)
    return dense


def check_in_proj_heads(attn: nn.Module, query: Tensor, key: Tensor, heads: list[int], channels: list[int],
                        width: int, output: Callable[[object], Tensor] = lambda out: out) -> None:
    """The same for an in_proj attention (cross-attention to `key`); `output` picks the tensor from its result."""
    dense = copy.deepcopy(attn)
    _zero_values(dense.in_proj_weight, dense.in_proj_bias, heads, width)
    zero, keep = torch.tensor(channels), complement(query.shape[-1], channels)
    expected = output(dense(query.index_fill(2, zero, 0.0), key.index_fill(2, zero, 0.0), key.index_fill(2, zero, 0.0)))
    pruner = InProjAttentionPruner()
    pruner.prune_heads(attn, heads)
    pruner.prune_in_channels(attn, channels)
    torch.testing.assert_close(output(attn(query[..., keep], key[..., keep], key[..., keep])), expected)
