"""Build Torch-Pruning's DependencyGraph for a whole BEVFusion-style model.

- Traces the training losses by default (``model(return_loss=True, **batch)``): every layer that gets a gradient is
  reached, including branches the inference path detaches or runs under ``no_grad``.
- Our block pruners go in through ``customized_pruners``; frozen Parameters (LSS ``frustum/dx/bx/nx``) through
  ``ignored_params``.
- Those blocks are made opaque while tracing: Torch-Pruning only maps a block's *output* autograd node to the
  block and walks on through its internals (fused q/k/v projection, ``chunk``, ``bmm``, softmax), wiring the block
  node to its own out_proj and its real inputs to placeholder ops. The ``chunk(3)`` of BEVFusion's functional
  attention is a split whose reverse index mapping adds the k / v offsets (+E, +2E) to indices that then flow back
  into the E-wide query stream, so every pass around the attention creates never-seen index lists and the group
  search (which dedups by index list) never ends. A forward hook gives the block's output an autograd node whose
  inputs are exactly the block's input tensors: the block becomes one node, inputs -> in channels, output -> out.
- Concat widths are taken from the traced tensors: Torch-Pruning infers them recursively, and through the LSS
  depth x context outer product it finds D + C instead of C, which merges the camera and lidar inputs of the
  fuser into one group (IndexError on the depthnet). ``_ConcatOp.concat_sizes`` is the field Torch-Pruning
  itself falls back to, so setting it keeps its own index mapping.
- spconv sparse convs (sparse.py) are opaque blocks too: their outputs are ``SparseConvTensor`` objects, so the
  hook puts the node on ``output.features`` (its inputs: the input features and the conv's own weights, so the
  first conv, fed by raw voxels, still gets a node) and names it in ``output.grad_fn`` for Torch-Pruning's hook.
- Views are recorded like the concats. Torch-Pruning re-infers a reshape's index mapping from channel counts it
  finds by walking the graph (before every group), skipping all of them once a 3-D Linear was traced (the real
  model); on the sparse encoder's densify it gets them wrong either way: the shape-preserving ``features.view`` of
  ``dense()`` took the fold (stride D), and the real fold ``[N, C, D, H, W] -> [N, C * D, H, W]`` stays identity.
  With one camera, the split of the camera features ``[B * N, C, H, W] -> [B, N, C, H, W]`` looked to it like a
  flatten of C into C * H * W (IndexError on the depthnet). Recorded views whose mapping we know are settled:
  identity for a shape-preserving view or that camera split, Torch-Pruning's own
  flatten mapping (channel c -> c * D .. c * D + D - 1) for a fold, both typed element-wise so its inference
  leaves them alone.
- mmdet's ``with_cp`` flags are off while tracing: reentrant ``torch.utils.checkpoint`` hides a block's layers.
- Trainable layers the trace misses raise ValueError: their input channels could not follow a pruned producer.
"""

from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from .counting import ForwardFn, call_model, preserved_modes
from .pruners import block_pruners
from .sparse import is_sparse_tensor

TRACED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
CONCATS = (torch.cat, torch.concat, torch.concatenate)
RESHAPES = (Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten)


def tensors(obj: Any) -> list[Tensor]:
    """Tensors found in nested dicts / lists / tuples (a sparse tensor's features included)."""
    if isinstance(obj, Tensor):
        return [obj]
    if is_sparse_tensor(obj):
        return [obj.features]
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else []
    return [t for value in values for t in tensors(value)]


def _graph_outputs(out: Any) -> list[Tensor]:
    """Outputs that carry an autograd graph: the ends Torch-Pruning traces back from."""
    return [t for t in tensors(out) if t.grad_fn is not None]


def training_forward(model: nn.Module, inputs: Any) -> Any:
    """Default tracing forward: the training losses, whose graph reaches every layer that gets a gradient."""
    return call_model(model, inputs, return_loss=True)


def _splits_batch(source: Tensor, out: Tensor) -> bool:
    """out is source [B * N, C, *S] viewed as [B, N, C, *S]: the camera split of LSS, channels untouched."""
    split = out.dim() == source.dim() + 1 and out.shape[2:] == source.shape[1:]
    return split and out.shape[0] * out.shape[1] == source.shape[0]


def _folded_depth(source: Tensor, out: Tensor) -> int | None:
    """D if out is source [N, C, D, *S] viewed as [N, C * D, *S] with S two spatial dims, else None."""
    merged = source.dim() == 5 and out.dim() == 4 and out.shape[0] == source.shape[0]
    if merged and out.shape[1] == source.shape[1] * source.shape[2] and out.shape[2:] == source.shape[3:]:
        return source.shape[2]
    return None


