#!/usr/bin/env bash
# Build, here, everything the GPU machine runs (it has no Rust toolchain): the release binary and the GPU
# test executable, stripped, into .gpu/ (git-ignored), with scripts/gpu-check.sh and the benches.
# Then on the GPU machine, from the repository root:  scripts/gpu-check.sh OUTDIR
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-compiler.sh
rm -rf .gpu && mkdir -p .gpu/tests
cargo build --release --bins
cargo test --release --no-run --test gpu --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["executable"])
' | while read -r exe; do cp "$exe" .gpu/tests/gpu; done
cp target/release/bertcuda .gpu/
strip .gpu/bertcuda .gpu/tests/gpu
du -sh .gpu
