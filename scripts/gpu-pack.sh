#!/usr/bin/env bash
# Build, here, everything the GPU machine runs (it has no Rust toolchain): the release binary and the GPU
# test executables (tests/gpu.rs, and the library's: the op families' tests), stripped, into .gpu/
# (git-ignored), with scripts/gpu-check.sh and the benches.
# Then on the GPU machine, from the repository root:  scripts/gpu-check.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-compiler.sh
rm -rf .gpu && mkdir -p .gpu/tests
cargo build --release --bins
# The test executable of `cargo test --release --no-run ARGS` into .gpu/tests/NAME.
pack_test() {  # pack_test NAME ARGS...
  local name=$1; shift
  cargo test --release --no-run "$@" --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["executable"])
' | while read -r exe; do cp "$exe" ".gpu/tests/$name"; done
}
pack_test gpu --test gpu
pack_test ops --lib
cp target/release/bertcuda .gpu/
strip .gpu/bertcuda .gpu/tests/gpu .gpu/tests/ops
du -sh .gpu
