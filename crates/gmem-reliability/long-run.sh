#!/bin/sh
# Longer reliability runs than CI affords (CI runs `cargo test -p gmem-reliability`: 100,000
# model operations, 6 s of stress per backing). Usage, from anywhere in the repository:
#
#   crates/gmem-reliability/long-run.sh [model-ops] [stress-seconds] [fuzz-seconds-per-target]
#
# Defaults: 2,000,000 model operations (about 5 minutes), 120 s of stress per backing, 300 s
# per fuzz target (fuzzing needs nightly and cargo-fuzz; it is skipped without them). Set
# GMEM_MODEL_SEED to explore other sequences; a divergence prints its seed and the shrunk
# sequence.
set -eu
ops="${1:-2000000}"
stress="${2:-120}"
fuzz="${3:-300}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
GMEM_MODEL_OPS="$ops" cargo test --release -p gmem-reliability --test model -- --nocapture
GMEM_STRESS_SECS="$stress" cargo test --release -p gmem-reliability --test stress --test stress_views -- --nocapture --test-threads 1
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    fuzz/run.sh "$fuzz"
else
    echo "skipped: fuzzing (needs a nightly toolchain and cargo-fuzz)"
fi
