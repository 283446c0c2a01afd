"""CPU stand-in for `sparse_conv_ext` of BEVFusion's spconv 1.x fork (mmdet3d/ops/spconv), in torch.

Rulebook (src/indice.cc, include/spconv/geometry.h): `indice_pairs` is int32 [K, 2, N_in] (row 0 input index, row 1
output index, the first `indice_pair_num[k]` columns valid, the rest -1); offset k is row-major over the kernel and
pairs input p with output o where p = o * stride - padding + k * dilation (transposed: o = p * stride - padding +
k * dilation). Submanifold convs use stride 1, padding kernel // 2 and keep the input sites as outputs. Regular conv
outputs are numbered in order of their linear index (batch, then spatial row-major), as the CUDA path's unique does;
pairs of one offset are in input order. Convs gather, multiply by weight[k] ([*kernel, C_in, C_out] layout) and
scatter-add, taking the largest offset of a submanifold conv as its centre exactly as the C++ does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

__all__ = [
    "fused_indice_conv_fp32", "fused_indice_conv_half", "get_indice_pairs_2d", "get_indice_pairs_3d",
    "get_indice_pairs_4d", "get_indice_pairs_grid_2d", "get_indice_pairs_grid_3d", "indice_conv_backward_fp32",
    "indice_conv_backward_half", "indice_conv_fp32", "indice_conv_half", "indice_maxpool_backward_fp32",
    "indice_maxpool_backward_half", "indice_maxpool_fp32", "indice_maxpool_half",
]


def _linear(coords: Tensor, batch: Tensor, shape: Sequence[int]) -> Tensor:
    """Linear index batch * volume + row-major(coords) of [N, ndim] sites in a grid of `shape`."""
    index = batch
    for axis, size in enumerate(shape):
        index = index * size + coords[:, axis]
    return index


def _unlinear(index: Tensor, shape: Sequence[int]) -> Tensor:
    """[batch, *coords] int32 rows back from linear indices."""
    columns = []
    for size in reversed(shape):
        columns.append(index % size)
        index = index // size
    return torch.stack([index, *reversed(columns)], 1).int()


def _reach(coords: Tensor, batch: Tensor, ksize: Sequence[int], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], out_shape: Sequence[int], transpose: bool) -> tuple[Tensor, Tensor]:
    """Linear index [K, N] of the output site each input reaches through each offset, and whether it is in the grid."""
    key, valid = batch[None], torch.ones(1, len(batch), dtype=torch.bool)
    for axis, (k, s, p, d, size) in enumerate(zip(ksize, stride, padding, dilation, out_shape, strict=True)):
        offset = torch.arange(k)[:, None]
        if transpose:
            site, hit = coords[:, axis] * s - p + offset * d, True
        else:
            reach = coords[:, axis] + p - offset * d
            site, hit = torch.div(reach, s, rounding_mode="floor"), reach % s == 0
        key = (key[:, None] * size + site[None]).flatten(0, 1)
        valid = (valid[:, None] & (hit & (site >= 0) & (site < size))[None]).flatten(0, 1)
    return key, valid


def _pair_table(valid: Tensor, out_index: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """indice_pairs [K, 2, N] (-1 padded, pairs of an offset in input order) and indice_pair_num [K] from a mask."""
    offset, source = torch.nonzero(valid, as_tuple=True)
    counts = valid.sum(1)
    slot = torch.arange(len(offset)) - (torch.cumsum(counts, 0) - counts)[offset]
    pairs = torch.full((valid.shape[0], 2, valid.shape[1]), -1, dtype=torch.int32)
    pairs[offset, 0, slot] = source.int()
    pairs[offset, 1, slot] = out_index.int()
    return pairs.to(device), counts.int().to(device)


def _subm_pairs(coords: Tensor, batch: Tensor, reach: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]],
                shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Pairs whose output site is an input site (the last such input if repeated), found in sorted-site order."""
    sites, order = torch.sort(_linear(coords, batch, shape), stable=True)
    key, valid = reach(coords[order], batch[order])
    at = (torch.searchsorted(sites, key, right=True) - 1).clamp(min=0)
    found, target = torch.empty_like(valid), torch.empty_like(at)
    found[:, order] = valid & (sites[at] == key)
    target[:, order] = order[at]
    return found, target[found]


