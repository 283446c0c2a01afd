"""Layers whose output channels are a contract (depth bins, classes, box parameters, the camera BEV width).

``auto_protected`` finds them by module structure, so it works on the reference model and on BEVFusion's own
modules alike. Rules, applied to every module of the model:

1. LSS view transform (has ``depthnet`` and an int ``D``): the last conv of ``depthnet`` (D depth bins + C
   context channels, split by position) and the last conv of ``downsample`` (the camera BEV width the fuser and
   the deployed camera.vtransform engine expect).
2. Prediction branches (a ``heads`` attribute listing child module names, as TransFusion's FFN, CenterPoint's
   SeparateHead and our PredictionFFN have): the last layer of each named branch (class / box-parameter channels).
3. Dense class heatmap (a ``heatmap_head`` child): its last layer.
4. Classifier (a ``classifier`` child, e.g. BEVSegmentationHead): its last layer (one channel per map class).
"""

import fnmatch
import warnings
from collections.abc import Iterable, Iterator

from torch import nn


def last_layer(module: nn.Module) -> nn.Module | None:
    """The last Conv/Linear registered under module (a prediction branch's output layer)."""
    layers = [m for m in module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    return layers[-1] if layers else None


def _has_child(module: nn.Module, name: str) -> bool:
    """Whether module.name is a sub-module."""
    return isinstance(getattr(module, name, None), nn.Module)


def _contract_children(module: nn.Module) -> Iterator[str]:
    """Names (relative to module) of the children whose last layer is a channel contract, per the rules above."""
    if _has_child(module, "depthnet") and isinstance(getattr(module, "D", None), int):
        yield from (name for name in ("depthnet", "downsample") if _has_child(module, name))
    heads = getattr(module, "heads", None)
    if isinstance(heads, (dict, list, tuple)):
        yield from (name for name in heads if isinstance(name, str) and _has_child(module, name))
    yield from (name for name in ("heatmap_head", "classifier") if _has_child(module, name))


def auto_protected(model: nn.Module) -> list[str]:
    """Module names whose output channels carry fixed meaning (see the module docstring for the rules)."""
    names = {module: name for name, module in model.named_modules()}
    protected = []
    for module in model.modules():
        for child in _contract_children(module):
            layer = last_layer(getattr(module, child))
            if layer is not None and names[layer] not in protected:
                protected.append(names[layer])
    return protected


def protected_modules(model: nn.Module, patterns: Iterable[str]) -> list[nn.Module]:
    """Modules whose name matches a pattern, with all their sub-modules; warns about patterns matching nothing."""
    named = list(model.named_modules())
    found: list[nn.Module] = []
    for pattern in patterns:
        matched = [module for name, module in named if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            warnings.warn(f"protected pattern {pattern!r} matches no module", stacklevel=3)
        found.extend(sub for module in matched for sub in module.modules())
    return list({id(m): m for m in found}.values())
