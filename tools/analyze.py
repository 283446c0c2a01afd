"""Model analysis on a config (+ checkpoint): complexity table, latency profile, pruning sensitivity.

    python tools/analyze.py complexity CONFIG [--checkpoint CKPT] [--depth 3] [--out DIR]
    python tools/analyze.py latency CONFIG [--checkpoint CKPT] [--depth 2] [--repeats 5] [--out DIR]
    python tools/analyze.py sensitivity CONFIG --checkpoint CKPT --groups decoder heads --ratios 0.1 0.3 0.5 --out DIR
"""
import argparse
import sys
from pathlib import Path

from bevfusion_ext.compression import CheckpointError
from bevfusion_ext.compression.state import CompressionStateError
from bevfusion_ext.runner import ConfigError, analyze
from bevfusion_ext.runner.upstream import CPU_OPS_HELP, prepare_bevfusion


def parse() -> tuple[argparse.Namespace, list[str]]:
    """Subcommand, config, checkpoint and options; unknown `--a.b value` pairs are config overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("complexity", "latency", "sensitivity"))
    parser.add_argument("config")
    parser.add_argument("--checkpoint")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--groups", nargs="+", default=["encoders.camera.backbone", "encoders.camera.neck", "decoder",
                                                        "heads"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--importance", default="magnitude")
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--out", type=Path, help="directory for the JSON result (and the sensitivity plot)")
    parser.add_argument("--cpu-ops", action="store_true", help=CPU_OPS_HELP)
    return parser.parse_known_args()


def run(args: argparse.Namespace, opts: list[str]) -> None:
    """Compute, print and (with --out) save one analysis."""
    if args.command == "sensitivity":
        if not args.checkpoint:
            raise ConfigError("sensitivity needs --checkpoint: it measures how a trained model degrades when pruned")
        result = analyze.sensitivity(args.config, args.checkpoint, args.groups, args.ratios, args.importance,
                                     args.round_to, opts)
        for group, points in result["groups"].items():
            print(group, [(p["ratio"], round(p["det/mAP"], 4), round(p["seg/mIoU"], 4)) for p in points])
        if args.out:
            analyze.write_json(result, args.out / "sensitivity.json")
            analyze.plot_sensitivity(result, args.out / "sensitivity.png")
        return
    model, _, batch = analyze.load_for_analysis(args.config, args.checkpoint, opts)
    if args.command == "complexity":
        rows = analyze.module_complexity(model, batch, depth=args.depth)
        print(analyze.complexity_table(rows))
    else:
        rows = analyze.module_latency(model, batch, depth=args.depth, repeats=args.repeats)
        print(analyze.latency_table(rows))
    if args.out:
        analyze.write_json(rows, args.out / f"{args.command}.json")


def main() -> int:
    """Run the analysis; configuration and checkpoint problems are one-line errors."""
    args, opts = parse()
    try:
        prepare_bevfusion(args.config, cpu_ops=args.cpu_ops)
        run(args, opts)
    except (ConfigError, CheckpointError, CompressionStateError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