class _TracedShapes(TorchFunctionMode):
    """Records, by output grad_fn, the input widths of every traced torch.cat whose inputs all carry a graph and
    the channel stride of every shape-preserving (1) or channel-folding (D) view."""

    def __init__(self) -> None:
        super().__init__()
        self.widths: dict[Any, list[int]] = {}
        self.views: dict[Any, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in CONCATS and isinstance(out, Tensor) and out.grad_fn is not None:
            inputs = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if all(t.grad_fn is not None for t in inputs):
                self.widths[out.grad_fn] = [t.shape[dim] for t in inputs]
        elif func in RESHAPES and isinstance(out, Tensor) and out.grad_fn not in (None, args[0].grad_fn):
            stride = 1 if out.shape == args[0].shape or _splits_batch(args[0], out) else _folded_depth(args[0], out)
            if stride is not None:
                self.views[out.grad_fn] = stride
        return out


@contextmanager
def _without_checkpointing(model: nn.Module) -> Iterator[None]:
    """Turn mmdet-style ``with_cp`` activation checkpointing off, then back on."""
    flagged = [m for m in model.modules() if getattr(m, "with_cp", None) is True]
    for module in flagged:
        module.with_cp = False
    try:
        yield
    finally:
        for module in flagged:
            module.with_cp = True


class _Opaque(torch.autograd.Function):
    """A block's output value on an autograd node linked only to the block's inputs (tracing only, no backward)."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, *inputs: Tensor) -> Tensor:
        return value.clone()


def _opaque_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: replace the block's (first) output by an _Opaque node over its graph-carrying inputs and its
    own trainable weights (Torch-Pruning skips those); a sparse output keeps its object, with the node on
    ``features`` and in ``grad_fn`` (read by Torch-Pruning's hook, which expects a tensor)."""
    inputs = [t for t in tensors([args, kwargs]) if t.requires_grad]
    inputs = list({id(t): t for t in [*inputs, *module.parameters()] if t.requires_grad}.values())
    if is_sparse_tensor(output):
        if inputs:
            output.features = _Opaque.apply(output.features.detach(), *inputs)
        output.grad_fn = output.features.grad_fn
        return output
    first = output[0] if isinstance(output, tuple) else output
    if not inputs or not isinstance(first, Tensor):
        return None
    hidden = _Opaque.apply(first.detach(), *inputs)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _opaque_blocks(model: nn.Module, types: Collection[type]) -> Iterator[None]:
    """Hide the internals of every block of exactly these types from the trace (hooks run before Torch-Pruning's)."""
    hooks = [m.register_forward_hook(_opaque_output, prepend=True, with_kwargs=True)
             for m in model.modules() if type(m) in types]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _set_concat_widths(graph: tp.DependencyGraph, widths: Mapping[Any, list[int]]) -> None:
    """Give every traced concat node its real input widths."""
    for node in graph.module2node.values():
        found = widths.get(node.grad_fn) if node.type == tp.ops.OPTYPE.CONCAT else None
        if found is not None and len(found) == len(node.inputs):
            node.module.concat_sizes = list(found)


def _settle_views(graph: tp.DependencyGraph, strides: Mapping[Any, int]) -> None:
    """Give every recorded view node its channel mapping (identity, or channel c -> c * D .. c * D + D - 1) and type
    it element-wise, so Torch-Pruning's reshape inference, re-run before every group, leaves it."""
    for node in graph.module2node.values():
        stride = strides.get(node.grad_fn) if node.type == tp.ops.OPTYPE.RESHAPE else None
        if stride is None:
            continue
        node.type = tp.ops.OPTYPE.ELEMENTWISE
        fold = (_FlattenIndexMapping(stride=stride), _FlattenIndexMapping(stride=stride, reverse=True))
        for other in [*node.inputs, *node.outputs]:
            into, back = fold if stride > 1 and other in node.inputs else (None, None)
            for dep in other.dependencies:
                if dep.target is node:
                    dep.index_mapping[0] = into
            for dep in node.dependencies:
                if dep.target is other:
                    dep.index_mapping[0] = back


def build_graph(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None) -> tp.DependencyGraph:
    """Trace model (in eval mode, modes restored) into a DependencyGraph that knows our blocks."""
    pruners = block_pruners(model)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    recorder = _TracedShapes()

    def forward(module: nn.Module, inputs: Any) -> Any:
        with recorder, _without_checkpointing(module), _opaque_blocks(module, pruners):
            return (forward_fn or training_forward)(module, inputs)

    with preserved_modes(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs, forward_fn=forward, output_transform=_graph_outputs,
            customized_pruners=pruners, ignored_params=frozen, verbose=False,
        )
    _set_concat_widths(graph, recorder.widths)
    _settle_views(graph, recorder.views)
    _check_coverage(model, graph, pruners)
    return graph


def _check_coverage(model: nn.Module, graph: tp.DependencyGraph, pruners: Mapping[type, Any]) -> None:
    """Raise ValueError naming trainable layers the trace missed, or whose weight layout no pruner knows."""
    inside = {id(m) for m in graph.IGNORED_LAYERS_IN_TRACING}
    missed = [name for name, m in model.named_modules()
              if (isinstance(m, TRACED_LAYERS) or type(m) in pruners) and m not in graph.module2node
              and id(m) not in inside and any(p.requires_grad for p in m.parameters())]
    if missed:
        raise ValueError(f"{len(missed)} trainable layers are not reached by the tracing forward, so their input "
                         f"channels could not follow a pruned producer: {missed[:8]}. Pass a forward_fn whose "
                         "outputs depend on every trainable layer (the default traces the training losses).")
    names = {id(p): name for name, p in model.named_parameters()}
    guessed = [names[id(p)] for p, _ in graph.unwrapped_parameters
               if p.requires_grad and p in graph.module2node and names[id(p)].endswith("weight")]
    if guessed:
        modules = dict(model.named_modules())
        layers = {name.rpartition(".")[0]: type(modules[name.rpartition(".")[0]]).__name__ for name in guessed}
        raise ValueError(f"the weights of {len(layers)} traced layers have a channel layout no pruner knows, so "
                         f"Torch-Pruning would guess which dim to prune: {layers}. Give their type a block pruner "
                         "(compression/pruning/pruners.py, sparse.py), or keep them out of the traced forward.")
