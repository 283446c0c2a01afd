"""Fold BatchNorm into the preceding convolution, as TensorRT does at build time, before quantizing for export."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .targets import join

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def warn_if_cold_bn(model: nn.Module, purpose: str) -> None:
    """Warn when BN running statistics were never updated: eval-mode calibration / folding would use mean 0, var 1."""
    cold = [name for name, m in model.named_modules()
            if isinstance(m, BN_TYPES) and m.track_running_stats and int(m.num_batches_tracked) == 0]
    if cold:
        warnings.warn(f"{len(cold)} BatchNorm layers have cold running statistics (e.g. {cold[:3]}); {purpose} "
                      "would use mean 0 / var 1 - load trained weights or run train-mode forwards first", stacklevel=3)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A conv (or subclass: mmcv's wrappers) directly followed by a BN over its output channels, with running
    statistics to fold."""
    if not isinstance(conv, CONV_TYPES) or not isinstance(bn, BN_TYPES) or not bn.track_running_stats:
        return False
    transposed_groups = isinstance(conv, _ConvTransposeNd) and conv.groups != 1
    return bn.num_features == conv.out_channels and not transposed_groups


def conv_bn_pairs(model: nn.Module) -> list[list[str]]:
    """[conv name, bn name] for every conv registered right before its BN in the same parent.

    Registration order is execution order in nn.Sequential and in mmcv's ConvModule (conv, bn, activate), which is
    where BEVFusion's conv-BN pairs live; a BN over a different channel count is never paired.
    """
    pairs = []
    for prefix, parent in model.named_modules():
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if _foldable(conv, bn):
                pairs.append([join(prefix, conv_name), join(prefix, bn_name)])
    return pairs


@torch.no_grad()
def fold_batchnorms(model: nn.Module, pairs: list[list[str]] | None = None) -> list[list[str]]:
    """Fold each BN into its conv (conv gains a bias, the BN becomes nn.Identity); returns the folded pairs.

    `pairs=None` finds them with `conv_bn_pairs`; restoring passes the saved pairs so a freshly built model gets the
    same structure (its values are then overwritten by the checkpoint). Uses the BN running statistics, so they must
    be warm.
    """
    if pairs is None:
        warn_if_cold_bn(model, "folding")
        pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not _foldable(conv, bn):
            raise ValueError(f"cannot fold {bn_name} ({type(bn).__name__}) into {conv_name} ({type(conv).__name__})")
        conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                      bn.eps, bn.weight, bn.bias,
                                                      transpose=isinstance(conv, _ConvTransposeNd))
        parent_name, _, attr = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, nn.Identity())
    return [list(pair) for pair in pairs]
