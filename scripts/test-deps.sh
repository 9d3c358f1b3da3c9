#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine. Safe to run again: it skips what is there.
#
# What it cannot install is checked first, so a missing piece stops the run at once with its name
# instead of failing twenty minutes in: the conformance step (scripts/autobahn.sh) runs the Autobahn
# suite's wstest, which needs Python 2.7.18 through pyenv (or WSTEST=/path/to/wstest).
set -euo pipefail

PY2_VERSION=2.7.18
if [[ -z "${WSTEST:-}" ]]; then
  if ! command -v pyenv >/dev/null 2>&1; then
    echo "test-deps: missing pyenv: the conformance tests (Autobahn wstest) need Python $PY2_VERSION through pyenv." >&2
    echo "test-deps: install pyenv, then 'pyenv install $PY2_VERSION'; or set WSTEST=/path/to/wstest." >&2
    exit 1
  fi
  if ! pyenv prefix "$PY2_VERSION" >/dev/null 2>&1; then
    echo "test-deps: missing Python $PY2_VERSION in pyenv: the conformance tests (Autobahn wstest) need it." >&2
    echo "test-deps: run 'pyenv install $PY2_VERSION'; or set WSTEST=/path/to/wstest." >&2
    exit 1
  fi
fi

for tool in cargo node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "test-deps: missing $tool: the tests need a Rust toolchain (cargo) and Node.js with npm." >&2
    exit 1
  fi
done

# shellcheck source=scripts/apt-missing.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt-missing.sh"
# nginx + libnginx-mod-nchan: loadtest/tests/nchan.rs (pubgate-loadtest --protocol nchan).
apt_missing test-deps redis-server:redis-server haproxy:haproxy "nginx:nginx libnginx-mod-nchan"
