#!/usr/bin/env bash
# One GPU window for the bundled model, in one command of at most 10 minutes
# (issue 23): a timed throughput run (the old loop against the new one),
# training continued from the shipped weights for what is left of about
# 8 minutes, the held-out evaluation of both models, and the f16 export when
# the candidate is better. Everything that must come back lands in $OUT, in
# at most 8 files, each under 16 MB:
#
#   bench.json             clips/s of the old and the new loop
#   window.json            the decision, the window's record, both evaluations
#   log.txt                the run's output
#   unet.safetensors       } only when the candidate ships: the new f16
#   text_encoder.safetensors }   weights (the VAE is frozen, so unchanged)
#   card.tar               } and the rest of the model folder (configs,
#                              motif.json, README.md with the window logged)
#   card-only.tar          when it does not ship: motif.json and README.md
#                              with the window logged
#
# Put it back in the repository (FILES = where the files came back):
#   cp $FILES/unet.safetensors assets/models/default/unet/diffusion_pytorch_model.safetensors
#   cp $FILES/text_encoder.safetensors assets/models/default/text_encoder/model.safetensors
#   tar -xf $FILES/card.tar -C assets/models/default      # or card-only.tar
#
# On the device machine (python3 there has torch and transformers but not
# diffusers: carry the wheel, see tools/train/README.md):
#   run(carry=[".whl"], timeout_s=600, command="bash tools/train/gpu_window.sh")
# Here, to check the script's logic on the CPU in a few minutes:
#   OUT=/tmp/win PY=/tmp/wan-venv/bin/python bash tools/train/gpu_window.sh --tiny
#
# Knobs (environment): WINDOW_S total seconds (570, inside run's 600), CLIPS clips per step
# (96), LR the learning rate (3e-4, what the shipped model's second run
# continued with) and LR_RULE how it follows CLIPS from 24 clips per step
# (none: on the CPU, raising it with the batch when continuing from the
# shipped weights lost on both seeds; tools/train/README.md), COMPILE a
# torch.compile mode for the new loop (none).
set -euo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
[[ $# -gt 0 && "$1" != "--tiny" ]] && { echo "usage: $0 [--tiny]" >&2; exit 2; }
OUT=${OUT:?"OUT must name the folder for the results"}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/window.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUT/log.txt") 2>&1
if [[ -d .whl ]] && compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
"$PY" -c "import torch, diffusers, transformers, safetensors" || {
  echo "error: $PY lacks torch, diffusers, transformers or safetensors (carry .whl, see tools/train/README.md)"; exit 2; }

WINDOW_S=${WINDOW_S:-570}
CLIPS=${CLIPS:-96}
LR=${LR:-3e-4}
LR_RULE=${LR_RULE:-none}
COMPILE=${COMPILE:-none}
SHIPPED=assets/models/default
if [[ $TINY == 1 ]]; then
  DEV=cpu; SIZE=64; FRAMES=8; BENCH=1; OLD_CLIPS=2; CLIPS=4; EVAL=(--limit 2 --size 64 --frames 8 --batch 2)
  COMMON=(--threads 1); RESERVE=200; TRAIN_CAP=40; WINDOW_S=${WINDOW_S_TINY:-900}
else
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "error: no CUDA device for torch (use --tiny for the CPU check)"; exit 2; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
  DEV=cuda; SIZE=128; FRAMES=16; BENCH=20; OLD_CLIPS=24; EVAL=(--batch 48)
  COMMON=(); RESERVE=150; TRAIN_CAP=480
fi
elapsed() { echo $(( $(date +%s) - START )); }

echo "== throughput ($(elapsed) s)"
"$PY" tools/train/train.py --out "$WORK/bench-old" --device $DEV "${COMMON[@]}" --resume-from $SHIPPED \
  --size $SIZE --frames $FRAMES --clips $OLD_CLIPS --legacy-loop --bench $BENCH --bench-warmup 2
"$PY" tools/train/train.py --out "$WORK/bench-new" --device $DEV "${COMMON[@]}" --resume-from $SHIPPED \
  --size $SIZE --frames $FRAMES --clips $CLIPS --channels-last --compile $COMPILE --bench $BENCH --bench-warmup 3
"$PY" - "$WORK" "$OUT/bench.json" <<'EOF'
import json, sys
old = json.load(open(f"{sys.argv[1]}/bench-old/bench.json"))
new = json.load(open(f"{sys.argv[1]}/bench-new/bench.json"))
res = dict(old=old, new=new, speedup=round(new["clips_per_s"] / old["clips_per_s"], 2))
json.dump(res, open(sys.argv[2], "w"), indent=1)
print(f"old {old['clips_per_s']} clips/s, new {new['clips_per_s']} clips/s: {res['speedup']}x")
EOF

# Training gets what is left after the evaluation's reserve and about 60 s
# of its own start-up, held-out loss and save, at most 8 minutes.
TRAIN_S=$(( WINDOW_S - $(elapsed) - RESERVE - 60 ))
(( TRAIN_S > TRAIN_CAP )) && TRAIN_S=$TRAIN_CAP
if (( TRAIN_S < 20 )); then
  echo "error: only ${TRAIN_S}s left for training after the throughput run; nothing trained"; exit 1
fi
echo "== training ${TRAIN_S}s from the shipped weights ($(elapsed) s)"
# The loop stops itself before TRAIN_S; the timeout (loading, the held-out
# loss at both ends and the final save on top) is a safety net that falls
# back on the last periodic checkpoint.
timeout $(( TRAIN_S + 90 )) "$PY" tools/train/train.py --out "$WORK/run" --device $DEV "${COMMON[@]}" \
  --resume-from $SHIPPED --size $SIZE --frames $FRAMES --clips $CLIPS --lr $LR --lr-ref-clips 24 --lr-rule $LR_RULE --channels-last \
  --compile $COMPILE --unet-seconds $TRAIN_S --deadline-margin 10 --no-state --no-sample --log-every 50 \
  --save-every 120 || {
  rc=$?; [[ -f "$WORK/run/unet.safetensors" ]] || { echo "error: training failed (exit $rc), no checkpoint"; exit $rc; }
  echo "training stopped (exit $rc); the last checkpoint goes on"; }

echo "== evaluation and decision ($(elapsed) s)"
rc=0
"$PY" tools/train/ship.py "$WORK/run" --shipped $SHIPPED --out "$WORK/model" --device $DEV "${EVAL[@]}" \
  --report "$OUT/window.json" || rc=$?
if [[ $rc == 0 ]]; then
  cp "$WORK/model/unet/diffusion_pytorch_model.safetensors" "$OUT/unet.safetensors"
  cp "$WORK/model/text_encoder/model.safetensors" "$OUT/text_encoder.safetensors"
  (cd "$WORK/model" && tar -cf "$OUT/card.tar" --exclude='*.safetensors' --exclude=tokenizer .)
  echo "shipped: the new weights are in $OUT"
elif [[ $rc == 3 ]]; then
  (cd "$WORK/model" && tar -cf "$OUT/card-only.tar" motif.json README.md)
  echo "not shipped: the window is logged in card-only.tar"
else
  echo "error: ship.py failed (exit $rc)"; exit $rc
fi
echo "== done in $(elapsed) s"
