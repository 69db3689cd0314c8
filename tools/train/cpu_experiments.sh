#!/usr/bin/env bash
# The CPU measurements of tools/train/README.md (issue 23): the old loop
# against the new one and the recipe alternatives, each from the shipped
# weights at 64x64, 8 frames, a budget of 256 clips seen, seeds 0 and 1, one
# thread. Each run's held-out loss is in runs/recipe/NAME/configs.json
# (train.window.heldout_loss_end). About 3 to 5 minutes a run on a shared
# 2-core machine; a run already finished is skipped.
#
#   PY=/tmp/wan-venv/bin/python bash tools/train/cpu_experiments.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
mkdir -p runs/recipe
common=(--device cpu --threads 1 --resume-from assets/models/default --size 64 --frames 8 --clips-budget 256
        --no-state --no-sample --no-heldout-start --log-every 8 --unet-seconds 100000 --save-every 100000)
run() {
  local name=$1; shift
  grep -qs heldout_loss_end "runs/recipe/$name/configs.json" && return
  OMP_NUM_THREADS=1 nice -n 19 "$PY" tools/train/train.py --out "runs/recipe/$name" "${common[@]}" "$@" \
    > "runs/recipe/$name.log" 2>&1
}
for s in 0 1; do
  run old-s$s --seed $s --clips 2 --lr 5e-4 --lr-rule none --legacy-loop   # the old loop and batch
  run new-s$s --seed $s --clips 8 --lr 5e-4 --lr-ref-clips 2               # 4x batch, sqrt rule: 1e-3
  run same-s$s --seed $s --clips 8 --lr 5e-4 --lr-rule none                # 4x batch, same rate
done
# The recipe alternatives, against same-s0/s1 (the better loop above).
for s in 0 1; do
  run frozen-s$s --seed $s --clips 8 --lr 5e-4 --lr-rule none --freeze-te-after 0
  run canon-s$s --seed $s --clips 8 --lr 5e-4 --lr-rule none --canonical-share 0.5
  run direct-s$s --seed $s --clips 8 --lr 5e-4 --lr-rule none --action-weights left=2,right=2,up=2,down=2,falling=2
  run moving-s$s --seed $s --clips 8 --lr 5e-4 --lr-rule none --camera-weights static=0.5
done
for name in old new same frozen canon direct moving; do
  for s in 0 1; do
    printf '%-8s seed %s  ' $name $s
    "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['train']['window']['heldout_loss_end'])" \
      "runs/recipe/$name-s$s/configs.json" 2>/dev/null || echo "-"
  done
done
