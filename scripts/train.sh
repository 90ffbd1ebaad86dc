#!/usr/bin/env bash
# The main job: installs the CUDA compiler (pinned PyPI wheels, once) so the binary carries its kernels,
# builds, and runs `bertcuda train` with the given arguments — none: a tiny BERT on the sample corpus,
# on the GPU when there is one, else the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-compiler.sh
cargo run --release --quiet -- train "$@"
