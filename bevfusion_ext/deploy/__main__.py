"""The runtime's command line, as the bundle's scripts call it (PYTHONPATH=lib/python):

    python3 -m bevfusion_ext.deploy infer BUNDLE [FRAMES ...] [--flavour fp32] [--backend auto] [--out DIR]
    python3 -m bevfusion_ext.deploy benchmark BUNDLE [FRAMES ...] [--modes sequential pipelined] [--iterations 200]
    python3 -m bevfusion_ext.deploy summarize BUNDLE

FRAMES are .npz frame files or directories of them (default: the bundle's data/sample_data). Exit status 2 with one
`error:` line for a bundle or frame the runtime cannot run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .backends import BackendUnavailable
from .bench import MODES, benchmark, summarize
from .runtime import FrameError, Prediction, Runtime, load_frames
from .spec import FLAVOUR_FILES, BundleError


def resolve_backend(name: str) -> tuple[str, str]:
    """`auto` -> tensorrt where TensorRT and a CUDA GPU are present, else onnxruntime; with the reason."""
    if name != "auto":
        return name, "requested"
    if importlib.util.find_spec("tensorrt") is None:
        return "onnxruntime", "tensorrt is not importable"
    if not torch.cuda.is_available():
        return "onnxruntime", "no CUDA GPU"
    return "tensorrt", "tensorrt and a CUDA GPU are present"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m bevfusion_ext.deploy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("infer", "benchmark"):
        sub = commands.add_parser(name)
        sub.add_argument("bundle", type=Path)
        sub.add_argument("frames", nargs="*", type=Path, help="frame .npz files or directories (default: sample data)")
        sub.add_argument("--flavour", choices=list(FLAVOUR_FILES), default="fp32")
        sub.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt"], default="auto")
        sub.add_argument("--threads", type=int, help="onnxruntime intra-op threads per part")
        sub.add_argument("--nms-radius", type=float, help="circle NMS radius in metres (the model has no NMS)")
    commands.choices["infer"].add_argument("--out", type=Path, help="write <frame>.pred.npz files here")
    bench = commands.choices["benchmark"]
    bench.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    bench.add_argument("--iterations", type=int, default=200)
    bench.add_argument("--warmup", type=int, default=20)
    bench.add_argument("--depth", type=int, default=2, help="frames in flight between pipeline stages")
    bench.add_argument("--out", type=Path, help="JSON result (default: BUNDLE/results/frames.<flavour>.json)")
    commands.add_parser("summarize").add_argument("bundle", type=Path)
    return parser


def _runtime(args: argparse.Namespace) -> Runtime:
    backend, why = resolve_backend(args.backend)
    runtime = Runtime(args.bundle, args.flavour, backend, threads=args.threads, nms_radius=args.nms_radius)
    print(f"backend {backend} ({why}); flavour {args.flavour}")
    for part, what in runtime.describe().items():
        print(f"  {part}: {what}")
    return runtime


def _line(name: str, prediction: Prediction, classes: dict, seconds: float) -> str:
    best = ""
    if len(prediction.scores_3d):
        x, y = prediction.boxes_3d[0, :2].tolist()
        best = (f"; best {classes['object'][int(prediction.labels_3d[0])]} {float(prediction.scores_3d[0]):.2f} "
                f"at ({x:.1f}, {y:.1f}) m")
    masks = ""
    if prediction.masks_bev is not None:
        cover = prediction.masks().float().mean(dim=(1, 2)).tolist()
        masks = "; masks " + ", ".join(f"{c} {100 * v:.0f} %" for c, v in zip(classes["map"], cover, strict=True))
    return f"{name}: {len(prediction.scores_3d)} boxes{best}{masks} [{seconds * 1e3:.1f} ms]"


def infer(args: argparse.Namespace) -> None:
    """Run every frame and print one line each; --out keeps boxes, scores, labels and mask probabilities."""
    runtime = _runtime(args)
    frames = load_frames(args.frames or [args.bundle / "data" / "sample_data"])
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for frame in frames:
        start = time.perf_counter()
        prediction = runtime.run(frame)
        print(_line(frame.name, prediction, runtime.spec.classes, time.perf_counter() - start))
        if args.out:
            np.savez(args.out / f"{frame.name}.pred.npz", **{k: v.numpy() for k, v in prediction.result().items()})


def bench(args: argparse.Namespace) -> None:
    """Time whole frames in each mode and write the JSON result."""
    runtime = _runtime(args)
    frames = load_frames(args.frames or [args.bundle / "data" / "sample_data"])
    results = []
    for mode in args.modes:
        result = benchmark(runtime, frames, args.iterations, args.warmup, mode, args.depth)
        print(f"{mode}: P50 {result['p50_ms']:.2f} ms, P99 {result['p99_ms']:.2f} ms, {result['fps']:.1f} FPS "
              f"({result['frames']} frames after {result['warmup']} warm-up)")
        results.append(result)
    out = args.out or args.bundle / "results" / f"frames.{args.flavour}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"flavour": args.flavour, "backend": runtime.backend_name, "parts": runtime.describe(),
                               "torch_threads": torch.get_num_threads(), "modes": results}, indent=2) + "\n")
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    """Dispatch; a bundle, frame or backend problem is one `error:` line and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "summarize":
            print(summarize(args.bundle), end="")
        else:
            {"infer": infer, "benchmark": bench}[args.command](args)
    except (BundleError, FrameError, BackendUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
