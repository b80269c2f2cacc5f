#!/bin/sh
# Fuzzes the preserved-state parser for the given number of seconds (default 60).
#
#   fuzz/run.sh 300
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). New inputs go to
# fuzz/corpus/state_parser (not committed); the committed seeds stay read-only.
set -eu
secs="${1:-60}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
mkdir -p corpus/state_parser
exec cargo +nightly fuzz run state_parser corpus/state_parser seeds/state_parser -- \
    -max_total_time="$secs" -max_len=1048576 -rss_limit_mb=2048
