#!/usr/bin/env bash
# The whole GPU benchmark in one command, for a Linux machine with an NVIDIA
# GPU, PyTorch and no network (the project's lent H100/H200):
#
#   bash tools/bench/gpu_run.sh OUT_DIR
#
# What it needs beside the repository, all prepared on a machine with a network:
#   .gl/*.deb      the Vulkan loader (Debian's libvulkan1 and the GL dispatch
#                  libraries), unpacked here when the system has no loader
#   .whl/*.whl     diffusers (and importlib_metadata), installed to /tmp/site
#   .devbin/motif.xz, or target/release/motif: a release build of motif
#
# It checks that wgpu picks the NVIDIA adapter, runs the cooperative-matrix
# check, the operator benchmarks and the side-by-side comparison with
# PyTorch at the full SD1.5 + AnimateDiff size (random weights), and writes
# every log and table to OUT_DIR. Each stage has its own time limit, so a
# slow or failing stage still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: gpu_run.sh OUT_DIR}
mkdir -p "$OUT"
STEPS=${STEPS:-4,25}
SIZE=${SIZE:-512x512x16}
ITERS=${ITERS:-3}
# The whole run's budget in seconds (the lent machine allows 600 per command):
# every stage gets at most what is left of it.
DEADLINE=$(( $(date +%s) + ${BUDGET:-540} ))
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/run.log"; }
# limit SECONDS: the smaller of SECONDS and what is left of the budget (at least 1).
limit() { local left=$(( DEADLINE - $(date +%s) )); [ "$left" -lt 1 ] && left=1; [ "$1" -lt "$left" ] && echo "$1" || echo "$left"; }

if ! ldconfig -p | grep -q libvulkan.so.1; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
MOTIF=target/release/motif
if [ -f .devbin/motif.xz ]; then
  xz -dc .devbin/motif.xz >/tmp/motif && chmod +x /tmp/motif && MOTIF=/tmp/motif
fi
export MOTIF_CACHE_DIR=/tmp/motif-cache
NV_ICD=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
if { ! "$MOTIF" info >"$OUT/info.txt" 2>&1 || ! grep -qi nvidia "$OUT/info.txt"; } && [ -f "$NV_ICD" ]; then
  export VK_DRIVER_FILES=$NV_ICD
  "$MOTIF" info >"$OUT/info.txt" 2>&1
fi
export MOTIF_ADAPTER=${MOTIF_ADAPTER:-nvidia}
log "adapter: $(grep -m1 '^chosen' "$OUT/info.txt")"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$OUT/info.txt" 2>&1
python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)' >>"$OUT/info.txt" 2>&1

log "cooperative-matrix check"
if [ "${COOP:-1}" = 1 ] && "$MOTIF" bench --help | grep -q -- --coop; then
  timeout $(limit 60) "$MOTIF" bench --coop >"$OUT/coop.txt" 2>&1; log "coop exit $?"
fi

log "PyTorch matmul 4096^3 fp16"
timeout $(limit 40) python3 tools/bench/torch_side.py --matmul >"$OUT/torch_matmul.txt" 2>&1

log "full-size model (random weights)"
timeout $(limit 90) python3 tools/bench/torch_side.py --make-full /tmp/full >"$OUT/make_full.txt" 2>&1; log "make-full exit $?"

log "side by side, $STEPS steps"
# Each side gets half of what is left, less a reserve for the later stages.
SIDE=$(( ( $(limit 100000) - ${RESERVE:-70} ) / 2 ))
[ "$SIDE" -lt 30 ] && SIDE=30
PYTHONUNBUFFERED=1 timeout $(limit $((2 * SIDE + 20))) python3 tools/bench/compare.py --model /tmp/full --steps "$STEPS" --size "$SIZE" \
  --iters "$ITERS" --motif "$MOTIF" --timeout "$SIDE" --out "$OUT/full" >"$OUT/compare.txt" 2>&1
log "compare exit $?"

log "second motif run: first preview with a warm pipeline cache"
timeout $(limit 60) "$MOTIF" bench --model /tmp/full --size "$SIZE" --steps 1 --iters 1 --json >"$OUT/warm_cache.json" 2>"$OUT/warm_cache.log"
log "warm-cache exit $?"

log "operators"
[ "${OPS:-1}" = 1 ] && timeout $(limit 40) "$MOTIF" bench --ops --all-precisions --iters 5 >"$OUT/ops.txt" 2>&1; log "ops exit $?"
log "done"
