"""BEVFusion split into static-shape ONNX parts the way CUDA-BEVFusion deploys it, plus the tensor contracts of the
pieces that stay GPU kernels on the Orin (lidar depth image, BEV pool, voxelization / sparse conv, box decoding).

Every part wraps the model's own sub-modules (no copies), so a pruned and quantized model exports as it is. Example
inputs are the tensors the real model produces on one sample (captured with forward hooks), so every shape is the
deployed one: batch 1, N cameras.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import torch
from onnx import numpy_helper
from torch import nn
from torch.overrides import TorchFunctionMode

from ..compression.pruning.counting import call_model
from ..compression.quantization import export_qdq_onnx
from ..compression.quantization.backend import WEIGHT
from ..compression.quantization.meta import META_ATTR, quantizers
from ..models.transfusion import BOX_CODE
from ..models.vtransforms import DepthLSSTransform as ReferenceLSS
from ..models.vtransforms import bev_pool
from .dla_rules import attr, graph_info

OPSET = 17
PREDICTIONS = (*BOX_CODE, "heatmap", "query_labels", "query_scores")  # TransFusionHead.forward keys get_bboxes reads
OBJECT_OUTPUTS = (*PREDICTIONS, "query_cells")
# BEVFusion's own heads (mmdet3d fork), recognised by qualified class name so the export needs no import of it.
BEVFUSION_TRANSFUSION = "mmdet3d.models.heads.bbox.transfusion.TransFusionHead"
BEVFUSION_SEGMENTATION = "mmdet3d.models.heads.segm.vanilla.BEVSegmentationHead"
# forward_single keys BEVFusion's get_bboxes reads (+ head.query_labels); query_proposals are the top-k's picks
# (class x H x W flat indices), dense_heatmap its input.
BEVFUSION_PREDICTIONS = (*BOX_CODE, "heatmap", "query_heatmap_score")
BEVFUSION_OBJECT_OUTPUTS = (*BEVFUSION_PREDICTIONS, "query_labels", "query_proposals", "dense_heatmap")
TENSORRT_TOPK_MAX_K = 3840  # TensorRT's TopK layer: k <= 3840 (TensorRT operator reference, TopK)
Activations = dict[str, tuple[tuple, Any]]  # module path -> (forward args, output) on the example sample


def split_depthnet(x: torch.Tensor, D: int, C: int) -> tuple[torch.Tensor, torch.Tensor]:
    """depthnet output -> (softmax over the D depth bins, the C context channels), as get_cam_feats splits it."""
    return x[:, :D].softmax(dim=1), x[:, D : D + C]


class CameraBackbone(nn.Module):
    """CUDA-BEVFusion's camera.backbone: images + lidar depth image -> depth distribution and context features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        camera = model.encoders["camera"]
        vtransform = camera["vtransform"]
        self.backbone, self.neck = camera["backbone"], camera["neck"]
        self.dtransform, self.depthnet = vtransform.dtransform, vtransform.depthnet
        self.D, self.C = vtransform.D, vtransform.C

    def forward(self, img: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """img [N, 3, H, W], depth [N, 1, H, W] -> depth_probs [N, D, fH, fW], context [N, C, fH, fW]."""
        x = self.neck(self.backbone(img))
        x = x if isinstance(x, torch.Tensor) else x[0]
        return split_depthnet(self.depthnet(torch.cat([self.dtransform(depth), x], dim=1)), self.D, self.C)


class Fuser(nn.Module):
    """CUDA-BEVFusion's fuser: ConvFuser + decoder backbone + neck -> the BEV map both heads read."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.fuser, self.decoder = model.fuser, model.decoder

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        """Per-sensor BEV maps (encoder order) -> fused, decoded BEV features [1, C, H, W]."""
        return self.decoder["neck"](self.decoder["backbone"](self.fuser(list(features))))[0]


@contextmanager
def _proposals(head: nn.Module, choice: tuple[torch.Tensor, torch.Tensor] | None = None) -> Iterator[list]:
    """Record TransFusion's proposals (scores, labels, BEV cells) during a forward, or impose `choice` (labels, cells).

    Imposed proposals are scored with the head's own heatmap at those cells, as proposals() scores a local maximum.
    """
    saved, record = head.__dict__.get("proposals"), []
    original = head.proposals

    def proposals(heatmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if choice is None:
            out = original(heatmap)
        else:
            labels, cells = choice
            out = (heatmap.flatten(1).gather(1, labels * heatmap[0, 0].numel() + cells), labels, cells)
        record.append(out)
        return out

    head.proposals = proposals
    try:
        yield record
    finally:
        if saved is None:
            del head.proposals
        else:
            head.proposals = saved


class ObjectHead(nn.Module):
    """TransFusion up to its raw per-query tensors; box decoding, score threshold and sorting stay post-processing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.heads["object"]

    def forward(self, bev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """BEV features -> per-query predictions of every decoder layer, proposal labels, scores and BEV cells."""
        with _proposals(self.head) as record:
            preds = self.head(bev)
        return (*(preds[name] for name in PREDICTIONS), record[0][2])

    def aligned(self, bev: torch.Tensor, labels: torch.Tensor, cells: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The outputs for given proposals (e.g. onnxruntime's), so near-tied top-k picks compare like for like."""
        with _proposals(self.head, (labels, cells)):
            return self(bev)


class ProposalPick(TorchFunctionMode):
    """Records BEVFusion's TransFusionHead proposal pick, or imposes `choice` there where it is a near-tie.

    forward_single picks in one expression, `heatmap.argsort(descending=True)[..., :P]`, not in a method it could be
    hooked at; so this mode watches that argsort and records (or replaces) the cut of its result. An imposed pick is
    taken only where its heatmap value equals the head's own pick's at that rank within TIE (runtimes' sigmoids differ
    by ulps); elsewhere the head's own pick stays, so a wrong top-k still shows as mismatched `query_proposals`.
    """

    SORTS = (torch.argsort, torch.Tensor.argsort)
    TIE = 1e-6  # sigmoid probabilities: a few float32 ulps

    def __init__(self, choice: torch.Tensor | None = None) -> None:
        super().__init__()
        self.choice, self.scores, self.order, self.picks = choice, None, None, []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in self.SORTS:
            self.scores, self.order = args[0], out
        elif func is torch.Tensor.__getitem__ and self.order is not None and args[0] is self.order:
            if self.choice is not None:
                tied = (self.scores.gather(-1, self.choice) - self.scores.gather(-1, out)).abs() <= self.TIE
                out = torch.where(tied, self.choice, out)
            self.picks.append(out)
        return out


class BEVFusionObjectHead(nn.Module):
    """BEVFusion's own TransFusionHead through its own forward (heatmap convs, local-max NMS, top-k proposals as ONNX
    TopK, transformer decoder, prediction FFNs), as CUDA-BEVFusion's head.bbox; box decoding stays post-processing."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.heads["object"]

    def forward(self, bev: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """BEV features -> per-query predictions of every decoder layer, proposal labels and picks, dense heatmap."""
        return self.aligned(bev)

    def aligned(self, bev: torch.Tensor, dense_heatmap: torch.Tensor | None = None,
                proposals: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The outputs on a given heatmap head output and proposal picks (e.g. onnxruntime's; None: the head's own),
        so near-tied top-k picks compare like for like (see ProposalPick)."""
        dense: list[torch.Tensor] = []

        def heatmap(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            dense.append(out if dense_heatmap is None else dense_heatmap)
            return dense[-1]

        hook = self.head.heatmap_head.register_forward_hook(heatmap)
        try:
            with ProposalPick(proposals) as pick:
                [[preds]] = self.head(bev, None)  # forward(feats, metas) -> ([preds],); forward_single reads no metas
        finally:
            hook.remove()
        if len(pick.picks) != 1:
            raise RuntimeError(
                f"{type(self.head).__qualname__}.forward cut {len(pick.picks)} argsorts, not the one proposal pick "
                "`heatmap.argsort(descending=True)[..., :num_proposals]` of BEVFusion's forward_single: this head's "
                "top-k is not the one head.object exports; export it with a part definition of its own")
        return (*(preds[name] for name in BEVFUSION_PREDICTIONS), self.head.query_labels, pick.picks[0], dense[0])


def is_instance_of(module: nn.Module, qualified_name: str) -> bool:
    """True if `module`'s class or a base class is `qualified_name` (module path + class name)."""
    return any(f"{cls.__module__}.{cls.__qualname__}" == qualified_name for cls in type(module).__mro__)


def _transfusion_missing(model: nn.Module) -> str | None:
    """Why BEVFusion's TransFusionHead of this config cannot be exported, or None."""
    branches = list(model.heads["object"].prediction_heads[0].heads)
    if sorted(branches) != sorted((*BOX_CODE, "heatmap")):
        return (f"heads.object predicts {branches}; the export's outputs are BEVFusion's nuScenes branches "
                f"{[*BOX_CODE, 'heatmap']}")
    return None


class BEVPool(nn.Module):
    """The lift + scatter_add BEV pool between camera.backbone and camera.vtransform (a CUDA kernel on the Orin)."""

    def __init__(self, vtransform: nn.Module) -> None:
        super().__init__()
        for name in ("dx", "bx", "nx"):
            self.register_buffer(name, getattr(vtransform, name).detach().clone())

    def forward(self, geometry: torch.Tensor, depth: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """geometry [1, N, D, fH, fW, 3] (ego xyz), depth_probs, context -> camera_bev_pooled [1, C, ny, nx]."""
        lifted = depth.unsqueeze(1) * context.unsqueeze(2)  # [N, C, D, fH, fW], as DepthLSSTransform.get_cam_feats
        lifted = lifted.view(geometry.shape[0], -1, *lifted.shape[1:]).permute(0, 1, 3, 4, 5, 2)
        return bev_pool(geometry, lifted, self.dx, self.bx, self.nx)


def _arg(acts: Activations, path: str, *index: int) -> torch.Tensor:
    value = acts[path][0]
    for i in index:
        value = value[i]
    return value


def _out(acts: Activations, path: str) -> Any:
    return acts[path][1]


def _camera_backbone_reference(model: nn.Module, acts: Activations) -> tuple[torch.Tensor, ...]:
    vtransform = model.encoders["camera"]["vtransform"]
    return split_depthnet(_out(acts, "encoders.camera.vtransform.depthnet"), vtransform.D, vtransform.C)


def _fuser_inputs(model: nn.Module, acts: Activations) -> dict[str, torch.Tensor]:
    return {f"{sensor}_bev": x for sensor, x in zip(model.encoders, _arg(acts, "fuser", 0), strict=True)}


@dataclass(frozen=True)
class PartDef:
    """One ONNX part: what it wraps, where its example inputs come from and what the real model produced there."""

    name: str
    modules: tuple[str, ...]  # sub-modules that must exist in the model
    build: Callable[[nn.Module], nn.Module]
    inputs: Callable[[nn.Module, Activations], dict[str, torch.Tensor]]
    outputs: tuple[str, ...]
    reference: Callable[[nn.Module, Activations], tuple[torch.Tensor, ...]]  # the model's values of leading outputs
    target: str  # "dla" (conv-only, meant for a DLA core) or "gpu"
    summary: str
    align: Callable[[nn.Module, dict, dict], tuple] | None = None  # PyTorch outputs for onnxruntime's top-k picks
    free: tuple[str, ...] = ()  # outputs also compared on PyTorch's own run: the top-k's values or its input
    missing: Callable[[nn.Module], str | None] = lambda m: None  # why this model's module cannot be exported, or None
    upstream: str = ""  # the BEVFusion class (qualified name) this definition is for; "" for the reference model's


PARTS: dict[str, PartDef] = {
    p.name: p
    for p in (
        PartDef(
            "camera.backbone",
            ("encoders.camera.backbone", "encoders.camera.neck", "encoders.camera.vtransform"),
            CameraBackbone,
            lambda m, a: {
                "img": _arg(a, "encoders.camera.backbone", 0),
                "depth": _arg(a, "encoders.camera.vtransform.dtransform", 0),
            },
            ("depth_probs", "context"),
            _camera_backbone_reference,
            "gpu",
            "camera backbone + neck + depth transform + depthnet (softmax depth bins, context channels)",
        ),
        PartDef(
            "camera.vtransform",
            ("encoders.camera.vtransform.downsample",),
            lambda m: m.get_submodule("encoders.camera.vtransform.downsample"),
            lambda m, a: {"camera_bev_pooled": _arg(a, "encoders.camera.vtransform.downsample", 0)},
            ("camera_bev",),
            lambda m, a: (_out(a, "encoders.camera.vtransform.downsample"),),
            "dla",
            "the vtransform's downsample convs after the BEV pool",
        ),
        PartDef(
            "lidar.backbone",
            ("encoders.lidar.backbone",),
            lambda m: m.get_submodule("encoders.lidar.backbone"),
            lambda m, a: {"voxels": _arg(a, "encoders.lidar.backbone", 0)},
            ("lidar_bev",),
            lambda m, a: (_out(a, "encoders.lidar.backbone"),),
            "dla",
            "dense lidar BEV encoder (stands in for BEVFusion's spconv SparseEncoder, a CUDA library on the Orin)",
        ),
        PartDef(
            "fuser",
            ("fuser", "decoder.backbone", "decoder.neck"),
            Fuser,
            _fuser_inputs,
            ("bev_features",),
            lambda m, a: (_out(a, "decoder.neck")[0],),
            "dla",
            "ConvFuser + SECOND decoder backbone + SECONDFPN neck",
        ),
        PartDef(
            "head.object",
            ("heads.object",),
            ObjectHead,
            lambda m, a: {"bev_features": _arg(a, "heads.object", 0, 0)},
            OBJECT_OUTPUTS,
            lambda m, a: tuple(_out(a, "heads.object")[name] for name in PREDICTIONS),
            "gpu",
            "TransFusion head: heatmap, top-k proposals, transformer decoder, prediction FFNs (raw tensors)",
            align=lambda module, inputs, ort: module.aligned(
                *inputs.values(), *(torch.from_numpy(ort[name]) for name in ("query_labels", "query_cells"))
            ),
            free=("query_scores",),
            missing=lambda m: None if hasattr(m.heads["object"], "proposals") else (
                f"heads.object is {type(m.heads['object']).__name__}, neither BEVFusion's TransFusionHead nor the "
                "reference one (no `proposals` top-k seam): its ONNX export is not implemented"),
        ),
        PartDef(
            "head.map",
            ("heads.map",),
            lambda m: m.get_submodule("heads.map"),
            lambda m, a: {"bev_features": _arg(a, "heads.map", 0, 0)},
            ("map_logits",),
            lambda m, a: (_out(a, "heads.map"),),
            "gpu",
            "BEV map segmentation head: grid_sample onto the map grid + classifier (logits; sigmoid afterwards)",
        ),
    )
}
# The parts of BEVFusion's own heads, whose outputs differ from the reference model's (part_for picks them).
BEVFUSION_PARTS: dict[str, PartDef] = {
    p.name: p
    for p in (
        PartDef(
            "head.object",
            ("heads.object",),
            BEVFusionObjectHead,
            lambda m, a: {"bev_features": _arg(a, "heads.object", 0, 0)},
            BEVFUSION_OBJECT_OUTPUTS,
            lambda m, a: tuple(_out(a, "heads.object")[0][0][name] for name in BEVFUSION_PREDICTIONS),
            "gpu",
            "BEVFusion's TransFusion head through its own forward: heatmap, local-max NMS, top-k proposals (TopK), "
            "transformer decoder, prediction FFNs (raw tensors)",
            align=lambda module, inputs, ort: module.aligned(
                *inputs.values(), *(torch.from_numpy(ort[name]) for name in ("dense_heatmap", "query_proposals"))
            ),
            free=("dense_heatmap",),
            missing=_transfusion_missing,
            upstream=BEVFUSION_TRANSFUSION,
        ),
        replace(
            PARTS["head.map"],  # the same module and input; BEVFusion's head applies the sigmoid itself
            outputs=("masks_bev",),
            summary="BEVFusion's BEVSegmentationHead: grid_sample onto the map grid + classifier + sigmoid (per-class "
            "probabilities; thresholds afterwards)",
            upstream=BEVFUSION_SEGMENTATION,
        ),
    )
}


def part_for(model: nn.Module, name: str) -> PartDef:
    """The definition of part `name` for this model: BEVFusion's own head classes have their own, else PARTS'."""
    own = BEVFUSION_PARTS.get(name)
    if own is not None and _has(model, own.modules[0]) and is_instance_of(model.get_submodule(own.modules[0]),
                                                                           own.upstream):
        return own
    return PARTS[name]


# Not an ONNX part of the bundle (a CUDA kernel on the Orin), but exported alone to check the scatter_add pool in ORT.
BEV_POOL = PartDef(
    "camera.bev_pool",
    ("encoders.camera.vtransform",),
    lambda m: BEVPool(m.encoders["camera"]["vtransform"]),
    lambda m, a: {
        "geometry": geometry(m, a),
        **dict(zip(("depth_probs", "context"), _camera_backbone_reference(m, a), strict=True)),
    },
    ("camera_bev_pooled",),
    lambda m, a: (_arg(a, "encoders.camera.vtransform.downsample", 0),),
    "gpu",
    "lift (depth x context) + scatter_add BEV pool",
    missing=lambda m: None if isinstance(m.encoders["camera"]["vtransform"], ReferenceLSS) else (
        "BEVFusion's own bev_pool is a CUDA kernel (a CPU stand-in here): the scatter_add ONNX reference check is "
        "the reference model's"),
)
TAPPED = (
    "encoders.camera.backbone",
    "encoders.camera.vtransform",
    "encoders.camera.vtransform.dtransform",
    "encoders.camera.vtransform.depthnet",
    "encoders.camera.vtransform.downsample",
    "encoders.lidar.voxelize",
    "encoders.lidar.backbone",
    "fuser",
    "decoder.neck",
    "heads.object",
    "heads.map",
)


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def unavailable_reason(model: nn.Module, part: PartDef) -> str | None:
    """Why this model has no such part (a module is missing or wraps no layer), or None."""
    missing = [path for path in part.modules if not _has(model, path)]
    if missing:
        return f"the model has no {', '.join(missing)}"
    reason = part.missing(model)
    if reason is not None:
        return reason
    module = part.build(model)
    if not any(True for _ in module.parameters()):
        return f"{part.modules[-1]} has no layers in this config"
    if part.modules == ("encoders.lidar.backbone",) and sparse_lidar_encoder(model):
        return (f"{part.modules[-1]} is a sparse-conv encoder (voxel features + coordinates): on the Orin it runs as "
                "a CUDA sparse-conv library (libspconv in CUDA-BEVFusion), not as an ONNX/TensorRT part; its tensor "
                "contract is the report's lidar.sparse_encoder kernel")
    return None


def sparse_lidar_encoder(model: nn.Module) -> bool:
    """True for BEVFusion's spconv SparseEncoder (its forward takes voxel coordinates), not a dense lidar backbone."""
    return _has(model, "encoders.lidar.backbone") and "coors" in inspect.signature(
        model.get_submodule("encoders.lidar.backbone").forward).parameters


def first_sample(batch: dict) -> dict:
    """Batch 1 of a collated batch: the deployed shape (one frame of N cameras)."""
    return {key: value[:1] for key, value in batch.items()}


def _copied(value: Any) -> Any:
    """`value` with every tensor cloned (through lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


@torch.no_grad()
def capture(model: nn.Module, sample: dict) -> Activations:
    """Run the real model (eval) on `sample` and keep copies of every tapped module's inputs and output.

    Copies, because the model edits some in place afterwards: BEVFusion's get_bboxes decodes TransFusion's `center`
    and `dim` in place, its DepthLSSTransform shifts the points.
    """
    acts: Activations = {}
    inputs: dict[str, tuple] = {}

    def keep_inputs(path: str) -> Callable:
        return lambda _module, args: inputs.update({path: _copied(args)})

    def keep(path: str) -> Callable:
        return lambda _module, _args, out: acts.update({path: (inputs[path], _copied(out))})

    tapped = {path: model.get_submodule(path) for path in TAPPED if _has(model, path)}
    hooks = [module.register_forward_pre_hook(keep_inputs(path)) for path, module in tapped.items()]
    hooks += [module.register_forward_hook(keep(path)) for path, module in tapped.items()]
    try:
        call_model(model.eval(), sample, return_loss=False)
    finally:
        for hook in hooks:
            hook.remove()
    return acts


def is_quantized(model: nn.Module) -> bool:
    """True for a model carrying bevfusion_ext quantizers (QAT / PTQ checkpoint)."""
    return getattr(model, META_ATTR, None) is not None


@contextmanager
def flavour_mode(model: nn.Module, flavour: str, constants: Iterable[str] = ()) -> Iterator[None]:
    """Fake quantization as the flavour's ONNX computes it: none (fp32), all (qdq), weights only (noqdq).

    `constants`: quantizers whose input is a constant of the Q/DQ graph; in noqdq they stay on like the weights' (see
    constant_quantizers).
    """
    named = quantizers(model) if is_quantized(model) else {}
    saved = {name: quantizer._disabled for name, (quantizer, _) in named.items()}
    kept = set(constants)
    for name, (quantizer, role) in named.items():
        if flavour == "fp32" or (flavour == "noqdq" and role != WEIGHT and name not in kept):
            quantizer.disable()
    try:
        yield
    finally:
        for name, (quantizer, _) in named.items():
            quantizer._disabled = saved[name]


@contextmanager
def graph_weights(model: nn.Module, module: nn.Module, graph: onnx.ModelProto) -> Iterator[int]:
    """Every quantized layer of `module` computes with the weight the Q/DQ-free `graph` holds for it (its weight
    quantizer off); yields how many weights differ from the model's fake quantization by one rounding step.

    The graph's weights are DQ(Q(w)) as ONNX and TensorRT define them (w / (amax / 127), round half to even); ModelOpt's
    fake quantizer computes w * (127 / amax), so a weight within a float ulp of a half step rounds the other way
    (about 1e-5 of the weights). More than one step apart means the graph is not this model: an error.
    """
    weight_quantizers = {id(q) for q, role in quantizers(model).values() if role == WEIGHT}
    held = {init.name: init for init in graph.graph.initializer}
    swapped, flips = [], 0
    try:
        for name, layer in module.named_modules():
            quantizer = next((c for c in layer.children() if id(c) in weight_quantizers and not c._disabled), None)
            if quantizer is None:
                continue
            key = f"{name}.weight" if name else "weight"
            if key not in held:
                raise RuntimeError(f"the Q/DQ-free graph has no initializer {key}: cannot compare {name or 'the part'}")
            with torch.no_grad():
                fake = quantizer(layer.weight)
            weight = torch.from_numpy(numpy_helper.to_array(held[key]).copy()).view_as(layer.weight)
            diff, step = (weight - fake).abs(), quantizer.amax.detach().float() / 127
            if bool((diff > step * 1.01).any()):
                raise RuntimeError(f"{key} in the Q/DQ-free graph differs from the model's by more than one step")
            flips += int((diff > step / 2).sum())
            swapped.append((layer, quantizer, layer.weight.data))
            layer.weight.data = weight
            quantizer.disable()
        yield flips
    finally:
        for layer, quantizer, data in swapped:
            layer.weight.data = data
            quantizer.enable()


def _quantized_constants(qdq: onnx.ModelProto) -> dict[tuple[int, ...], list[np.ndarray]]:
    """The constants QuantizeLinear nodes of a Q/DQ graph read (weights and constant activations), by shape."""
    info = graph_info(qdq)
    found: dict[tuple[int, ...], list[np.ndarray]] = {}
    for node in qdq.graph.node:
        value = info.consts.get(node.input[0]) if node.op_type == "QuantizeLinear" else None
        if value is not None:
            found.setdefault(tuple(value.shape), []).append(value)
    return found


@torch.no_grad()
def constant_quantizers(model: nn.Module, module: nn.Module, examples: dict[str, torch.Tensor],
                        qdq: onnx.ModelProto) -> list[str]:
    """Activation quantizers whose input the Q/DQ graph holds as a constant (TransFusion's BEV-grid coordinates of
    the cross-attention position embedding): the quantizer that reads exactly that tensor on the example.

    Q/DQ on a constant is folded like a weight's (onnxsim here, TensorRT's builder on the Orin), so the Q/DQ-free
    graph keeps that fake quantization, as the QAT model computed it; its PyTorch reference must keep it too.
    """
    constants = _quantized_constants(qdq)
    found: list[str] = []

    def check(name: str) -> Callable:
        def hook(_quantizer: nn.Module, args: tuple) -> None:
            x = args[0].detach().numpy()
            if any(np.array_equal(x, c) for c in constants.get(tuple(x.shape), ())):
                found.append(name)
        return hook

    activations = {n: q for n, (q, role) in quantizers(model).items() if role != WEIGHT and not q._disabled}
    hooks = [q.register_forward_pre_hook(check(name)) for name, q in activations.items()]
    try:
        module(*examples.values())
    finally:
        for hook in hooks:
            hook.remove()
    return sorted(set(found))


def random_inputs(examples: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Fresh inputs of the example shapes: each example's own values in a seeded random order.

    The values keep the deployed distribution (ReLU sparsity, the magnitudes quantizers were calibrated on) while no
    position is kept; uniform draws over [min, max] of sparse BEV features saturated TransFusion's heatmap sigmoid to
    exactly 1.0, whose tied top-k picks PyTorch's argsort and ONNX TopK order differently.
    """
    g = torch.Generator().manual_seed(seed)
    return {name: x.flatten()[torch.randperm(x.numel(), generator=g)].view(x.shape) for name, x in examples.items()}


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null, for native libraries that log there directly."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def drop_empty_scatters(model: onnx.ModelProto, inputs: dict[str, torch.Tensor]) -> int:
    """Replace every ScatterND whose updates are empty by an Identity of its data (scattering nothing changes nothing).

    mmdet's shifted-window Swin builds its attention mask by slice assignment; where a stage is a single window
    (reduced-resolution runs), a slice is empty and onnxruntime rejects the resulting empty ScatterND. Which ones are
    empty is measured: onnxruntime computes just the updates (shape inference cannot follow the mask's shape ops).
    """
    scatters = [(i, node) for i, node in enumerate(model.graph.node) if node.op_type == "ScatterND"]
    if not scatters:
        return 0
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(node.input[2], types.get(node.input[2],
                                                                 onnx.TensorProto.FLOAT), None) for _, node in scatters)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    needed = {i.name for i in session.get_inputs()}
    updates = session.run(None, {k: v.numpy() for k, v in inputs.items() if k in needed})
    empty = [(i, node) for (i, node), value in zip(scatters, updates, strict=True) if value.size == 0]
    for i, node in empty:
        model.graph.node[i].CopyFrom(onnx.helper.make_node("Identity", [node.input[0]], list(node.output),
                                                           name=node.name))
    return len(empty)


def export_onnx(
    module: nn.Module, inputs: dict[str, torch.Tensor], outputs: tuple[str, ...], path: Path, qdq: bool = False
) -> onnx.ModelProto:
    """Opset-17 TorchScript export (Q/DQ through the quantization core), simplified with onnxsim, saved at `path`."""
    if qdq:
        export_qdq_onnx(module, tuple(inputs.values()), str(path), list(inputs), list(outputs))
    else:
        with torch.no_grad():
            torch.onnx.export(
                module.eval(),
                tuple(inputs.values()),
                str(path),
                opset_version=OPSET,
                dynamo=False,
                input_names=list(inputs),
                output_names=list(outputs),
            )
    exported = onnx.load(str(path))
    batch_unbatched_pools(exported)
    drop_empty_scatters(exported, inputs)
    with _stderr_silenced():  # onnxsim's C++ side logs every constant it cannot fold (Swin's shifted-window mask)
        simplified, ok = onnxsim.simplify(exported)
    if not ok:
        raise RuntimeError(f"onnxsim could not validate the simplified {path.name}")
    shrink_sorted_topk(simplified)
    onnx.save(simplified, str(path))
    return simplified


POOLS = ("MaxPool", "AveragePool", "LpPool")


def batch_unbatched_pools(model: onnx.ModelProto) -> int:
    """Give every pooling node that reads an unbatched (C, H, W) tensor the batch axis its 2-D attributes need.

    F.max_pool2d takes (C, H, W) input; the TorchScript exporter means to unsqueeze it but compares the rank as a
    graph value with an int (never equal: pytorch/pytorch#127875), so the ONNX MaxPool gets 2-D kernel attributes on a
    rank-3 tensor and onnxruntime refuses the file ("Attribute dilations has incorrect size"). BEVFusion's
    TransFusionHead pools heatmap[:, 8] and heatmap[:, 9] that way (kernel 1, nuScenes pedestrian and cone).
    """
    if not any(n.op_type in POOLS for n in model.graph.node):
        return 0
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.value_info, *inferred.graph.input)
             if v.type.tensor_type.HasField("shape")}
    nodes, fixed = [], 0
    for node in model.graph.node:
        kernel = attr(node, "kernel_shape") if node.op_type in POOLS else None
        if kernel is None or ranks.get(node.input[0]) != len(kernel) + 1:
            nodes.append(node)
            continue
        axis, source, result = f"{node.name}/batch_axis", node.input[0], node.output[0]
        model.graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.int64), axis))
        node.input[0], node.output[0] = f"{node.name}/batched_input", f"{node.name}/batched_output"
        nodes += [
            onnx.helper.make_node("Unsqueeze", [source, axis], [node.input[0]], name=f"{node.name}/batch"),
            node,
            onnx.helper.make_node("Squeeze", [node.output[0], axis], [result], name=f"{node.name}/unbatch"),
        ]
        fixed += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return fixed


