#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs the pinned requirements into it.
#   bash launch/setup_env.sh          # runtime requirements
#   bash launch/setup_env.sh --test   # + test-only requirements (torch CPU, scikit-image)
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
fi
