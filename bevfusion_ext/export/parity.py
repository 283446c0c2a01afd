"""Parity of every ONNX part: onnxruntime (2 threads, as DOMAIN.md's BEV pool check needs) against the PyTorch part
on fresh seeded random inputs of the deployed shapes, with a documented tolerance per flavour (docs/export.md)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .parts import PartDef, flavour_mode, graph_weights, random_inputs

ORT_THREADS = 2


@dataclass(frozen=True)
class Tolerance:
    """Bounds on |onnxruntime - PyTorch| / max(1, max |PyTorch|) per float output; integer outputs must be equal.

    At most `outliers` (a fraction of the elements) may exceed `max_rel`: a Q/DQ rounding flip (an activation within a
    float ulp of a half step, PyTorch and onnxruntime summing in different orders) propagates through every later layer
    of a deep part, so in Q/DQ parity the worst element is chaotic while the share of far-off elements stays small.
    """

    max_rel: float
    mean_rel: float
    why: str
    outliers: float = 0.0


TOLERANCES = {
    "fp32": Tolerance(1e-4, 1e-5, "same float math; only summation order differs"),
    "qdq": Tolerance(0.15, 0.01, "fake-quantized activations vs ORT Q/DQ: rare rounding flips propagate (DOMAIN.md 5)",
                     outliers=1e-3),
    "noqdq": Tolerance(1e-4, 1e-5, "PyTorch computes with the graph's own fake-quantized weights (each within "
                       "one rounding step of the model's) and quantized constants; activations float on both sides"),
}


def run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Outputs of an ONNX file in onnxruntime's CPU provider with ORT_THREADS intra-op threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = ORT_THREADS, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v.numpy() for k, v in inputs.items()}), strict=True))


def compare(reference: torch.Tensor, actual: np.ndarray, tol: Tolerance) -> dict:
    """Error statistics of one output; integer outputs count mismatching elements instead."""
    ref = reference.detach().numpy()
    if ref.shape != actual.shape:
        return {"passed": False, "detail": f"shape {list(actual.shape)} vs PyTorch {list(ref.shape)}"}
    if not np.issubdtype(ref.dtype, np.floating):
        mismatched = int((ref != actual).sum())
        return {"mismatched": mismatched, "passed": mismatched == 0}
    diff = np.abs(ref.astype(np.float64) - actual.astype(np.float64))
    scale = float(np.abs(ref).max(initial=0.0))
    norm = max(1.0, scale)
    bound = tol.max_rel * norm
    max_abs, mean_abs = float(diff.max(initial=0.0)), float(diff.mean()) if diff.size else 0.0
    outliers = float((diff > bound).mean()) if diff.size else 0.0
    passed = bool(np.isfinite(actual).all()) and outliers <= tol.outliers and mean_abs <= tol.mean_rel * norm
    return {"max_abs": max_abs, "bound": bound, "mean_abs": mean_abs, "outliers": outliers, "scale": scale,
            "passed": passed}


class StableSorts(TorchFunctionMode):
    """Sorts inside the PyTorch reference keep equal values in index order, as ONNX TopK does: PyTorch's unstable CPU
    sort leaves ties open, and TransFusion's proposal argsort over a BEV heatmap with many equal cells then picks
    other proposals than the exported TopK."""

    SORTS = (torch.sort, torch.Tensor.sort, torch.argsort, torch.Tensor.argsort)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if func in self.SORTS:
            kwargs["stable"] = True
        return func(*args, **kwargs)


def _as_tuple(out: torch.Tensor | tuple) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


@torch.no_grad()
def check_part(
    model: nn.Module,
    part: PartDef,
    module: nn.Module,
    path: Path,
    examples: dict[str, torch.Tensor],
    flavour: str,
    seed: int,
    constants: Iterable[str] = (),
    weights_from: Path | None = None,
) -> dict:
    """One flavour of one part: onnxruntime vs the PyTorch part (in that flavour's quantization mode; `constants`:
    quantizers of Q/DQ-graph constants, see parts.constant_quantizers; `weights_from`: the Q/DQ-free graph whose
    fake-quantized weights PyTorch computes with, see parts.graph_weights)."""
    inputs, tol = random_inputs(examples, seed), TOLERANCES[flavour]
    actual = run_onnx(path, inputs)
    weights = graph_weights(model, module, onnx.load(str(weights_from))) if weights_from else nullcontext(0)
    with flavour_mode(model, flavour, constants), weights as flips, StableSorts():
        free = _as_tuple(module(*inputs.values()))
        aligned = _as_tuple(part.align(module, inputs, actual)) if part.align else free
    outputs = {name: compare(ref, actual[name], tol) for name, ref in zip(part.outputs, aligned, strict=True)}
    outputs.update({f"{name}[free]": compare(free[part.outputs.index(name)], actual[name], tol) for name in part.free})
    return {
        "flavour": flavour,
        "seed": seed,
        "ort_threads": ORT_THREADS,
        "tolerance": asdict(tol),
        "aligned_top_k": part.align is not None,
        "weight_rounding_flips": flips,
        "outputs": outputs,
        "passed": all(o["passed"] for o in outputs.values()),
    }


def failures(report_parts: dict[str, dict]) -> list[str]:
    """One line per failing (part, flavour, output), naming the errors and the bound."""
    lines = []
    for name, entry in report_parts.items():
        for flavour, result in entry.get("parity", {}).items():
            tol = result["tolerance"]
            for output, r in result["outputs"].items():
                if not r["passed"]:
                    stats = r.get("detail") or ", ".join(f"{k}={v:.3g}" for k, v in r.items() if k != "passed")
                    lines.append(
                        f"{name} [{flavour}] {output}: {stats} (tolerance max {tol['max_rel']:g} on all but "
                        f"{tol['outliers']:g} of the elements / mean {tol['mean_rel']:g} x max(1, max|ref|))"
                    )
    return lines
