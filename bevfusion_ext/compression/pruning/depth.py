"""Depth pruning: remove whole blocks from a block list, least influential first.

Block lists are recognised by structure (no mmdet / mmdet3d import), named by a module path:

- **Swin stage** (mmdet ``SwinBlockSequence`` or ours): its ``blocks`` ModuleList, whose blocks have an
  ``attn.shift_size``; the path of the stage or of its ``blocks``. At least one block stays.
- **TransFusion decoder**: a head with ``decoder`` and ``prediction_heads`` ModuleLists of one length (prediction
  head i reads decoder layer i); the path of the head or of its ``decoder``. Layer i goes together with its
  prediction head and ``num_decoder_layers`` follows. At least one layer stays.
- **SECOND stage** (mmdet3d ``SECOND.blocks[i]``): an ``nn.Sequential`` of conv -> norm -> activation units. Its
  entry unit (strided, widening) stays; the others are counted and removable while shape-preserving (in == out
  channels, stride 1, same padding). They are plain convs, not residual blocks: removal makes the stage shallower.
  Channel pruning changes each conv's width on its own, so a progressive schedule removes them all at its first
  event, before any channel of theirs goes (``BlockList.scheduled`` is False).

Criterion: block influence, 1 - cos(input, output) per sample of each block on the example batch, averaged (one
eval-mode forward of the tracing forward): the block whose output is closest to its input changes the least when
it is skipped (ShortGPT's Block Influence).

Swin's shifted / plain alternation: every kept block keeps its own shift flag (its weights and relative position
bias were trained with it). While two or more blocks stay, the kept ones include a plain and a shifted block, so
tokens still cross window borders; two neighbours may then share a shift kind.

History step: ``["blocks", container_path, removed child indices]`` of the ModuleList / Sequential, which torch
renumbers after a removal, so the names of later blocks shift down (apply_pruning reports those renames).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .counting import ForwardFn, preserved_modes
from .tracing import tensors, training_forward

_UNIT_FOLLOWERS = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Identity)
SUPPORTED = ("a Swin stage (blocks with attn.shift_size), a TransFusion head or its decoder (with prediction_heads), "
             "or a SECOND stage (nn.Sequential of conv-norm-activation units)")


@dataclass
class BlockList:
    """A recognised block list: its container, its counted units (child index lists) and how many must stay."""

    path: str  # the container's module path (the history step's name)
    kind: str
    container: nn.Module
    units: list[list[int]]
    minimum: int

    @property
    def scheduled(self) -> bool:
        """Whether blocks go progressively (residual lists keep one width) or all at the first event (SECOND)."""
        return self.kind != "SECOND stage"

    @property
    def removable(self) -> list[int]:
        """Units that can go: all of them, except SECOND convs that change their input's shape."""
        return [u for u, unit in enumerate(self.units)
                if self.kind != "SECOND stage" or _keeps_shape(self.container[unit[0]])]

    def shift(self, unit: int) -> bool | None:
        """Whether a Swin block uses shifted windows (None for other kinds)."""
        attn = getattr(self.container[self.units[unit][0]], "attn", None)
        return None if attn is None or not hasattr(attn, "shift_size") else attn.shift_size > 0


def _is_swin_list(module: nn.Module) -> bool:
    return (isinstance(module, nn.ModuleList) and len(module) > 0
            and all(isinstance(getattr(getattr(b, "attn", None), "shift_size", None), int) for b in module))


def _is_decoder_head(module: nn.Module) -> bool:
    decoder, predictions = getattr(module, "decoder", None), getattr(module, "prediction_heads", None)
    return (isinstance(decoder, nn.ModuleList) and isinstance(predictions, nn.ModuleList)
            and len(decoder) == len(predictions) > 0)


