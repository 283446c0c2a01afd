#!/usr/bin/env bash
# Set up (idempotent) and run the main job, 2 ranks under `torchpack dist-run`:
#   baseline -> progressive pruning + fine-tune -> INT8 calibration (PTQ) + QAT -> Orin export bundle.
#   bash scripts/demo.sh          # the tiny BEVFusion-shaped reference model on synthetic scenes  -> runs/demo/
#   bash scripts/demo.sh real     # BEVFusion's own Swin-T camera+lidar model from its config tree, on its CPU op
#                                 # stand-ins and synthetic scenes in its batch format, at reduced resolution
#                                 # ($BEVFUSION_ROOT, default ../shared/third_party/bevfusion) -> runs/demo-real/
# The run directory is replaced on every run (DEMO_FROM_STAGE=2/3/4 keeps the earlier stages of the last run and
# redoes the rest); <run>/report.md compares the stages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export PATH="$ROOT/.venv/bin:$PATH"
NP="${DEMO_NP:-2}"
case "${1:-reference}" in
  reference)
    RUN="${DEMO_RUN_DIR:-runs/demo}"
    CONFIG=configs/synthetic/multitask/tiny.yaml
    COMMON=()
    # round_to 4: the tiny model's layers have 16-128 channels (the recipe's 8 is for real BEVFusion widths).
    PRUNE=(--compression.pruning.round_to 4)
    ;;
  real)
    RUN="${DEMO_RUN_DIR:-runs/demo-real}"
    export BEVFUSION_ROOT="${BEVFUSION_ROOT:-$(cd "$ROOT/.." && pwd)/shared/third_party/bevfusion}"
    CONFIG="$BEVFUSION_ROOT/configs/nuscenes/det/transfusion/secfpn/camera+lidar/swint_v0p075/convfuser.yaml"
    [ -f "$CONFIG" ] || { echo "error: no BEVFusion checkout at $BEVFUSION_ROOT: set BEVFUSION_ROOT" >&2; exit 2; }
    COMMON=(--cpu-ops --recipe configs/bevfusion/synthetic_cpu.yaml)
    PRUNE=()
    ;;
  *) echo "usage: bash scripts/demo.sh [reference|real]" >&2; exit 2 ;;
esac
TRAIN=(torchpack dist-run -np "$NP" python tools/train_compressed.py "$CONFIG" "${COMMON[@]}")
STAGE="${DEMO_FROM_STAGE:-1}"  # 2, 3 or 4 reuses the earlier stages of the previous run
if [ "$STAGE" = 1 ] && [ -d "$RUN" ]; then echo "== removing the previous demo run $RUN"; rm -rf "$RUN"; fi

if [ "$STAGE" -le 1 ]; then
  echo "== 1/4 baseline: ${NP}-rank training -> $RUN/baseline"
  "${TRAIN[@]}" --run-dir "$RUN/baseline"
fi
if [ "$STAGE" -le 2 ]; then
  echo "== 2/4 progressive pruning (configs/compression/prune_seed.yaml) + fine-tune -> $RUN/pruned"
  "${TRAIN[@]}" --run-dir "$RUN/pruned" --recipe configs/compression/prune_seed.yaml "${PRUNE[@]}" \
      --load_from "$RUN/baseline/latest.pth"
fi
if [ "$STAGE" -le 3 ]; then
  echo "== 3/4 INT8 calibration + QAT (configs/compression/qat_int8.yaml) -> $RUN/qat"
  rm -rf "$RUN/qat"
  "${TRAIN[@]}" --run-dir "$RUN/qat" --recipe configs/compression/qat_int8.yaml \
      --load_from "$RUN/pruned/latest.pth"
fi

echo "== 4/4 export: ONNX parts, DLA/GPU placement, calibration caches, trtexec scripts -> $RUN/deploy"
python tools/export_engine.py "$CONFIG" "$RUN/qat/latest.pth" --out "$RUN/deploy" --force "${COMMON[@]}"

echo "== stages (also in $RUN/report.md)"
python tools/report.py "$RUN" --pipeline --config "$CONFIG" "${COMMON[@]}"
