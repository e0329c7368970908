#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/python -m pytest -q -ra --durations=20 "$@"
