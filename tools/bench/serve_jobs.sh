#!/usr/bin/env bash
# Wall time of 5 small jobs (64x64, 4 frames, 2 steps, the bundled model) submitted
# back to back to one `motif serve` with one worker, from the first submission to
# the last job finished; and how many times the worker loaded the model.
# Usage: tools/bench/serve_jobs.sh [MOTIF_BINARY] [PORT]    (docs/PERFORMANCE.md)
set -euo pipefail
M=${1:-target/release/motif}
PORT=${2:-7498}
DATA=$(mktemp -d)
trap 'kill $PID 2>/dev/null; wait $PID 2>/dev/null; rm -rf "$DATA"' EXIT
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp}
# The token first: two processes creating the database at once race on its schema.
TOKEN=$("$M" admin create-token --data "$DATA" --admin)
"$M" serve --data "$DATA" --listen "127.0.0.1:$PORT" --workers 1 >"$DATA/serve.log" 2>&1 &
PID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/api/v1/health" >/dev/null && break; sleep 0.2; done
api() { curl -sf -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' "$@"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
start=$(date +%s.%N)
ids=()
for seed in 1 2 3 4 5; do
    ids+=("$(api -X POST "http://127.0.0.1:$PORT/api/v1/jobs" \
        -d "{\"prompt\": \"a red ball\", \"width\": 64, \"height\": 64, \"frames\": 4, \"steps\": 2, \"seed\": $seed}" | field id)")
done
for id in "${ids[@]}"; do
    while true; do
        state=$(api "http://127.0.0.1:$PORT/api/v1/jobs/$id" | field state)
        case $state in finished) break ;; failed|cancelled) echo "job $id $state"; exit 1 ;; esac
        sleep 0.1
    done
done
end=$(date +%s.%N)
echo "5 jobs: $(python3 -c "print(f'{$end - $start:.1f}')") s wall"
echo "model loads logged: $(grep -c 'model loaded:' "$DATA/serve.log" || true)"
grep -o 'model loaded: .*' "$DATA/serve.log" || true
