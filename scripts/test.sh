#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-deps.sh
cargo test --workspace --all-targets
scripts/e2e-browser.sh
if [[ -x scripts/autobahn.sh ]]; then
  scripts/autobahn.sh
fi
