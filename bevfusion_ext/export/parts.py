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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import onnxsim
import torch
from torch import nn

from ..compression.pruning.counting import call_model
from ..compression.quantization import export_qdq_onnx
from ..compression.quantization.backend import WEIGHT
from ..compression.quantization.meta import META_ATTR, quantizers
from ..models.transfusion import BOX_CODE
from ..models.vtransforms import DepthLSSTransform as ReferenceLSS
from ..models.vtransforms import bev_pool

OPSET = 17
PREDICTIONS = (*BOX_CODE, "heatmap", "query_labels", "query_scores")  # TransFusionHead.forward keys get_bboxes reads
OBJECT_OUTPUTS = (*PREDICTIONS, "query_cells")
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
    ranked: tuple[str, ...] = ()  # top-k value outputs, also compared without alignment
    missing: Callable[[nn.Module], str | None] = lambda m: None  # why this model's module cannot be exported, or None


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
            ranked=("query_scores",),
            missing=lambda m: None if hasattr(m.heads["object"], "proposals") else (
                f"heads.object is {type(m.heads['object']).__name__} without a `proposals` top-k seam (BEVFusion's "
                "own TransFusionHead): its ONNX export is not implemented yet, so the bundle has no object head"),
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
    if "coors" in inspect.signature(module.forward).parameters:
        return (f"{part.modules[-1]} is a sparse-conv encoder (voxel features + coordinates): on the Orin it runs as "
                "a CUDA sparse-conv library (libspconv in CUDA-BEVFusion), not as an ONNX/TensorRT part")
    return None


def first_sample(batch: dict) -> dict:
    """Batch 1 of a collated batch: the deployed shape (one frame of N cameras)."""
    return {key: value[:1] for key, value in batch.items()}


@torch.no_grad()
def capture(model: nn.Module, sample: dict) -> Activations:
    """Run the real model (eval) on `sample` and keep every tapped module's inputs and output."""
    acts: Activations = {}

    def keep(path: str) -> Callable:
        return lambda _module, args, out: acts.update({path: (args, out)})

    hooks = [model.get_submodule(path).register_forward_hook(keep(path)) for path in TAPPED if _has(model, path)]
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
def flavour_mode(model: nn.Module, flavour: str) -> Iterator[None]:
    """Fake quantization as the flavour's ONNX computes it: none (fp32), all (qdq), weights only (noqdq)."""
    named = quantizers(model) if is_quantized(model) else {}
    saved = {name: quantizer._disabled for name, (quantizer, _) in named.items()}
    for quantizer, role in named.values():
        if flavour == "fp32" or (flavour == "noqdq" and role != WEIGHT):
            quantizer.disable()
    try:
        yield
    finally:
        for name, (quantizer, _) in named.items():
            quantizer._disabled = saved[name]


def random_inputs(examples: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Fresh inputs of the example shapes, uniform over each example's value range (the range quantizers saw)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, x in examples.items():
        lo, hi = float(x.min()), float(x.max())
        out[name] = torch.rand(x.shape, generator=g, dtype=x.dtype) * (hi - lo) + lo
    return out


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
    drop_empty_scatters(exported, inputs)
    with _stderr_silenced():  # onnxsim's C++ side logs every constant it cannot fold (Swin's shifted-window mask)
        simplified, ok = onnxsim.simplify(exported)
    if not ok:
        raise RuntimeError(f"onnxsim could not validate the simplified {path.name}")
    onnx.save(simplified, str(path))
    return simplified


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
    sparse = "coors" in inspect.signature(model.get_submodule("encoders.lidar.backbone").forward).parameters
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
    if "heads.object" in acts and PARTS["head.object"].missing(model) is None:
        preds = _out(acts, "heads.object")
        contracts.append(
            {
                "name": "head.object.decode",
                "runs_as": "CUDA / CPU post-processing",
                "inputs": [
                    _spec(name, preds[name].shape, str(preds[name].dtype).removeprefix("torch."))
                    for name in PREDICTIONS
                ],
                "outputs": [_spec("boxes_3d", ["K", 7]), _spec("scores_3d", ["K"]), _spec("labels_3d", ["K"], "int64")],
                "notes": "last decoder layer; score = sigmoid(heatmap[label]) * query_score; box decode, score "
                "threshold, sort, K <= max_num (TransFusionHead.get_bboxes)",
            }
        )
    return contracts


def param_count(module: nn.Module) -> int:
    """Parameters the part carries (pruned widths, folded BN)."""
    return sum(p.numel() for p in module.parameters())
