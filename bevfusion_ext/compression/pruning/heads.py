"""Head pruning: remove whole attention heads (``num_heads`` shrinks), least important first.

mmdet's ``WindowMSA`` reshapes q/k/v by ``C // num_heads`` and its output to ``C``, both read from the *input*
width C, and BEVFusion's TransFusion ``MultiheadAttention`` asserts ``query width == embed_dim``: in both the inner
width (heads x head width d) must equal the input width. Removing k heads from such a block therefore removes k x d
channels of its input too, which is the residual stream it reads (a Swin stage, the TransFusion decoder's hidden
width) and which every other attention block reading that stream shares. So heads are pruned per coupled group:
every attention block reading the stream loses its own k least important heads (q/k/v rows, output-projection
columns, relative-position-bias columns), and the stream loses its k x d least important channels (Torch-Pruning
group importance) in one ``["channels", ...]`` step. The head width d and the softmax scale stay, so the kept heads
compute exactly what they computed before on the kept channels.

A recipe target ``{path: heads}`` applies to every attention block under path; blocks coupled through one stream
must all be targeted alike (name their common parent). History step: ``["heads", block_name, removed_heads]``.
"""

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch_pruning as tp
from torch import Tensor, nn

from .pruners import AttentionPruner, block_pruners
from .spec import under


class Candidate(Protocol):
    """What heads planning reads of the engine's channel candidates (engine._Candidate)."""

    root: nn.Module
    importance: Tensor
    attention: list[nn.Module]


def attention_blocks(model: nn.Module, path: str) -> dict[str, nn.Module]:
    """Attention blocks with a head structure we prune (fused q/k/v + output projection), under path, by name."""
    pruners = block_pruners(model)
    return {name: m for name, m in model.named_modules()
            if under(name, path) and isinstance(pruners.get(type(m)), AttentionPruner)}


def head_counts(model: nn.Module, paths: Sequence[str]) -> dict[str, int]:
    """The common head count of the attention blocks under each path; ValueError if none or they differ."""
    counts = {}
    for path in paths:
        found = {name: int(block.num_heads) for name, block in attention_blocks(model, path).items()}
        if not found:
            raise ValueError(f"{path!r} holds no attention block with fused q/k/v (mmdet WindowMSA, TransFusion "
                             "MultiheadAttention); name a module path containing them")
        if len(set(found.values())) != 1:
            raise ValueError(f"the attention blocks under {path!r} have different head counts {found}; give each "
                             "block group (e.g. each Swin stage) its own target")
        counts[path] = next(iter(found.values()))
    return counts


def check_head_target(model: nn.Module, path: str, target: int) -> None:
    """ValueError unless 1 <= target <= the current head count of the blocks under path."""
    heads = head_counts(model, [path])[path]
    if not 1 <= target <= heads:
        raise ValueError(f"the attention blocks under {path!r} have {heads} heads; a target must lie in "
                         f"[1, {heads}], got {target}")


def head_importance(pruner: AttentionPruner, block: nn.Module, use_grad: bool) -> Tensor:
    """Per head: the summed importance of its inner dims (squared L2 of q/k/v rows + output column, or |w * grad|)."""
    return pruner.head_dim_importance(block, use_grad).view(pruner.num_heads(block), -1).sum(1)


def _least_important_heads(pruner: AttentionPruner, block: nn.Module, count: int, use_grad: bool) -> list[int]:
    return sorted(head_importance(pruner, block, use_grad).argsort(stable=True)[:count].tolist())


def _targets_by_block(model: nn.Module, targets: Mapping[str, int]) -> dict[str, int]:
    """Target head count of every attention block under a target path (the longest path wins)."""
    by_block: dict[str, tuple[int, int]] = {}
    for path, target in targets.items():
        check_head_target(model, path, target)
        for name in attention_blocks(model, path):
            if len(path) >= by_block.get(name, (-1, 0))[0]:
                by_block[name] = (len(path), target)
    return {name: target for name, (_, target) in by_block.items()}


def plan_heads(model: nn.Module, graph: tp.DependencyGraph, targets: Mapping[str, int],
               candidates: Sequence[Candidate], use_grad: bool) -> list:
    """History steps removing heads down to targets[path] in every attention block under path (see module doc).

    candidates are the channel groups of the whole model (engine._candidates): the one whose attention list holds
    a block is the stream coupled to the block's heads.
    """
    names = {id(m): n for n, m in model.named_modules()}
    pruners = graph.CUSTOMIZED_PRUNERS
    wanted = _targets_by_block(model, targets)
    history: list = []
    done: set[str] = set()
    for cand in candidates:
        coupled = [names[id(block)] for block in cand.attention]
        cut = {name: int(model.get_submodule(name).num_heads) - wanted[name] for name in coupled if name in wanted}
        if not any(cut.values()):
            continue
        widths = {pruners[type(block)].inner_dims(block) // pruners[type(block)].num_heads(block)
                  for block in cand.attention}
        if set(cut) != set(coupled) or len(set(cut.values())) != 1 or len(widths) != 1:
            raise ValueError(f"attention blocks {coupled} read one residual stream (their head width is their input "
                             f"width), so they lose heads together: give them one target through a common parent "
                             f"path (heads to remove now: {cut}, head widths {sorted(widths)})")
        count = next(iter(cut.values()))
        for block in cand.attention:
            history.append(["heads", names[id(block)],
                            _least_important_heads(pruners[type(block)], block, count, use_grad)])
        channels = count * widths.pop()
        history.append(["channels", names[id(cand.root)], True,
                        sorted(cand.importance.argsort(stable=True)[:channels].tolist())])
        done.update(coupled)
    _plan_uncoupled(model, pruners, wanted, done, use_grad, history)
    return history


def _plan_uncoupled(model: nn.Module, pruners: Mapping[type, AttentionPruner], wanted: Mapping[str, int],
                    done: set[str], use_grad: bool, history: list) -> None:
    """Blocks whose inner width differs from their input width lose heads alone; others must have been planned."""
    for name, target in wanted.items():
        block = model.get_submodule(name)
        pruner = pruners[type(block)]
        count = pruner.num_heads(block) - target
        if name in done or count == 0:
            continue
        if pruner.inner_dims(block) == pruner.get_in_channels(block):
            raise ValueError(f"heads of {name!r} cannot go: its input channels (= its inner width) belong to no "
                             "prunable channel group (protected, or they reach a model output)")
        history.append(["heads", name, _least_important_heads(pruner, block, count, use_grad)])

