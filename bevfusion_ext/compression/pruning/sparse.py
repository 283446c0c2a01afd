"""Channel pruning of spconv 1.x sparse encoders (BEVFusion's ``SparseEncoder``), recognised by structure.

- ``SubMConv3d`` / ``SparseConv3d`` (spconv 1.x ``SparseConvolution``, BEVFusion's fork): ``weight`` laid out
  ``[*kernel, C_in, C_out]`` (``bias`` ``[C_out]``); the conv forward reads ``in_channels`` / ``out_channels`` (its
  1x1 path reshapes the weight with them), so both follow the weight. Handed to Torch-Pruning as a block pruner.
- Their outputs are ``SparseConvTensor`` objects, not tensors: tracing.py makes each sparse conv one opaque node
  over ``.features`` (``[N_active, C]``, channels on dim 1), so the BatchNorm1d / ReLU on ``features`` and the
  residual ``out.features += identity`` of ``SparseBasicBlock`` are Torch-Pruning's ordinary dependencies.
- Densify + fold: ``SparseEncoder`` ends with ``dense()`` ([N, C, H, W, D]) ``.permute(0, 1, 4, 2, 3)
  .view(N, C * D, H, W)``: encoder channel c is BEV channels ``c * D .. c * D + D - 1``. Torch-Pruning maps
  reshapes of 2-D / 4-D tensors only, so tracing.py records every such channel-folding view (5-D -> 4-D, dims 1
  and 2 merged) and gives it Torch-Pruning's own flatten index mapping with stride D.

Sparse conv weights are not ``nn.Conv`` weights: Torch-Pruning's importance reads the BatchNorm1d after each
sparse conv (and the dense layer after the encoder), not the sparse weights.
"""

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .pruners import BlockPruner, _keep


def is_sparse_tensor(obj: Any) -> bool:
    """Whether obj is a spconv-style sparse tensor: ``features`` [N, C] with integer ``indices`` and a spatial shape."""
    return (isinstance(getattr(obj, "features", None), Tensor) and isinstance(getattr(obj, "indices", None), Tensor)
            and hasattr(obj, "spatial_shape"))


class SparseConvPruner(BlockPruner):
    """spconv 1.x ``SparseConvolution``: out channels = last weight dim (and bias), in channels = the one before."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        weight, kernel = getattr(module, "weight", None), getattr(module, "kernel_size", None)
        return (isinstance(weight, nn.Parameter) and isinstance(kernel, (list, tuple)) and hasattr(module, "subm")
                and not isinstance(module, nn.modules.conv._ConvNd)
                and tuple(weight.shape) == (*kernel, getattr(module, "in_channels", None),
                                            getattr(module, "out_channels", None)))

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[-1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[-2]

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop output channels: the weight's last dim and the bias."""
        keep = _keep(self.get_out_channels(layer), idxs)
        self._select(layer, "weight", keep, layer.weight.dim() - 1)
        self._select(layer, "bias", keep, 0)
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop input channels: the weight's second-to-last dim."""
        keep = _keep(self.get_in_channels(layer), idxs)
        self._select(layer, "weight", keep, layer.weight.dim() - 2)
        layer.in_channels = len(keep)
        return layer
