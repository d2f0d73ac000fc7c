#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 60 s each) on the installed stable
# toolchain, seeded with the corpus kept here. Outside CI:
#
#   cargo install cargo-fuzz --locked        # once
#   fuzz/run.sh [SECONDS]
#
# A crash leaves its input under fuzz/artifacts/TARGET/: make it a regression test in the normal
# suite, fix it, and keep the input in fuzz/corpus/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
export RUSTC_BOOTSTRAP=1   # cargo-fuzz's sanitizer flags need it on a stable toolchain
for target in body keys config sse; do
  # New inputs go to the first directory (ignored by git); the seeds kept in the repo are read.
  mkdir -p "corpus/$target" "target/corpus/$target"
  echo "== $target (${seconds}s)"
  cargo fuzz run "$target" "target/corpus/$target" "corpus/$target" -- \
    -max_total_time="$seconds" -max_len=65536
done
