"""Plan a structured pruning event on a copy, then replay it on any number of identical models.

A plan is a *history*: a list of JSON-safe steps, applied in order,

- ``["blocks", container_name, child_idxs]``: whole blocks removed from a block list (depth.py; first in a history);
- ``["heads", block_name, heads]``: whole heads of an attention block (heads.py);
- ``["head_dims", block_name, idxs]``: inner dims of an attention block (same count per head);
- ``["channels", root_name, is_out, idxs]``: a Torch-Pruning group, rooted at root_name's out (or in) channels,
  exactly like ``DependencyGraph.pruning_history()`` entries.

Replaying histories in order on a freshly built dense model recreates the pruned architecture, so a pruned
checkpoint can be rebuilt and then loaded strictly.
"""

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .counting import ForwardFn, call_model, preserved_modes
from .depth import apply_block_steps, plan_depth
from .heads import plan_heads
from .protection import auto_protected, protected_modules
from .pruners import AttentionPruner, BlockPruner, sync_stage_widths
from .spec import PruningSpec, check_ratios, owner
from .tracing import TRACED_LAYERS, build_graph, tensors, training_forward

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class _Candidate:
    """One prunable Torch-Pruning group of a spec group, with what the planner needs to size and rank it."""

    prefix: str
    root: nn.Module
    importance: Tensor
    multiple: int  # kept channels must be a multiple of this (round_to and every coupled attention's head count)
    weight: int  # channel layers whose out channels this group's channels are (group_channels units)
    attention: list[nn.Module]  # attention blocks whose inputs are this group: their head dims shrink alike
    group: tp.Group  # the Torch-Pruning group itself (sparsity.py regularises its weights)

    @property
    def channels(self) -> int:
        """Channels of the group (one importance score each)."""
        return len(self.importance)


def _names(model: nn.Module) -> dict[int, str]:
    """id -> qualified name of every module and parameter."""
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    return names


def _out_targets(graph: tp.DependencyGraph, group: tp.Group, names: Mapping[int, str]) -> list[nn.Module]:
    """Model layers (not Torch-Pruning's placeholder ops) whose output channels the group removes."""
    return [dep.target.module for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler) and id(dep.target.module) in names]


def _blocked(graph: tp.DependencyGraph, group: tp.Group) -> bool:
    """Whether the group changes a traced model output or a grouped conv / GroupNorm (unsupported)."""
    for dep, _ in group:
        module = dep.target.module
        if dep.target.type == tp.ops.OPTYPE.OUTPUT and graph.get_out_channels(dep.target) is not None:
            return True
        if isinstance(module, nn.Module) and dep.target.type != tp.ops.OPTYPE.DEPTHWISE_CONV:
            pruner = graph.get_pruner_of_module(module)
            if pruner is not None and max(pruner.get_in_channel_groups(module),
                                          pruner.get_out_channel_groups(module)) > 1:
                return True
    return False


def _scorer(spec: PruningSpec) -> Callable[[tp.Group], Tensor]:
    """Per-channel group importance for spec.importance (falls back to L2 magnitude where it has no signal)."""
    magnitude = tp.importance.GroupMagnitudeImportance(p=2, normalizer=None)
    primary = {
        "magnitude": magnitude,
        "bn_scale": tp.importance.GroupMagnitudeImportance(
            p=1, normalizer=None, target_types=[nn.modules.batchnorm._BatchNorm, nn.LayerNorm]),
        "taylor": tp.importance.GroupTaylorImportance(normalizer=None),
    }[spec.importance]

    def has_grads(group: tp.Group) -> bool:
        return all(getattr(dep.target.module, "weight", None) is None or dep.target.module.weight.grad is not None
                   for dep, _ in group if isinstance(dep.target.module, TRACED_LAYERS))

    def score(group: tp.Group) -> Tensor:
        channels = len(group[0].idxs)
        imp = primary(group) if spec.importance != "taylor" or has_grads(group) else None
        imp = magnitude(group) if imp is None else imp
        usable = imp is not None and len(imp) == channels
        return imp.detach().double().cpu() if usable else torch.zeros(channels, dtype=torch.float64)

    return score


