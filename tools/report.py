"""Print what training runs recorded.

    python tools/report.py runs/demo/baseline                       # every evaluation of one run
    python tools/report.py --pipeline runs/demo --config CONFIG     # baseline -> pruned -> PTQ -> QAT side by side
        [--cpu-ops] [--recipe FILE] [--a.b value]                   # the config's overlays / overrides, as trained
"""
import argparse
import json
import sys
from pathlib import Path

from bevfusion_ext.compression.pruning import count_params_flops
from bevfusion_ext.runner.config import ConfigError
from bevfusion_ext.runner.rebuild import load_compressed_model
from bevfusion_ext.runner.report import compression_stages, headline, metrics_table, qat_recovery, stages_table
from bevfusion_ext.runner.upstream import CPU_OPS_HELP, prepare_bevfusion


def pipeline_report(root: Path, config: str, opts: list[str]) -> str:
    """The stage table of root/{baseline,pruned,qat}, written to root/report.md and root/report.json."""
    runs = {name: root / name for name in ("baseline", "pruned", "qat")}
    present = {name: path if (path / "metrics.jsonl").is_file() else None for name, path in runs.items()}
    if present["baseline"] is None:
        raise FileNotFoundError(f"{root}/baseline/metrics.jsonl: no baseline run recorded")
    stages = compression_stages(present["baseline"], present["pruned"], present["qat"])
    sizes = {}
    for path in filter(None, present.values()):
        model, _, batch = load_compressed_model(config, str(path / "latest.pth"), opts)
        sizes[str(path)] = count_params_flops(model, batch)
    recovery = {k: qat_recovery(stages, k) for k in headline(stages)}
    lines = [stages_table(stages, sizes), "",
             "QAT recovery of what PTQ lost: " + ", ".join(
                 f"{k} {'n/a (PTQ lost nothing)' if v is None else f'{v:.0%}'}" for k, v in recovery.items())]
    text = "\n".join(lines)
    (root / "report.md").write_text(f"# Compression pipeline on {config}\n\n{text}\n")
    (root / "report.json").write_text(json.dumps({"stages": stages, "sizes": sizes, "qat_recovery": recovery},
                                                 indent=2))
    return text


def main() -> int:
    """One run's evaluations, or a whole compression pipeline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--pipeline", action="store_true", help="run_dir holds baseline/, pruned/ and qat/ runs")
    parser.add_argument("--config", help="the config the runs were trained with (for params/FLOPs)")
    parser.add_argument("--cpu-ops", action="store_true", help=CPU_OPS_HELP)
    args, opts = parser.parse_known_args()
    try:
        if args.pipeline:
            if not args.config:
                raise FileNotFoundError("--pipeline needs --config (the config the runs were trained with)")
            prepare_bevfusion(args.config, cpu_ops=args.cpu_ops)
            print(pipeline_report(args.run_dir, args.config, opts))
        else:
            print(metrics_table(args.run_dir))
    except (FileNotFoundError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
