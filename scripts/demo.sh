#!/usr/bin/env bash
# Set up (idempotent) and run the main job on the built-in demo: the tiny BEVFusion-shaped reference model on
# synthetic camera + lidar scenes, 2 ranks under `torchpack dist-run`:
#   baseline -> progressive pruning + fine-tune -> INT8 calibration (PTQ) + QAT -> Orin export bundle.
# Everything lands in runs/demo/ (replaced on every run); runs/demo/report.md compares the stages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
RUN="${DEMO_RUN_DIR:-runs/demo}"
NP="${DEMO_NP:-2}"
CONFIG=configs/synthetic/multitask/tiny.yaml
TRAIN=(torchpack dist-run -np "$NP" python tools/train_compressed.py "$CONFIG")
if [ -d "$RUN" ]; then echo "== removing the previous demo run $RUN"; rm -rf "$RUN"; fi

echo "== 1/4 baseline: ${NP}-rank training -> $RUN/baseline"
"${TRAIN[@]}" --run-dir "$RUN/baseline"

echo "== 2/4 progressive pruning (configs/compression/prune_seed.yaml) + fine-tune -> $RUN/pruned"
# round_to 4: the tiny model's layers have 16-128 channels (the recipe's 8 is for real BEVFusion widths).
"${TRAIN[@]}" --run-dir "$RUN/pruned" --recipe configs/compression/prune_seed.yaml \
    --compression.pruning.round_to 4 --load_from "$RUN/baseline/latest.pth"

echo "== 3/4 INT8 calibration + QAT (configs/compression/qat_int8.yaml) -> $RUN/qat"
"${TRAIN[@]}" --run-dir "$RUN/qat" --recipe configs/compression/qat_int8.yaml --load_from "$RUN/pruned/latest.pth"

echo "== 4/4 export: ONNX parts, DLA/GPU placement, calibration caches, trtexec scripts -> $RUN/deploy"
python tools/export_engine.py "$CONFIG" "$RUN/qat/latest.pth" --out "$RUN/deploy"

echo "== stages (also in $RUN/report.md)"
python tools/report.py "$RUN" --pipeline --config "$CONFIG"