def _candidates(model: nn.Module, graph: tp.DependencyGraph, spec: PruningSpec,
                ratios: Mapping[str, float]) -> list[_Candidate]:
    """Torch-Pruning groups whose removed output channels all lie in one spec group with a ratio > 0."""
    names, pruners = _names(model), graph.CUSTOMIZED_PRUNERS
    protected = protected_modules(model, [*auto_protected(model), *spec.protected])
    roots = [nn.modules.conv._ConvNd, nn.Linear, *pruners]
    score = _scorer(spec)
    found = []
    for group in graph.get_all_groups(ignored_layers=protected, root_module_types=roots):
        targets = _out_targets(graph, group, names)
        prefixes = {owner(names[id(m)], spec.groups) for m in targets}
        prefix = prefixes.pop() if len(prefixes) == 1 else None
        if prefix is None or not ratios.get(prefix) or _blocked(graph, group):
            continue
        attention = [dep.target.module for dep, _ in group if _is_attention_input(pruners, dep)]
        heads = [pruners[type(m)].num_heads(m) for m in attention]
        found.append(_Candidate(
            prefix=prefix, root=group[0].dep.target.module, importance=score(group),
            multiple=math.lcm(spec.round_to, *heads),
            weight=sum(isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or type(m) in pruners for m in targets),
            attention=attention, group=group,
        ))
    return found


def _is_attention_input(pruners: Mapping[type, BlockPruner], dep: tp.Dependency) -> bool:
    """Whether dep prunes the input channels of an attention block whose inner width equals its input width.

    mmdet's WindowMSA (and BEVFusion's MultiheadAttention) reshape by the input width, so inputs and head dims
    must shrink together.
    """
    pruner = pruners.get(type(dep.target.module))
    return (isinstance(pruner, AttentionPruner) and dep.handler == pruner.prune_in_channels
            and pruner.inner_dims(dep.target.module) == pruner.get_in_channels(dep.target.module))


def _removal_bounds(channels: int, multiple: int, ideal: float) -> tuple[int, int | None]:
    """Feasible removals just below and above ideal: the kept count is a positive multiple, or all stay."""
    below_keep = math.ceil((channels - ideal) / multiple) * multiple
    above_keep = math.floor((channels - ideal) / multiple) * multiple
    below = channels - below_keep if below_keep < channels else 0
    above = channels - above_keep if above_keep >= multiple else None
    return below, above


def _removals(candidates: list[_Candidate], ratio: float) -> list[int]:
    """Channels to remove per candidate: each rounds ratio x channels down or up so the group total stays on target.

    The rounding error (in group_channels units) is carried to the next candidate, so a small per-step ratio
    still removes channels somewhere instead of rounding to nothing everywhere.
    """
    carry, removals = 0.0, []
    for cand in candidates:
        ideal = round(ratio * cand.channels, 9)
        below, above = _removal_bounds(cand.channels, cand.multiple, ideal)
        wanted = carry + ideal * cand.weight
        take_above = above is not None and abs(above * cand.weight - wanted) < abs(below * cand.weight - wanted)
        removal = above if take_above else below
        carry = wanted - removal * cand.weight
        removals.append(removal)
    return removals


def _head_dims(pruner: AttentionPruner, block: nn.Module, count: int, use_grad: bool) -> list[int]:
    """The count // heads least important inner dims of every head of block."""
    scores = pruner.head_dim_importance(block, use_grad).view(pruner.num_heads(block), -1)
    width = scores.shape[1]
    per_head = count // len(scores)
    return sorted(h * width + i for h, row in enumerate(scores) for i in row.argsort(stable=True)[:per_head].tolist())


def _plan(model: nn.Module, graph: tp.DependencyGraph, spec: PruningSpec, ratios: Mapping[str, float]) -> list:
    """History steps removing ratios[g] of every group g's current prunable channels, least important first."""
    names, pruners = _names(model), graph.CUSTOMIZED_PRUNERS
    candidates = _candidates(model, graph, spec, ratios)
    history: list = []
    for prefix, ratio in ratios.items():
        mine = [c for c in candidates if c.prefix == prefix]
        for cand, count in zip(mine, _removals(mine, ratio), strict=True):
            if count == 0:
                continue
            for block in cand.attention:
                idxs = _head_dims(pruners[type(block)], block, count, spec.importance == "taylor")
                history.append(["head_dims", names[id(block)], idxs])
            idxs = sorted(cand.importance.argsort(stable=True)[:count].tolist())
            history.append(["channels", names[id(cand.root)], True, idxs])
    return history


