#!/usr/bin/env bash
# The whole GPU benchmark in one command, at most 5 minutes, for a Linux
# machine with an NVIDIA GPU, PyTorch and no network (the project's lent
# H100/H200):
#
#   bash tools/bench/gpu_run.sh OUT_DIR              # the real run
#   bash tools/bench/gpu_run.sh --dry-run OUT_DIR    # every stage at tiny sizes,
#                                                    # on any adapter (lavapipe too)
#
# Stages, each with its own time limit inside the budget, so that a slow or
# failing stage still leaves the others' results:
#   1. adapter check (wgpu must pick the NVIDIA adapter)
#   2. `motif bench --tune`: the tuner on the models' shape classes (every
#      tensor-core tiling of matmul and convolution, at most TUNE_SECONDS); writes the
#      tuning file the later stages route by, and Motif's side of matmul 4096³
#      and attention at 4,096 (8 x 40) and 32,760 tokens (12 x 128): the
#      portable kernel and the tensor-core flash-attention variants that fit
#   3. with COOP=1 only: `motif bench --coop` (every tensor-core kernel against
#      the CPU reference; the tuner already checks each variant it chooses from)
#   4. PyTorch: matmul 4096³ (cuBLAS), SDPA at 4,096 and 32,760 tokens
#   5. Wan2.1-1.3B step at 832x480x81, random weights, both sides
#   6. AnimateDiff at 512x512x16, random full-size weights: UNet step, VAE
#      decode, whole generations, both sides (tools/bench/compare.py)
#   7. tools/bench/gpu_summary.py: one JSON and one table to docs/bench/ and
#      docs/PERFORMANCE.md (and OUT_DIR/summary.*)
#
# What it needs beside the repository, all prepared on a machine with a network:
#   .gl/*.deb      the Vulkan loader (Debian's libvulkan1 and the GL dispatch
#                  libraries), unpacked here when the system has no loader
#   .whl/*.whl     diffusers (and importlib_metadata), installed to /tmp/site
#   .devbin/motif.xz, or target/release/motif: a release build of motif
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: gpu_run.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
rm -f "$OUT/DRY_RUN"
if [ "$DRY" = 1 ]; then
  touch "$OUT/DRY_RUN"
  # Tiny sizes: the plumbing of every stage, in a minute or two on a CPU.
  SIZE=${SIZE:-64x64x2}; WAN_SIZE=${WAN_SIZE:-64x64x5}; STEPS=${STEPS:-2}; ITERS=${ITERS:-1}
  WAN_ARGS=(--wan-layers 1)
  MODEL_ARGS=(--model assets/models/default)
else
  SIZE=${SIZE:-512x512x16}; WAN_SIZE=${WAN_SIZE:-832x480x81}; STEPS=${STEPS:-4}; ITERS=${ITERS:-1}
  WAN_ARGS=()
  MODEL_ARGS=(--full /tmp/full)
fi
# The whole run's budget in seconds: 5 minutes, so that it fits twice in a
# 15-minute GPU window with the machine's start.
DEADLINE=$(( $(date +%s) + ${BUDGET:-290} ))
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run.log"; }
# limit SECONDS: the smaller of SECONDS and what is left of the budget (at least 1).
limit() { local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt 1 ] && left=1; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }

