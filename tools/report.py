"""Print what a training run recorded: `python tools/report.py runs/demo/baseline`."""

import argparse
import sys

from bevfusion_ext.runner.report import metrics_table


def main() -> int:
    """Print the metrics table of a run directory."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    args = parser.parse_args()
    try:
        print(metrics_table(args.run_dir))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
