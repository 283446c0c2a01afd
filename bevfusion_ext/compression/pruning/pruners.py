"""Torch-Pruning pruners for blocks whose channel layout Torch-Pruning cannot trace.

Each block is handed to ``DependencyGraph`` through its ``customized_pruners`` seam, so Torch-Pruning treats it as
one opaque layer with an input and an output channel set and never looks at its fused internals (tracing.py hides
them from the autograd walk, which would otherwise go through them):

- fused-qkv attention (mmdet ``WindowMSA``): ``qkv`` Linear reshaped to ``(3, heads, C // heads)`` + ``proj``;
- fused in_proj attention (BEVFusion's TransFusion ``MultiheadAttention``): ``in_proj_weight`` / ``in_proj_bias``
  Parameters sliced into q/k/v blocks + ``out_proj``;
- unfold patch merging (mmcv ``PatchMerging``): ``nn.Unfold`` channel order ``c * k + j`` -> LayerNorm -> Linear;
- spconv 1.x sparse convs (BEVFusion's ``SparseEncoder``): ``[*k, C_in, C_out]`` weights, in sparse.py.

Attention head dims (the inner width) are pruned separately with :meth:`AttentionPruner.prune_head_dims`, the
same number in every head; ``num_heads``, the relative position bias table and the softmax scale stay. Whole heads
go with :meth:`AttentionPruner.prune_heads` (heads.py plans them): ``num_heads`` and the bias table shrink, the head
width and the scale stay.
Blocks are recognised by structure (attribute names and types), so mmdet's own classes match as well as ours.
"""

from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch_pruning as tp
from torch import nn


def _keep(size: int, idxs: Sequence[int]) -> list[int]:
    """Indices of 0..size-1 that survive removing idxs."""
    removed = set(idxs)
    return [i for i in range(size) if i not in removed]


class BlockPruner(tp.pruner.BasePruningFunc):
    """A pruner for one structurally recognised block type; in and out channels are pruned independently."""

    TARGET_MODULES = None

    @staticmethod
    @abstractmethod
    def matches(module: nn.Module) -> bool:
        """Whether module has this block's structure."""

    def _select(self, owner: nn.Module, attr: str, keep: list[int], dim: int) -> None:
        """Replace owner.attr by its slice along dim (grad included), via Torch-Pruning's own helper."""
        tensor = getattr(owner, attr)
        if tensor is not None:
            setattr(owner, attr, self._prune_parameter_and_grad(tensor, keep, dim))

    def _prune_linear_rows(self, linear: nn.Linear, keep: list[int]) -> None:
        """Keep output features `keep` of linear."""
        self._select(linear, "weight", keep, 0)
        self._select(linear, "bias", keep, 0)
        linear.out_features = len(keep)

    def _prune_linear_columns(self, linear: nn.Linear, keep: list[int]) -> None:
        """Keep input features `keep` of linear."""
        self._select(linear, "weight", keep, 1)
        linear.in_features = len(keep)