def replay(graph: tp.DependencyGraph, model: nn.Module, history: Iterable[list]) -> None:
    """Apply history steps in order through graph (built on model)."""
    modules = dict(model.named_modules())
    for kind, name, *args in history:
        pruner = graph.get_pruner_of_module(modules[name]) if name in modules else None
        if kind == "head_dims" and isinstance(pruner, AttentionPruner):
            pruner.prune_head_dims(modules[name], args[0])
        elif kind == "heads" and isinstance(pruner, AttentionPruner):
            pruner.prune_heads(modules[name], args[0])
        elif kind == "channels" and pruner is not None:
            is_out, idxs = args
            fn = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            graph.get_pruning_group(modules[name], fn, idxs).prune()
        else:
            raise ValueError(f"pruning step {kind!r} on {name!r} does not fit this model")
    sync_stage_widths(model)


def training_loss(model: nn.Module, example_inputs: Any) -> Tensor:
    """The sum of the model's training losses (mmdet loss dict), or of its first output tensor."""
    out = call_model(model, example_inputs, return_loss=True)
    values = [v for key, v in out.items() if "loss" in key] if isinstance(out, Mapping) else tensors(out)[:1]
    losses = [t.sum() for t in tensors(values)]
    if not losses:
        raise ValueError("taylor importance needs loss_fn: the model's forward returned no loss")
    return sum(losses)


def _accumulate_grads(model: nn.Module, example_inputs: Any, loss_fn: LossFn | None) -> None:
    """Fresh gradients of loss_fn (default: training_loss) for taylor importance."""
    model.zero_grad(set_to_none=True)
    (loss_fn or training_loss)(model, example_inputs).backward()


def pruned_copy(model: nn.Module, example_inputs: Any, spec: PruningSpec, ratios: Mapping[str, float],
                loss_fn: LossFn | None, forward_fn: ForwardFn | None, depth: Mapping[str, int] | None = None,
                heads: Mapping[str, int] | None = None) -> tuple[nn.Module, list]:
    """(a pruned deep copy of model, the history that pruned it); model itself is untouched.

    Order: blocks (depth targets), then heads (heads targets), then channels (ratios of what is left).
    """
    pruned = copy.deepcopy(model)
    history = plan_depth(pruned, example_inputs, depth or {}, forward_fn)
    if spec.importance == "taylor":
        _accumulate_grads(pruned, example_inputs, loss_fn)
    graph = build_graph(pruned, example_inputs, forward_fn)
    if heads:
        steps = _plan_heads(pruned, graph, spec, heads)
        replay(graph, pruned, steps)
        history += steps
    steps = _plan(pruned, graph, spec, ratios)
    replay(graph, pruned, steps)
    pruned.zero_grad(set_to_none=True)
    return pruned, history + steps


def _plan_heads(model: nn.Module, graph: tp.DependencyGraph, spec: PruningSpec, heads: Mapping[str, int]) -> list:
    """Heads planning over the channel groups of the whole model (a head removal also cuts the stream it reads)."""
    whole = dataclasses.replace(spec, groups={"": 1.0})
    candidates = _candidates(model, graph, whole, whole.groups)
    return plan_heads(model, graph, heads, candidates, spec.importance == "taylor")


def _check_runs(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None) -> None:
    """Run the tracing forward once, so a plan that breaks the model fails here and not in the training loop."""
    try:
        with preserved_modes(model), torch.no_grad():
            model.eval()
            (forward_fn or training_forward)(model, example_inputs)
    except RuntimeError as err:
        raise RuntimeError(f"the planned pruning breaks the model's forward ({err}); please report this "
                           "model structure, and protect the layers involved meanwhile") from err


