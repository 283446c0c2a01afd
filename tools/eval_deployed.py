"""Accuracy of the deployed model: the bundle's runtime over the validation set, scored with the training evaluator,
next to the PyTorch model of the same checkpoint, for the FP32 and (quantized checkpoints) INT8 Q/DQ parts; per-frame
agreement (boxes matched, mask IoU). Writes BUNDLE/eval.json and BUNDLE/eval.md and links them from report.md.

    python tools/eval_deployed.py CONFIG BUNDLE [--checkpoint CKPT] [--flavours fp32 qdq] [--backend onnxruntime]
        [--threads N] [--a.b value ...]

CKPT defaults to the checkpoint the bundle was exported from (report.json). Exit status: 0 every deployed metric
within its tolerance of PyTorch's (docs/deploy.md), 1 a metric fell further, 2 bad input (one `error:` line).
"""

import argparse
import logging
import sys
import warnings
from pathlib import Path

from bevfusion_ext.compression import CheckpointError
from bevfusion_ext.compression.state import CompressionStateError
from bevfusion_ext.deploy import BackendUnavailable, BundleError, FrameError
from bevfusion_ext.export.accuracy import DeployedEvalError, evaluate_bundle, write
from bevfusion_ext.runner.config import ConfigError
from bevfusion_ext.runner.upstream import CPU_OPS_HELP, prepare_bevfusion


def parse() -> tuple[argparse.Namespace, list[str]]:
    """The CLI arguments; unknown `--a.b value` pairs are config overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--checkpoint", help="default: the checkpoint in the bundle's report.json")
    parser.add_argument("--flavours", nargs="+", help="fp32 and/or qdq (default: every flavour the checkpoint has)")
    parser.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads per part")
    parser.add_argument("--cpu-ops", action="store_true", help=CPU_OPS_HELP)
    return parser.parse_known_args()


def main() -> int:
    """Evaluate, write eval.json / eval.md; exit 1 when a deployed metric falls below PyTorch's beyond tolerance."""
    from mmcv.utils import get_logger

    get_logger("mmcv").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    args, overrides = parse()
    try:
        prepare_bevfusion(args.config, cpu_ops=args.cpu_ops)
        result = evaluate_bundle(args.config, args.bundle, args.checkpoint, overrides, args.flavours, args.backend,
                                 args.threads)
    except (DeployedEvalError, BundleError, FrameError, BackendUnavailable, ConfigError, CheckpointError,
            CompressionStateError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write(result, args.bundle)
    print(f"wrote {args.bundle / 'eval.json'} and {args.bundle / 'eval.md'}")
    if not result["passed"]:
        failed = [f for f, e in result["flavours"].items() if not e["passed"]]
        print(f"error: the deployed {', '.join(failed)} model falls below PyTorch beyond its tolerance "
              "(see eval.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
