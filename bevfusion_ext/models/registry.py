"""The model registry: every reference-model module is built from BEVFusion-style config dicts by type name."""
import copy
from collections.abc import Mapping
from typing import Any

from mmcv.utils import Registry
from torch import nn

MODELS = Registry("bevfusion_ext_models")


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build a registered module from a config dict (deep-copied, so YAML-loaded configs are never mutated)."""
    return MODELS.build(copy.deepcopy(dict(cfg)))
