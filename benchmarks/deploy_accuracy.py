"""Accuracy of the deployed demo model: the demo run's QAT checkpoint exported by tools/export_engine.py, then
tools/eval_deployed.py over the validation set (FP32 and INT8 Q/DQ parts through the bundle's runtime on onnxruntime,
scored with the training evaluator, beside PyTorch on the same checkpoint, plus per-frame box and mask agreement).

    bash scripts/demo.sh                                   # the demo run: runs/demo/{baseline,pruned,qat}
    .venv/bin/python benchmarks/deploy_accuracy.py [--run runs/demo]

Both tools run as a user runs them (subprocesses of the real CLIs); the bundle goes to <run>/deploy (replaced).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import ROOT, run_cli, save, write_section

from bevfusion_ext.export.accuracy import markdown

CONFIG = "configs/synthetic/multitask/tiny.yaml"  # scripts/demo.sh's reference config



def main() -> None:
    """Export, evaluate, and keep the bundle's eval.json as this benchmark's result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="a scripts/demo.sh run directory")
    args = parser.parse_args()
    checkpoint, bundle = args.run / "qat" / "latest.pth", args.run / "deploy"
    if not (ROOT / checkpoint).exists():
        sys.exit(f"error: no {checkpoint}: run `bash scripts/demo.sh` first (or pass --run)")
    python = sys.executable
    export = [python, "tools/export_engine.py", CONFIG, str(checkpoint), "--out", str(bundle), "--force"]
    evaluate = [python, "tools/eval_deployed.py", CONFIG, str(bundle)]
    seconds = {"export": run_cli(export), "eval_deployed": run_cli(evaluate)}
    result = json.loads((ROOT / bundle / "eval.json").read_text())
    save("deploy_accuracy", {"commands": [export, evaluate], "seconds": seconds,
                             "load_average_at_end": os.getloadavg(), **result})
    header = (
        "## Accuracy of the deployed demo model (`deploy_accuracy.py`)\n\n"
        f"The QAT checkpoint of a `scripts/demo.sh` run (tiny model: baseline -> progressive pruning -> PTQ + QAT, "
        f"2 ranks), exported by `tools/export_engine.py` and scored by `tools/eval_deployed.py` "
        f"({seconds['export']:.0f} s + {seconds['eval_deployed']:.0f} s on this CPU). What eval.md says:\n\n"
    )
    body = markdown(result).split("\n", 1)[1].lstrip()  # eval.md without its own title
    write_section("deploy_accuracy", header + body)


if __name__ == "__main__":
    main()