def plan_pruning(model: nn.Module, example_inputs: Any, spec: PruningSpec, ratios: Mapping[str, float],
                 loss_fn: LossFn | None = None, *, forward_fn: ForwardFn | None = None,
                 depth: Mapping[str, int] | None = None, heads: Mapping[str, int] | None = None) -> list:
    """Decide one pruning event on a deep copy (model untouched) and return its JSON-safe history.

    ratios[g] is the fraction of group g's *current* prunable channels to remove (missing groups: 0); depth[path]
    and heads[path] are the block / head counts to reach in this event (depth.py, heads.py). Taylor importance
    back-propagates loss_fn(copy, example_inputs) on the copy. The caller's RNG state is unchanged.
    """
    spec.validate(model)
    check_ratios(ratios, spec.groups)
    with torch.random.fork_rng(devices=[]):
        pruned, history = pruned_copy(model, example_inputs, spec, ratios, loss_fn, forward_fn, depth, heads)
        _check_runs(pruned, example_inputs, forward_fn)
    return history


def _float_tensors(model: nn.Module) -> list[tuple[list[str], Tensor]]:
    """Floating parameters and buffers of the state dict as (names, tensor); a tied tensor appears once."""
    found: dict[int, tuple[list[str], Tensor]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():
            found.setdefault(id(tensor), ([], tensor))[0].append(name)
    return list(found.values())


class KeptIndices(dict):
    """apply_pruning's kept maps, plus ``sources``: the old name of every state entry a block removal renamed."""

    def __init__(self, kept: Mapping[str, Tensor], sources: Mapping[str, str]) -> None:
        super().__init__(kept)
        self.sources = dict(sources)


def apply_pruning(model: nn.Module, example_inputs: Any, history: list, *,
                  forward_fn: ForwardFn | None = None) -> dict[str, Tensor]:
    """Apply history to model in place; return, per changed floating state-dict entry, the kept flat indices.

    kept[name][j] is the index into the old tensor's flattened values of the new tensor's j-th flat element, so
    optimizer state slices exactly: ``new = old.flatten()[kept[name]].view(new_shape)``. Found by replaying the
    history on float64 arange codes and restoring the real values from them. Entries of removed blocks are gone;
    later blocks are renumbered, and ``kept.sources[new_name]`` is then the entry's old name (old state is read
    there). Deterministic: identical models and histories give identical results on every rank. Rebuild DDP and
    the optimizer afterwards.
    """
    if not history:
        return {}
    renamed, history = apply_block_steps(model, history)
    if not history:
        return KeptIndices({}, renamed)
    with torch.random.fork_rng(devices=[]):
        graph = build_graph(model, example_inputs, forward_fn)
    originals = {}
    for names, tensor in _float_tensors(model):
        originals[names[0]] = (tensor, tensor.data, tensor.grad, tensor.requires_grad)
        tensor.data = torch.arange(tensor.numel(), dtype=torch.float64, device=tensor.device).view(tensor.shape)
        tensor.grad = None
    try:
        replay(graph, model, history)
    finally:
        kept = _restore_from_codes(model, originals)
    return KeptIndices(kept, renamed)


def _restore_from_codes(model: nn.Module, originals: Mapping[str, tuple[Tensor, Tensor, Tensor | None, bool]]
                        ) -> dict[str, Tensor]:
    """Put real values (and grads, requires_grad) back into coded tensors; return the kept maps of changed ones.

    Pruning always creates new tensors, so a tensor object that survived the replay is untouched.
    """
    kept = {}
    for names, tensor in _float_tensors(model):
        old, data, grad, requires_grad = originals[names[0]]
        if tensor is old:
            tensor.data, tensor.grad = data, grad
            continue
        codes = tensor.detach().reshape(-1).long()
        tensor.data = data.reshape(-1)[codes].view(tensor.shape)
        if isinstance(tensor, nn.Parameter):
            tensor.requires_grad_(requires_grad)
            tensor.grad = None if grad is None else grad.reshape(-1)[codes].view(tensor.shape)
        if tensor.shape != data.shape or not torch.equal(codes, torch.arange(data.numel(), device=codes.device)):
            kept.update({name: codes for name in names})
    return kept