def _first_k(node: onnx.NodeProto, info: Any, axis: int) -> int | None:
    """k if `node` is a Slice taking the first k elements along `axis` (constant starts 0, step 1), else None."""
    if node.op_type != "Slice":
        return None
    starts, ends, axes, steps = (info.consts.get(node.input[i]) if len(node.input) > i and node.input[i] else None
                                 for i in range(1, 5))
    rank = len(info.shape(node.input[0]) or ())
    if starts is None or ends is None or starts.size != 1 or int(starts[0]) != 0:
        return None
    if (axes is not None and int(axes[0]) % rank != axis) or (axes is None and axis != 0):
        return None
    return int(ends[0]) if steps is None or int(steps[0]) == 1 else None


def shrink_sorted_topk(model: onnx.ModelProto) -> int:
    """A full sort cut to its first k (BEVFusion's `argsort(descending)[..., :P]` exports as TopK over every element +
    Slice) becomes TopK(k): the same elements in the same order (ONNX TopK breaks ties by lower index either way), and
    TensorRT's TopK takes k <= TENSORRT_TOPK_MAX_K only. Returns how many TopK nodes were shrunk."""
    topks = [n for n in model.graph.node if n.op_type == "TopK" and attr(n, "sorted", 1)]
    if not topks:
        return 0
    info, shrunk, dropped = graph_info(model), 0, set()
    graph_outputs = {o.name for o in model.graph.output}
    for node in topks:
        rank, k = len(info.shape(node.input[0]) or ()), info.consts.get(node.input[1])
        readers = [info.consumers.get(out, []) for out in node.output]
        if k is None or not rank or any(len(r) > 1 for r in readers) or graph_outputs & set(node.output):
            continue
        axis = attr(node, "axis", -1) % rank
        firsts = {_first_k(r[0], info, axis) for r in readers if r}
        if len(firsts) != 1 or None in firsts or min(firsts) >= int(k.reshape(-1)[0]):
            continue
        name = f"{node.name}/k"
        model.graph.initializer.append(numpy_helper.from_array(np.array([firsts.pop()], np.int64), name))
        node.input[1] = name
        for i, r in enumerate(readers):
            if r:
                node.output[i] = r[0].output[0]
                dropped.add(r[0].output[0])
        shrunk += 1
    kept = [n for n in model.graph.node if not (n.op_type == "Slice" and n.output[0] in dropped)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    resized = {out for n in topks for out in n.output}  # their recorded shapes still have the old k
    infos = [v for v in model.graph.value_info if v.name not in resized]
    del model.graph.value_info[:]
    model.graph.value_info.extend(infos)
    return shrunk


def _vtransform_call(model: nn.Module, acts: Activations) -> dict[str, Any]:
    """The tapped view-transform call by argument name (the reference's and BEVFusion's signatures differ)."""
    vtransform = model.encoders["camera"]["vtransform"]
    for cls in type(vtransform).__mro__:
        forward = cls.__dict__.get("forward")
        if forward is not None and "points" in inspect.signature(forward).parameters:
            call = inspect.signature(forward).bind(vtransform, *_arg(acts, "encoders.camera.vtransform")).arguments
            call.setdefault("camera_intrinsics", call.get("cam_intrinsic"))  # BaseDepthTransform's name for it
            return call
    raise ValueError(f"{type(vtransform).__name__}.forward takes no `points`: not an LSS view transform")


def geometry(model: nn.Module, acts: Activations) -> torch.Tensor:
    """Ego-frame xyz of every frustum point [1, N, D, fH, fW, 3] (reference vtransform): constant per calibration."""
    call = _vtransform_call(model, acts)
    return model.encoders["camera"]["vtransform"].get_geometry(call["camera2lidar"], call["camera_intrinsics"])


def _spec(name: str, shape: Any, dtype: str = "float32") -> dict:
    return {"name": name, "shape": list(shape), "dtype": dtype}


def _points(clouds: list[torch.Tensor] | torch.Tensor) -> dict:
    return _spec("points", ["P", (clouds if isinstance(clouds, torch.Tensor) else clouds[0]).shape[-1]])


def _lidar_contracts(model: nn.Module, acts: Activations) -> list[dict]:
    """Voxelization + lidar encoder contracts: BEVFusion's sparse encoder, or the reference's dense stand-in part."""
    backbone_args = _arg(acts, "encoders.lidar.backbone")
    sparse = sparse_lidar_encoder(model)
    voxels = [_spec("voxels", backbone_args[0].shape)]
    if sparse:
        voxels.append(_spec("voxel_coords", backbone_args[1].shape, "int32"))
    lidar_bev = [_spec("lidar_bev", _out(acts, "encoders.lidar.backbone").shape)]
    return [
        {
            "name": "lidar.voxelize",
            "runs_as": "CUDA kernel, BEVFusion's hard voxelization",
            "inputs": [_points(_arg(acts, "encoders.lidar.voxelize", 0))],
            "outputs": voxels,
            "notes": "BEVFusion's hard voxelization: up to max_num_points points per non-empty voxel, mean features, "
            "(batch, x, y, z) int32 coordinates" if sparse else "dense stand-in: per voxel mean offset, mean extra "
            "features, log(1 + count), z folded into C (BEVFusion: up to max_points points per non-empty voxel + "
            "int32 voxel coordinates)",
        },
        {
            "name": "lidar.sparse_encoder",
            "runs_as": "CUDA sparse-conv library (libspconv in CUDA-BEVFusion)" if sparse
            else "CUDA library (spconv) in BEVFusion; the dense lidar.backbone ONNX part here",
            "inputs": voxels,
            "outputs": lidar_bev,
            "notes": "BEVFusion's SparseEncoder (SubMConv3d / SparseConv3d + BN1d, weights [k, k, k, Cin, Cout]); its "
            "dense BEV output is the fuser's lidar_bev input" if sparse else "BEVFusion's SparseEncoder reads the "
            "sparse voxels; its output keeps lidar.backbone's contract (the fuser's lidar_bev input)",
        },
    ]


def kernel_contracts(model: nn.Module, acts: Activations) -> list[dict]:
    """The pieces between the ONNX parts that are GPU kernels / pre- and post-processing on the Orin."""
    contracts = []
    if "encoders.camera.vtransform" in acts:
        call = _vtransform_call(model, acts)
        clouds, frustum = call["points"], model.encoders["camera"]["vtransform"].frustum
        depth_probs, context = _camera_backbone_reference(model, acts)
        calib = [_spec(key, call[key].shape) for key in ("camera_intrinsics", "camera2lidar")]
        contracts += [
            {
                "name": "camera.depth_image",
                "runs_as": "CUDA kernel / CPU pre-processing",
                "inputs": [_points(clouds), *calib],
                "outputs": [_spec("depth", _arg(acts, "encoders.camera.vtransform.dtransform", 0).shape)],
                "notes": "lidar points projected into every camera, nearest point per pixel, 0 where none lands",
            },
            {
                "name": "camera.bev_pool",
                "runs_as": "CUDA kernel, CUDA-BEVFusion's bev_pool",
                "inputs": [
                    _spec("geometry", [1, call["img"].shape[1], *frustum.shape]),
                    _spec("depth_probs", depth_probs.shape),
                    _spec("context", context.shape),
                ],
                "outputs": [_spec("camera_bev_pooled", _arg(acts, "encoders.camera.vtransform.downsample", 0).shape)],
                "notes": "sum of depth_probs x context over the frustum points of each BEV cell; geometry (or the cell "
                "index derived from it) is constant per calibration. Reference: ONNX ScatterElements(add).",
            },
        ]
    if "encoders.lidar.backbone" in acts:
        contracts += _lidar_contracts(model, acts)
    part = part_for(model, "head.object") if "heads.object" in acts else None
    if part is not None and part.missing(model) is None:
        contracts.append(_decode_contract(model, acts, part))
    return contracts


def _tensor_spec(name: str, x: torch.Tensor) -> dict:
    return _spec(name, x.shape, str(x.dtype).removeprefix("torch."))


def _decode_contract(model: nn.Module, acts: Activations, part: PartDef) -> dict:
    """Box decoding after head.object: the reference head's or BEVFusion's TransFusionHead.get_bboxes."""
    scores = [_spec("scores_3d", ["K"]), _spec("labels_3d", ["K"], "int64")]
    if part.upstream != BEVFUSION_TRANSFUSION:
        preds = _out(acts, "heads.object")
        return {
            "name": "head.object.decode",
            "runs_as": "CUDA / CPU post-processing",
            "inputs": [_tensor_spec(name, preds[name]) for name in PREDICTIONS],
            "outputs": [_spec("boxes_3d", ["K", 7]), *scores],
            "notes": "last decoder layer; score = sigmoid(heatmap[label]) * query_score; box decode, score "
            "threshold, sort, K <= max_num (TransFusionHead.get_bboxes)",
        }
    preds = _out(acts, "heads.object")[0][0]
    return {
        "name": "head.object.decode",
        "runs_as": "CUDA / CPU post-processing (CUDA-BEVFusion's TransFusion post-process kernel)",
        "inputs": [*(_tensor_spec(name, preds[name]) for name in BEVFUSION_PREDICTIONS),
                   _spec("query_labels", [1, model.heads["object"].num_proposals], "int64")],
        "outputs": [_spec("boxes_3d", ["K", 9]), *scores],
        "notes": "BEVFusion's TransFusionHead.get_bboxes on the last decoder layer's P queries: score = "
        "sigmoid(heatmap) x query_heatmap_score x one_hot(query_labels), class = argmax; "
        "TransFusionBBoxCoder.decode (center x out_size_factor x voxel_size + pc_range, exp(dim), bottom z, "
        "atan2(rot), velocity), post_center_range and score_threshold filter; circle NMS per task if test_cfg.nms_type",
    }


def param_count(module: nn.Module) -> int:
    """Parameters the part carries (pruned widths, folded BN)."""
    return sum(p.numel() for p in module.parameters())
