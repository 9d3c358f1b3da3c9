#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what the tests need, then runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-deps.sh
cargo test --workspace --all-targets
scripts/e2e-browser.sh
# The deployment artifacts (Dockerfile, Helm chart, compose stack, Prometheus rules, Grafana dashboard),
# validated offline, then broken on purpose to show the validation catches it. Uses the pubgate binary
# the tests just built.
PUBGATE_BIN="${PUBGATE_BIN:-$PWD/target/debug/pubgate}" scripts/validate-deploy.sh --self-test
if [[ -x scripts/autobahn.sh ]]; then
  scripts/autobahn.sh
fi
