#!/bin/sh
# Fuzzes every parser of outside input, each for the given number of seconds (default 60):
#
#   fuzz/run.sh 300                 # every target, 300 s each
#   fuzz/run.sh 300 peer_hello      # one target
#
# Targets: state_parser (the preserved live-update state), peer_hello (the peer hello packet
# and run table another process sends), cli_object (the command line's QEMU -object syntax).
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). New inputs go to
# fuzz/corpus/<target> (not committed); the committed seeds stay read-only; crashes are written
# to fuzz/artifacts/<target>. One summary line per target is printed at the end, the form
# FUZZING.md records.
set -eu
secs="${1:-60}"
shift 2>/dev/null || true
targets="${*:-state_parser peer_hello cli_object}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
summary=""
status=0
for t in $targets; do
    mkdir -p "corpus/$t"
    log="$(mktemp)"
    if cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=1048576 -rss_limit_mb=2048 >"$log" 2>&1; then
        finding="none"
    else
        finding="CRASH: $(grep -o 'artifacts/[^ ]*' "$log" | tail -1)"
        status=1
    fi
    runs="$(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$log" | tail -1)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1)"
    summary="$summary$t: ${runs:-no summary (see log)}, $cov, findings: $finding
"
    tail -n 5 "$log"
    rm -f "$log"
done
printf '\n%s' "$summary"
exit $status