def _keeps_shape(conv: nn.Module) -> bool:
    """Whether a conv maps [N, C, *S] to the same shape (so skipping it leaves the stage's wiring intact)."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed or conv.groups != 1:
        return False
    same = conv.padding == "same" or all(2 * p == d * (k - 1) for p, d, k in
                                         zip(conv.padding, conv.dilation, conv.kernel_size, strict=True))
    return conv.in_channels == conv.out_channels and all(s == 1 for s in conv.stride) and same


def _conv_units(module: nn.Module) -> list[list[int]] | None:
    """Child index lists of a conv stack's units after its entry unit, or None if module is not a conv stack."""
    children = list(module) if isinstance(module, nn.Sequential) else []
    if not children or not isinstance(children[0], nn.modules.conv._ConvNd):
        return None
    units: list[list[int]] = []
    for i, child in enumerate(children):
        if isinstance(child, nn.modules.conv._ConvNd):
            units.append([i])
        elif isinstance(child, _UNIT_FOLLOWERS):
            units[-1].append(i)
        else:
            return None
    return units[1:]


def block_list(model: nn.Module, path: str) -> BlockList:
    """The block list a recipe path names; ValueError saying what is supported otherwise."""
    modules = dict(model.named_modules())
    if path not in modules:
        raise ValueError(f"{path!r} names no module of the model")
    module, parent = modules[path], modules[path.rpartition(".")[0]] if path else None
    if _is_decoder_head(module) or (parent is not None and _is_decoder_head(parent) and parent.decoder is module):
        head_path = path if _is_decoder_head(module) else path.rpartition(".")[0]
        decoder = modules[head_path].decoder
        return BlockList(f"{head_path}.decoder".lstrip("."), "TransFusion decoder", decoder,
                         [[i] for i in range(len(decoder))], 1)
    blocks = getattr(module, "blocks", None)
    if _is_swin_list(module) or _is_swin_list(blocks):
        container, name = (module, path) if _is_swin_list(module) else (blocks, f"{path}.blocks")
        return BlockList(name, "Swin stage", container, [[i] for i in range(len(container))], 1)
    units = _conv_units(module)
    if units is not None:
        return BlockList(path, "SECOND stage", module, units, 0)
    raise ValueError(f"{path!r} ({type(module).__name__}) is not a block list depth pruning knows; name {SUPPORTED}")


def block_counts(model: nn.Module, paths: Sequence[str]) -> dict[str, int]:
    """Current number of (counted) blocks of each block list."""
    return {path: len(block_list(model, path).units) for path in paths}


def check_depth_target(model: nn.Module, path: str, target: int) -> BlockList:
    """The block list at path; ValueError unless target lies in [minimum, blocks] and enough blocks can go."""
    found = block_list(model, path)
    if not found.minimum <= target <= len(found.units):
        raise ValueError(f"{path!r} ({found.kind}) has {len(found.units)} blocks; a target must lie in "
                         f"[{found.minimum}, {len(found.units)}], got {target}")
    if len(found.units) - target > len(found.removable):
        raise ValueError(f"{path!r}: only {len(found.removable)} of its conv units keep their input shape (channel "
                         f"pruning made the others change width), so it cannot go down to {target}")
    return found


def _remember_input(inputs: dict, key: Any, module: nn.Module, args: tuple, kwargs: dict) -> None:
    inputs[key] = tensors([args, kwargs])[0].detach().clone()


def _score(inputs: dict, scores: dict, key: Any, module: nn.Module, args: tuple, output: Any) -> None:
    before, after = inputs.pop(key), tensors(output)[0].detach()
    if before.shape != after.shape:
        raise ValueError(f"block {key} changes its input shape {tuple(before.shape)} -> {tuple(after.shape)}")
    cos = F.cosine_similarity(before.flatten(1).double(), after.flatten(1).double(), dim=1)
    scores.setdefault(key, []).append(float((1.0 - cos).mean()))