if ! ldconfig -p | grep -q libvulkan.so.1 && ls .gl/*.deb >/dev/null 2>&1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
MOTIF=${MOTIF:-target/release/motif}
if [ -f .devbin/motif.xz ]; then
  xz -dc .devbin/motif.xz >/tmp/motif && chmod +x /tmp/motif && MOTIF=/tmp/motif
fi
# A fresh cache folder: the tuning file and pipelines of this run only.
export MOTIF_CACHE_DIR=${MOTIF_CACHE_DIR:-/tmp/motif-cache}
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if { ! "$MOTIF" info >"$OUT/info.txt" 2>&1 || ! grep -qi nvidia "$OUT/info.txt"; } && [ -f "$NV_ICD" ]; then
  export VK_DRIVER_FILES=$NV_ICD
  "$MOTIF" info >"$OUT/info.txt" 2>&1
fi
if [ "$DRY" = 0 ]; then export MOTIF_ADAPTER=${MOTIF_ADAPTER:-nvidia}; fi
log "adapter: $(grep -m1 '^chosen' "$OUT/info.txt")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$OUT/info.txt" 2>&1
TORCH=1
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)' >>"$OUT/info.txt" 2>&1 || TORCH=0
[ "$TORCH" = 0 ] && log "no PyTorch + diffusers here: the PyTorch side is skipped"

log "tuner"
# Every tensor-core tiling of matmul and convolution (engine/src/ops/matmul_coop.rs)
# on each shape class, most important classes first; no class starts after
# TUNE_SECONDS, so that the tuner ends (and writes its file) inside its limit.
timeout "$(limit 90)" "$MOTIF" bench --tune --tune-seconds "${TUNE_SECONDS:-60}" --iters "$ITERS" --json \
  >"$OUT/tune.json" 2>"$OUT/tune.log"; log "tune exit $?"

# The tuner already checks every variant it chooses from against the CPU
# reference; the longer tensor-core check runs only when asked for.
if [ "${COOP:-0}" = 1 ]; then
  log "cooperative-matrix check"
  timeout "$(limit 45)" "$MOTIF" bench --coop >"$OUT/coop.txt" 2>&1; log "coop exit $?"
fi

if [ "$TORCH" = 1 ]; then
  log "PyTorch matmul 4096^3 and SDPA"
  timeout "$(limit 20)" python3 tools/bench/torch_side.py --matmul >"$OUT/torch_matmul.txt" 2>&1
  timeout "$(limit 20)" python3 tools/bench/torch_side.py --attention >"$OUT/torch_attention.json" 2>"$OUT/torch_attention.log"
  log "torch ops exit $?"
fi

log "Wan2.1-1.3B step at $WAN_SIZE (random weights)"
timeout "$(limit 45)" "$MOTIF" bench --wan "${WAN_ARGS[@]}" --size "$WAN_SIZE" --iters 1 --json >"$OUT/wan.json" 2>"$OUT/wan.log"; log "wan exit $?"
if [ "$TORCH" = 1 ]; then
  PYTHONUNBUFFERED=1 timeout "$(limit 30)" python3 tools/bench/torch_side.py --wan-step "${WAN_ARGS[@]}" --size "$WAN_SIZE" --iters 1 \
    >"$OUT/torch_wan.json" 2>"$OUT/torch_wan.log"; log "torch wan exit $?"
fi

log "AnimateDiff side by side at $SIZE, $STEPS steps"
# Each side gets half of what is left, less a reserve for the summary.
SIDE=$(( ( $(limit 100000) - ${RESERVE:-10} ) / 2 ))
[ "$SIDE" -lt 20 ] && SIDE=20
ONLY=(); [ "$TORCH" = 0 ] && ONLY=(--only motif)
PYTHONUNBUFFERED=1 timeout "$(limit $((2 * SIDE + 5)))" python3 tools/bench/compare.py "${MODEL_ARGS[@]}" "${ONLY[@]}" \
  --steps "$STEPS" --size "$SIZE" --iters 1 --motif "$MOTIF" --timeout "$SIDE" --out "$OUT/full" >"$OUT/compare.txt" 2>&1
log "compare exit $?"

log "summary"
SUMMARY_DOCS=docs
# A dry run writes its table beside the logs, never into the repository's docs.
[ "$DRY" = 1 ] && SUMMARY_DOCS="$OUT/docs"
python3 tools/bench/gpu_summary.py "$OUT" --docs "$SUMMARY_DOCS" >>"$OUT/run.log" 2>&1; log "summary exit $?"
log "done"