class AttentionPruner(BlockPruner):
    """Shared head-dim logic of attention blocks with one fused [3E, C] q/k/v projection and an [C', E] output one."""

    @abstractmethod
    def qkv_owner(self, layer: nn.Module) -> tuple[nn.Module, str, str]:
        """(module, weight attribute, bias attribute) of the fused q/k/v projection."""

    @abstractmethod
    def output_projection(self, layer: nn.Module) -> nn.Linear:
        """The Linear that maps the concatenated heads back to the block's output."""

    def inner_dims(self, layer: nn.Module) -> int:
        """Concatenated head width E (heads x head dim)."""
        return self.output_projection(layer).in_features

    def num_heads(self, layer: nn.Module) -> int:
        """Number of attention heads (changed only by prune_heads)."""
        return int(layer.num_heads)

    def get_out_channels(self, layer: nn.Module) -> int:
        return self.output_projection(layer).out_features

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop output channels: rows of the output projection."""
        proj = self.output_projection(layer)
        self._prune_linear_rows(proj, _keep(proj.out_features, idxs))
        return layer

    def prune_head_dims(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop inner dims idxs (the same count in every head) from q, k and v and the output projection's input."""
        dims, heads = self.inner_dims(layer), self.num_heads(layer)
        head_dim = dims // heads
        per_head = [sum(1 for i in idxs if i // head_dim == h) for h in range(heads)]
        if len(set(per_head)) != 1:
            raise ValueError(f"head dims must be pruned equally in every head, got {per_head} per head")
        self._keep_inner(layer, _keep(dims, idxs))
        return layer

    def prune_heads(self, layer: nn.Module, heads: Sequence[int]) -> nn.Module:
        """Drop whole heads: their q/k/v rows, output-projection columns and relative-position-bias columns."""
        count = self.num_heads(layer)
        width = self.inner_dims(layer) // count
        keep = _keep(count, heads)
        if not keep or len(keep) + len(set(heads)) != count:
            raise ValueError(f"cannot remove heads {list(heads)} of {count}: at least one of 0..{count - 1} must stay")
        if isinstance(getattr(layer, "relative_position_bias_table", None), nn.Parameter):
            self._select(layer, "relative_position_bias_table", keep, 1)
        layer.num_heads = len(keep)
        self._keep_inner(layer, [h * width + i for h in keep for i in range(width)])
        return layer

    def _keep_inner(self, layer: nn.Module, keep: list[int]) -> None:
        """Keep inner dims `keep` of q, k and v and of the output projection's input."""
        dims = self.inner_dims(layer)
        owner, weight, bias = self.qkv_owner(layer)
        keep_qkv = [offset * dims + i for offset in range(3) for i in keep]
        self._select(owner, weight, keep_qkv, 0)
        self._select(owner, bias, keep_qkv, 0)
        self._prune_linear_columns(self.output_projection(layer), keep)
        self._after_head_dims(layer, len(keep))

    @abstractmethod
    def _after_head_dims(self, layer: nn.Module, dims: int) -> None:
        """Update the block's width attributes after head-dim pruning."""

    @torch.no_grad()
    def head_dim_importance(self, layer: nn.Module, use_grad: bool) -> torch.Tensor:
        """Per inner dim: squared L2 norm (or |w * grad| if use_grad) over its q/k/v rows and output column."""
        dims = self.inner_dims(layer)
        owner, weight, bias = self.qkv_owner(layer)
        tensors = [(getattr(owner, weight), 0), (getattr(owner, bias), 0), (self.output_projection(layer).weight, 1)]
        score = torch.zeros(dims, dtype=torch.float64)
        for tensor, dim in tensors:
            if tensor is None:
                continue
            value = tensor * tensor.grad if use_grad and tensor.grad is not None else tensor * tensor
            per_row = value.abs().movedim(dim, 0).reshape(value.shape[dim], -1).sum(1).double().cpu()
            score += per_row.view(-1, dims).sum(0)
        return score


class FusedQKVAttentionPruner(AttentionPruner):
    """mmdet WindowMSA: ``qkv`` Linear(C, 3E), ``proj`` Linear(E, C), ``num_heads``; forward needs E == C."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
        return (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and hasattr(module, "num_heads")
                and qkv.out_features == 3 * proj.in_features)

    def qkv_owner(self, layer: nn.Module) -> tuple[nn.Module, str, str]:
        return layer.qkv, "weight", "bias"

    def output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.proj

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.qkv.in_features

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop input channels: columns of qkv."""
        self._prune_linear_columns(layer.qkv, _keep(layer.qkv.in_features, idxs))
        return layer

    def _after_head_dims(self, layer: nn.Module, dims: int) -> None:
        """embed_dims (mmdet) and head_dim (timm-style reshapes) follow; scale stays."""
        layer.qkv.out_features = 3 * dims
        for attr, value in (("embed_dims", dims), ("head_dim", dims // self.num_heads(layer))):
            if hasattr(layer, attr):
                setattr(layer, attr, value)


class InProjAttentionPruner(AttentionPruner):
    """TransFusion MultiheadAttention: ``in_proj_weight`` [3E, C] / ``in_proj_bias`` Parameters + ``out_proj``.

    ``head_dim`` (our reference model's scale source) is left as built, so the pruned block computes the dense
    attention restricted to the kept dims; ``embed_dim`` follows the inner width.
    """

    @staticmethod
    def matches(module: nn.Module) -> bool:
        weight, out_proj = getattr(module, "in_proj_weight", None), getattr(module, "out_proj", None)
        return (not isinstance(module, nn.MultiheadAttention) and isinstance(weight, nn.Parameter)
                and weight.dim() == 2 and isinstance(out_proj, nn.Linear) and hasattr(module, "num_heads")
                and getattr(module, "q_proj_weight", None) is None and weight.shape[0] == 3 * out_proj.in_features)

    def qkv_owner(self, layer: nn.Module) -> tuple[nn.Module, str, str]:
        return layer, "in_proj_weight", "in_proj_bias"

    def output_projection(self, layer: nn.Module) -> nn.Linear:
        return layer.out_proj

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_proj_weight.shape[1]

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop input channels: columns of in_proj_weight (shared by query, key and value)."""
        self._select(layer, "in_proj_weight", _keep(layer.in_proj_weight.shape[1], idxs), 1)
        return layer

    def _after_head_dims(self, layer: nn.Module, dims: int) -> None:
        """embed_dim follows; head_dim (the scale source of our reference model) stays."""
        if hasattr(layer, "embed_dim"):
            layer.embed_dim = dims


class UnfoldMergePruner(BlockPruner):
    """mmcv PatchMerging: ``sampler`` Unfold(k) -> ``norm`` LayerNorm(k*k*C) -> ``reduction`` Linear(k*k*C, C_out).

    Input channel c owns unfold channels c*k*k .. c*k*k + k*k - 1 of the norm and the reduction's input.
    """

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return (isinstance(getattr(module, "sampler", None), nn.Unfold)
                and isinstance(getattr(module, "reduction", None), nn.Linear)
                and isinstance(getattr(module, "norm", None), (nn.LayerNorm, type(None))))

    @staticmethod
    def window(layer: nn.Module) -> int:
        """Unfold channels per input channel (kernel area)."""
        k = layer.sampler.kernel_size
        return k * k if isinstance(k, int) else k[0] * k[1]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.reduction.in_features // self.window(layer)

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.reduction.out_features

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop input channels: their k*k unfold channels in the norm and the reduction's input."""
        k = self.window(layer)
        keep = [c * k + j for c in _keep(self.get_in_channels(layer), idxs) for j in range(k)]
        norm = getattr(layer, "norm", None)
        if norm is not None:
            self._select(norm, "weight", keep, 0)
            self._select(norm, "bias", keep, 0)
            norm.normalized_shape = (len(keep),)
        self._prune_linear_columns(layer.reduction, keep)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        """Drop output channels: rows of the reduction."""
        self._prune_linear_rows(layer.reduction, _keep(layer.reduction.out_features, idxs))
        return layer


BLOCK_PRUNERS: tuple[type[BlockPruner], ...] = (FusedQKVAttentionPruner, InProjAttentionPruner, UnfoldMergePruner)


def sync_stage_widths(model: nn.Module) -> None:
    """Refresh mmdet SwinTransformer's ``num_features[i]`` from its ``norm{i}`` layers after pruning.

    Its forward reshapes stage outputs with ``num_features[i]``, so a stale width breaks the pruned model.
    """
    for module in model.modules():
        widths = getattr(module, "num_features", None)
        if not isinstance(widths, list):
            continue
        for i in range(len(widths)):
            norm = getattr(module, f"norm{i}", None)
            if isinstance(norm, nn.LayerNorm):
                widths[i] = norm.normalized_shape[0]


def block_pruners(model: nn.Module) -> dict[type, BlockPruner]:
    """One pruner per module class of model whose every instance has a recognised block structure."""
    from .sparse import SparseConvPruner  # sparse.py builds on BlockPruner: imported here to avoid an import cycle

    found: dict[type, BlockPruner] = {}
    rejected: set[type] = set()
    for module in model.modules():
        cls = type(module)
        kind = next((p for p in (*BLOCK_PRUNERS, SparseConvPruner) if p.matches(module)), None)
        if kind is None or (cls in found and not isinstance(found[cls], kind)):
            rejected.add(cls)
        elif cls not in found:
            found[cls] = kind()
    return {cls: pruner for cls, pruner in found.items() if cls not in rejected}
