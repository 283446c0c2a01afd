"""CPU stand-in for BEVFusion's `bev_pool_ext` (mmdet3d/ops/bev_pool/src/bev_pool_cuda.cu), in torch.

An interval is a run of `interval_lengths[i]` consecutive points starting at `interval_starts[i]`; all of its points
land in the cell of its first point, whose `geom_feats` row is (x, y, z, batch). The output grid is
[b, d, h, w, c] and that cell is [batch, z, x, y].
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bev_pool_backward", "bev_pool_forward"]


def _interval_points(interval_lengths: Tensor, interval_starts: Tensor) -> tuple[Tensor, Tensor]:
    """(point index, interval index) of every point an interval covers, interval by interval as the kernel walks."""
    lengths = interval_lengths.long()
    interval = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    point = interval_starts.long()[interval] + torch.arange(len(interval), device=lengths.device) - first[interval]
    return point, interval


def _cells(geom_feats: Tensor, interval_starts: Tensor, d: int, h: int, w: int) -> Tensor:
    """Flat index into the [b, d, h, w] grid of each interval's cell: its first point's [batch, z, x, y]."""
    g = geom_feats[interval_starts.long()].long()
    return ((g[:, 3] * d + g[:, 2]) * h + g[:, 0]) * w + g[:, 1]


def _rows(x: Tensor, point: Tensor) -> Tensor:
    """The rows of `x` the intervals cover, without a copy when they tile it in order (as bev_pool's always do)."""
    tiled = len(point) == len(x) and torch.equal(point, torch.arange(len(x), device=point.device))
    return x if tiled else x.index_select(0, point)


def bev_pool_forward(x: Tensor, geom_feats: Tensor, interval_lengths: Tensor, interval_starts: Tensor,
                     b: int, d: int, h: int, w: int) -> Tensor:
    """Sum each interval's features into its cell of a zero [b, d, h, w, c] grid (one writer per cell)."""
    point, interval = _interval_points(interval_lengths, interval_starts)
    sums = x.new_zeros(len(interval_lengths), x.shape[1]).index_add_(0, interval, _rows(x, point))
    out = x.new_zeros(b * d * h * w, x.shape[1])
    out[_cells(geom_feats, interval_starts, d, h, w)] = sums
    return out.view(b, d, h, w, x.shape[1])


def bev_pool_backward(out_grad: Tensor, geom_feats: Tensor, interval_lengths: Tensor, interval_starts: Tensor,
                      b: int, d: int, h: int, w: int) -> Tensor:
    """Copy each cell's gradient to every point of its interval; points outside all intervals get zero."""
    point, interval = _interval_points(interval_lengths, interval_starts)
    cell_grad = out_grad.reshape(b * d * h * w, -1)[_cells(geom_feats, interval_starts, d, h, w)]
    x_grad = out_grad.new_zeros(geom_feats.shape[0], out_grad.shape[-1])
    x_grad[point] = cell_grad[interval]
    return x_grad
