#!/usr/bin/env bash
# Idempotent set-up: Open MPI from Debian, .venv with the pinned CPU stack, bevfusion_ext installed editable.
# Re-running is cheap: each step is skipped when the stamp for the current pin set is present.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.bevfusion_ext_setup"
PINS_HASH="$(sha256sum "$ROOT/scripts/setup.sh" "$ROOT/setup.py" | sha256sum | cut -c1-16)"

log() { printf '[setup] %s\n' "$*"; }

if ! command -v mpirun >/dev/null 2>&1 || ! command -v shellcheck >/dev/null 2>&1; then
  log "installing Open MPI (torchpack dist-run) and shellcheck (checks the generated Orin build scripts)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openmpi-bin libopenmpi-dev shellcheck >/dev/null
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$PINS_HASH" ]; then
  log "environment up to date ($VENV)"
  exit 0
fi

[ -x "$PY" ] || { log "creating $VENV"; python3 -m venv "$VENV"; }
PIP=("$PY" -m pip install --disable-pip-version-check -q)

log "torch 2.14.1 + torchvision 0.29.1 (a matching pair; mmcv's runner imports torchvision)"
"${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
log "BEVFusion's pinned OpenMMLab stack: mmcv 1.4.0 (built without compiled ops), mmdet 2.20.0, mmsegmentation 0.20.2"
"${PIP[@]}" "setuptools>=77,<81" wheel "yapf==0.40.1" addict
MMCV_WITH_OPS=0 "${PIP[@]}" --no-build-isolation "mmcv==1.4.0"
# --no-deps: their requirement lists pull a CUDA mmcv-full or a newer numpy; what they import is listed below.
"${PIP[@]}" --no-deps "mmdet==2.20.0" "mmsegmentation==0.20.2" nuscenes-devkit
"${PIP[@]}" six scikit-learn cachetools parameterized terminaltables pycocotools pyquaternion shapely descartes numba "opencv-python-headless" prettytable \
  "scikit-image" motmetrics
log "torchpack 0.3.1 without its CUDA dependencies, mpi4py"
"${PIP[@]}" --no-deps "torchpack==0.3.1"
"${PIP[@]}" loguru multimethod toml tqdm scipy pyyaml mpi4py
log "compression, export and tooling stack"
"${PIP[@]}" "nvidia-modelopt==0.47.0" requests huggingface_hub "torch-pruning==1.6.1" "pytorch-quantization==2.1.3" \
  onnx onnxruntime onnxsim wandb tensorboard matplotlib pytest ruff
log "bevfusion_ext (editable)"
"${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
echo "$PINS_HASH" > "$STAMP"
log "done: $VENV"
