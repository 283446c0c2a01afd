#!/usr/bin/env bash
# Set up (idempotent), run one benchmark (or all of them) and regenerate benchmarks/README.md from the results:
#   bash scripts/bench.sh quality|cost_scaling|qat_step|deploy_latency|roofline_check|deploy_runtime|all [options]
# (deploy_runtime and deploy_accuracy use the demo run: run scripts/demo.sh first)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAMES=(quality cost_scaling qat_step deploy_latency structure_latency roofline_check deploy_runtime deploy_accuracy)
if [ $# -lt 1 ]; then echo "usage: $0 {${NAMES[*]// /|}|all} [options]" >&2; exit 2; fi
name="$1"; shift
if [ "$name" = all ]; then
    if [ $# -gt 0 ]; then echo "error: options go with one benchmark, not 'all'" >&2; exit 2; fi
    selected=("${NAMES[@]}")
else
    selected=("$name")
fi
for n in "${selected[@]}"; do
    if [ ! -f "$ROOT/benchmarks/$n.py" ]; then echo "error: no benchmark '$n' (one of: ${NAMES[*]}, all)" >&2; exit 2; fi
done
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
for n in "${selected[@]}"; do
    echo "== benchmarks/$n.py $*"
    python "benchmarks/$n.py" "$@"
done
python benchmarks/summarize.py
