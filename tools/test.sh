#!/usr/bin/env bash
# The test command (README.md "Tests"; .ci/run runs the same steps): sets
# up what the tests need, then runs the whole workspace's tests on Mesa's
# software Vulkan driver. Extra arguments go to `cargo test`.
set -euo pipefail
source "$(dirname "$0")/test-setup.sh"
start=$(date +%s)
cargo test --release --workspace "$@"
# The benchmark driver's own checks (standard library only: no torch needed).
python3 -m unittest discover -s tools/bench -p "test_*.py"
echo "tests took $(( $(date +%s) - start )) s"
