"""Export a compressed BEVFusion checkpoint as an Orin deploy bundle: ONNX parts (FP32, Q/DQ INT8, DLA INT8 + cache),
parity against PyTorch, DLA placement, roofline projection, trtexec build scripts, report.md / report.json.

    python tools/export_engine.py CONFIG CHECKPOINT --out deploy/ [--parts camera.backbone fuser ...]
        [--strict-dla] [--force] [--trt-version 10.3] [--build] [--allow-dense] [--a.b value ...]

Unknown `--a.b value` pairs are config overrides. Exit status: 0 bundle written, 1 a check failed (parity or
--strict-dla; nothing written), 2 bad input (nothing written).
"""

import argparse
import logging
import sys
import warnings
from pathlib import Path

from bevfusion_ext.export.parts import PARTS
from bevfusion_ext.export.pipeline import DEFAULT_TRT_VERSION, ExportCheckFailed, ExportError, ExportOptions, run
from bevfusion_ext.runner.config import ConfigError
from bevfusion_ext.runner.upstream import CPU_OPS_HELP, prepare_bevfusion


def parse() -> ExportOptions:
    """The CLI arguments as ExportOptions; unknown `--a.b value` pairs become config overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create")
    parser.add_argument("--parts", nargs="+", metavar="PART", help=f"subset of: {', '.join(PARTS)} (default: all)")
    parser.add_argument("--strict-dla", action="store_true", help="fail when a DLA part does not fit the DLA entirely")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--trt-version", default=DEFAULT_TRT_VERSION, help="TensorRT on the Orin (JetPack 6 = 10.3)")
    parser.add_argument("--build", action="store_true", help="also build the engines here if TensorRT and a GPU exist")
    parser.add_argument("--allow-dense", action="store_true", help="accept a checkpoint without compression state")
    parser.add_argument("--seed", type=int, default=0, help="seed of the parity inputs")
    parser.add_argument("--cpu-ops", action="store_true", help=CPU_OPS_HELP)
    args, overrides = parser.parse_known_args()
    prepare_bevfusion(args.config, cpu_ops=args.cpu_ops)
    return ExportOptions(
        config=args.config,
        checkpoint=args.checkpoint,
        out=args.out,
        parts=args.parts,
        strict_dla=args.strict_dla,
        force=args.force,
        trt_version=args.trt_version,
        build=args.build,
        allow_dense=args.allow_dense,
        overrides=overrides,
        seed=args.seed,
    )


def quiet() -> None:
    """Keep the output to the export's own lines: no mmcv init log, no tracer warnings."""
    from mmcv.utils import get_logger

    get_logger("mmcv").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


def main() -> int:
    """Run the export; input problems exit 2 and failed checks exit 1, both with one `error:` message."""
    quiet()
    try:
        options = parse()
        report = run(options)
    except (ExportError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ExportCheckFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {options.out} ({len(report['parts'])} parts, {report['timing_s']['total']:.1f} s); see "
        f"{options.out / 'report.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