def get_indice_pairs_3d(indices: Tensor, batch_size: int, out_shape: Sequence[int], spatial_shape: Sequence[int],
                        ksize: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                        dilation: Sequence[int], out_padding: Sequence[int], subm: int,
                        transpose: int) -> list[Tensor]:
    """[output indices, indice_pairs, indice_pair_num] of a sparse conv, as spconv::getIndicePair returns them."""
    if subm:
        stride, padding = [1] * len(ksize), [k // 2 for k in ksize]
    coords, batch = indices[:, 1:].long().cpu(), indices[:, 0].long().cpu()
    reach = partial(_reach, ksize=ksize, stride=stride, padding=padding, dilation=dilation, out_shape=out_shape,
                    transpose=bool(transpose and not subm))
    if subm:
        return [indices, *_pair_table(*_subm_pairs(coords, batch, reach, out_shape), indices.device)]
    key, valid = reach(coords, batch)
    sites, out_index = torch.unique(key[valid], return_inverse=True)
    return [_unlinear(sites, out_shape).to(indices.device), *_pair_table(valid, out_index, indices.device)]


def get_indice_pairs_grid_3d(indices: Tensor, grid: Tensor, batch_size: int, out_shape: Sequence[int],
                             spatial_shape: Sequence[int], ksize: Sequence[int], stride: Sequence[int],
                             padding: Sequence[int], dilation: Sequence[int], out_padding: Sequence[int], subm: int,
                             transpose: int) -> list[Tensor]:
    """As get_indice_pairs_3d; the pre-allocated grid is only checked and left reset to -1, as the C++ leaves it."""
    volume = batch_size * math.prod(out_shape)
    if grid.numel() < volume:
        raise ValueError(f"grid has {grid.numel()} cells, the output needs {volume}")
    grid.fill_(-1)
    return get_indice_pairs_3d(indices, batch_size, out_shape, spatial_shape, ksize, stride, padding, dilation,
                               out_padding, subm, transpose)


def _plan(indice_pairs: Tensor, indice_pair_num: Tensor, skip: int | None,
          inverse: int) -> tuple[list[int], list[int], Tensor, Tensor]:
    """Offsets with pairs (but `skip`), their pair counts, and all their source / target rows, offset by offset."""
    counts = indice_pair_num.long().clone()
    if skip is not None:
        counts[skip] = 0
    rows = torch.arange(indice_pairs.shape[2]) < counts[:, None]
    offsets = torch.nonzero(counts).squeeze(1).tolist()
    source, target = indice_pairs[:, inverse][rows].long(), indice_pairs[:, 1 - inverse][rows].long()
    return offsets, counts[offsets].tolist(), source, target


def _centre(indice_pair_num: Tensor, subm: int) -> int | None:
    """The offset a submanifold conv applies densely: the first with the most pairs (the C++'s max_element)."""
    return int(torch.argmax(indice_pair_num)) if subm else None


@torch.no_grad()
def indice_conv_fp32(features: Tensor, filters: Tensor, indice_pairs: Tensor, indice_pair_num: Tensor,
                     num_activate_out: int, inverse: int, subm: int) -> Tensor:
    """Sparse conv forward: gather inputs, multiply each offset's rows by weight[k], scatter-add into the outputs."""
    kernel = filters.reshape(-1, features.shape[1], filters.shape[-1])
    centre = _centre(indice_pair_num, subm)
    offsets, counts, source, target = _plan(indice_pairs, indice_pair_num, centre, inverse)
    products = features.new_empty(len(source), kernel.shape[2])
    for k, rows, product in zip(offsets, features[source].split(counts), products.split(counts), strict=True):
        torch.mm(rows, kernel[k], out=product)
    out = features @ kernel[centre] if centre is not None else features.new_zeros(num_activate_out, kernel.shape[2])
    return out.index_add_(0, target, products)  # one scatter: many small index_add_ calls stall busy OpenMP threads


@torch.no_grad()
def indice_conv_backward_fp32(features: Tensor, filters: Tensor, out_bp: Tensor, indice_pairs: Tensor,
                              indice_pair_num: Tensor, inverse: int, subm: int) -> list[Tensor]:
    """[input gradient, filter gradient] of indice_conv for the output gradient `out_bp`."""
    kernel = filters.reshape(-1, features.shape[1], filters.shape[-1])
    centre = _centre(indice_pair_num, subm)
    offsets, counts, source, target = _plan(indice_pairs, indice_pair_num, centre, inverse)
    input_grad, kernel_grad = torch.zeros_like(features), torch.zeros_like(kernel)
    if centre is not None:
        torch.mm(features.t(), out_bp, out=kernel_grad[centre])
        input_grad = out_bp @ kernel[centre].t()
    back = features.new_empty(len(source), features.shape[1])
    pieces = zip(offsets, features[source].split(counts), out_bp[target].split(counts), back.split(counts), strict=True)
    for k, rows, grad, row_grad in pieces:
        torch.mm(rows.t(), grad, out=kernel_grad[k])
        torch.mm(grad, kernel[k].t(), out=row_grad)
    return [input_grad.index_add_(0, source, back), kernel_grad.view(filters.shape)]


def fused_indice_conv_fp32(features: Tensor, filters: Tensor, bias: Tensor, indice_pairs: Tensor,
                           indice_pair_num: Tensor, num_activate_out: int, inverse: int, subm: int) -> Tensor:
    """indice_conv plus bias; like the C++, a submanifold conv's centre product overwrites the bias (it is lost)."""
    out = indice_conv_fp32(features, filters, indice_pairs, indice_pair_num, num_activate_out, inverse, subm)
    return out if subm else out + bias


@torch.no_grad()
def indice_maxpool_fp32(features: Tensor, indice_pairs: Tensor, indice_pair_num: Tensor,
                        num_activate_out: int) -> Tensor:
    """Per-output maximum over its inputs, starting from zero as the kernel's zero-initialised output does."""
    _, counts, source, target = _plan(indice_pairs, indice_pair_num, None, 0)
    out = features.new_zeros(num_activate_out, features.shape[1])
    for rows, outputs in zip(source.split(counts), target.split(counts), strict=True):
        current, candidate = out[outputs], features[rows]
        out[outputs] = torch.where(current < candidate, candidate, current)  # an offset reaches an output once
    return out


@torch.no_grad()
def indice_maxpool_backward_fp32(features: Tensor, out_features: Tensor, out_bp: Tensor, indice_pairs: Tensor,
                                 indice_pair_num: Tensor) -> Tensor:
    """Route each output's gradient to every input equal to it (ties all receive it), as the kernel does."""
    _, _, source, target = _plan(indice_pairs, indice_pair_num, None, 0)
    tie = out_features[target] == features[source]
    grad = torch.where(tie, out_bp[target], torch.zeros((), dtype=out_bp.dtype))
    return torch.zeros_like(features).index_add_(0, source, grad)


# The rulebook is dimension-generic and the compute dtype-generic: one implementation serves every binding name.
get_indice_pairs_2d = get_indice_pairs_4d = get_indice_pairs_3d
get_indice_pairs_grid_2d = get_indice_pairs_grid_3d
indice_conv_half = indice_conv_fp32
indice_conv_backward_half = indice_conv_backward_fp32
fused_indice_conv_half = fused_indice_conv_fp32
indice_maxpool_half = indice_maxpool_fp32
indice_maxpool_backward_half = indice_maxpool_backward_fp32
