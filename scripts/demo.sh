#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the built-in demo: the tiny BEVFusion-shaped reference model on
# synthetic camera + lidar scenes, trained with 2 ranks under `torchpack dist-run`, leaving runs/demo/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
RUN="${DEMO_RUN_DIR:-runs/demo}"
NP="${DEMO_NP:-2}"
if [ -d "$RUN" ]; then echo "== removing the previous demo run $RUN"; rm -rf "$RUN"; fi

echo "== baseline: ${NP}-rank training of configs/synthetic/multitask/tiny.yaml -> $RUN/baseline"
torchpack dist-run -np "$NP" python tools/train_compressed.py configs/synthetic/multitask/tiny.yaml \
    --run-dir "$RUN/baseline"
echo "== baseline metrics (epoch 0 = before training)"
python tools/report.py "$RUN/baseline"