@torch.no_grad()
def block_influence(model: nn.Module, example_inputs: Any, lists: Sequence[BlockList],
                    forward_fn: ForwardFn | None = None) -> dict[str, dict[int, float]]:
    """Per block list path and removable unit: 1 - cos(input, output) on the example batch (eval, one forward)."""
    inputs: dict = {}
    scores: dict = {}
    hooks = []
    for found in lists:
        for u in found.removable:
            first, last = found.container[found.units[u][0]], found.container[found.units[u][-1]]
            key = (found.path, u)
            hooks.append(first.register_forward_pre_hook(partial(_remember_input, inputs, key), with_kwargs=True))
            hooks.append(last.register_forward_hook(partial(_score, inputs, scores, key)))
    try:
        with preserved_modes(model):
            model.eval()
            (forward_fn or training_forward)(model, example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    missed = [f"{found.path}[{u}]" for found in lists for u in found.removable if (found.path, u) not in scores]
    if missed:
        raise ValueError(f"blocks {missed} did not run in the example forward, so their influence is unknown")
    return {found.path: {u: sum(scores[(found.path, u)]) / len(scores[(found.path, u)]) for u in found.removable}
            for found in lists}


def _keeps_alternation(found: BlockList, kept: list[int]) -> bool:
    """A Swin stage keeping >= 2 blocks keeps a plain and a shifted one (if it had both)."""
    kinds = {found.shift(u) for u in range(len(found.units))}
    return len(kept) < 2 or len(kinds) < 2 or {found.shift(u) for u in kept} == kinds


def _least_influential(found: BlockList, scores: Mapping[int, float], target: int) -> list[int]:
    """Units to remove, lowest influence first, skipping one whose removal would break the shift alternation."""
    removed: list[int] = []
    for unit in sorted(scores, key=lambda u: (scores[u], u)):
        if len(found.units) - len(removed) == target:
            break
        kept = [u for u in range(len(found.units)) if u != unit and u not in removed]
        if _keeps_alternation(found, kept):
            removed.append(unit)
    return sorted(removed)


def remove_blocks(model: nn.Module, path: str, removed: Sequence[int]) -> None:
    """Delete children `removed` of the ModuleList / Sequential at path (and their TransFusion prediction heads)."""
    modules = dict(model.named_modules())
    container = modules.get(path)
    if (not isinstance(container, (nn.ModuleList, nn.Sequential)) or not removed or len(set(removed)) != len(removed)
            or not all(0 <= i < len(container) for i in removed)):
        raise ValueError(f"removing blocks {list(removed)} does not fit {path!r}")
    parent = modules[path.rpartition(".")[0]]
    paired = parent.prediction_heads if _is_decoder_head(parent) and parent.decoder is container else None
    for i in sorted(removed, reverse=True):
        del container[i]
        if paired is not None:
            del paired[i]
    if paired is not None and isinstance(getattr(parent, "num_decoder_layers", None), int):
        parent.num_decoder_layers = len(container)


def plan_depth(model: nn.Module, example_inputs: Any, targets: Mapping[str, int],
               forward_fn: ForwardFn | None = None) -> list:
    """Remove blocks from model (a planning copy) down to targets[path] blocks per list; return the history steps."""
    chosen = [(check_depth_target(model, path, target), target) for path, target in targets.items()]
    containers = [found.path for found, _ in chosen]
    if len(set(containers)) != len(containers):
        raise ValueError(f"depth targets {sorted(targets)} name one block list twice ({containers})")
    chosen = [(found, target) for found, target in chosen if len(found.units) > target]
    if not chosen:
        return []
    scores = block_influence(model, example_inputs, [found for found, _ in chosen], forward_fn)
    history = []
    for found, target in chosen:
        units = _least_influential(found, scores[found.path], target)
        history.append(["blocks", found.path, sorted(i for u in units for i in found.units[u])])
    for _, path, children in history:
        remove_blocks(model, path, children)
    return history


def apply_block_steps(model: nn.Module, history: list) -> tuple[dict[str, str], list]:
    """Apply a history's leading "blocks" steps; return (new name -> old name of every renamed state entry, the rest).

    Graph-based steps name modules as they are after the removals, so removals must come first.
    """
    count = next((i for i, step in enumerate(history) if step[0] != "blocks"), len(history))
    if any(step[0] == "blocks" for step in history[count:]):
        raise ValueError("block removals must come first in a pruning history")
    if count == 0:
        return {}, history
    before: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        before.setdefault(id(tensor), name)
    for _, path, removed in history[:count]:
        remove_blocks(model, path, removed)
    renamed = {name: before[id(tensor)] for name, tensor in model.state_dict(keep_vars=True).items()
               if before.get(id(tensor), name) != name}
    return renamed, history[count:]
