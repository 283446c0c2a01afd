"""Drop-in for BEVFusion's tools/train.py.

torchpack dist-run -np N python tools/train_compressed.py CONFIG [--run-dir DIR] [--cpu-ops] [--recipe FILE ...]
    [--a.b value ...]

--recipe FILE (repeatable): a YAML file merged over the config before the overrides (compression recipes under
configs/compression/, data/size overlays such as configs/bevfusion/synthetic_cpu.yaml).
"""

import argparse
import sys

from bevfusion_ext.compression import CheckpointError
from bevfusion_ext.compression.state import CompressionStateError
from bevfusion_ext.runner import ConfigError, RankMismatchError, train
from bevfusion_ext.runner.hooks import NonFiniteError
from bevfusion_ext.runner.quantization import NonFiniteAmaxError
from bevfusion_ext.runner.upstream import CPU_OPS_HELP, prepare_bevfusion


def main() -> int:
    """Parse BEVFusion's CLI (config, --run-dir, free-form `--key value` overrides) and train."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("config", metavar="FILE", help="YAML config under configs/ (default.yaml parents are applied)")
    parser.add_argument("--run-dir", metavar="DIR", help="run directory (default: runs/<config>-<time>)")
    parser.add_argument("--cpu-ops", action="store_true", help=CPU_OPS_HELP)
    args, opts = parser.parse_known_args()
    try:
        prepare_bevfusion(args.config, cpu_ops=args.cpu_ops)
        train(args.config, opts, args.run_dir)
    except (ConfigError, CheckpointError, CompressionStateError, RankMismatchError, NonFiniteError,
            NonFiniteAmaxError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
