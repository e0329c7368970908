#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite (slow tests included), then the vLLM rollout's
# tests in vLLM's own environment (scripts/setup_vllm.sh: vLLM pins its own packages).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
bash scripts/setup_vllm.sh
status=0
.venv/bin/python -m pytest -q -ra --durations=20 "$@" || status=$?
if [ $# -eq 0 ]; then  # the whole suite was asked for: the vLLM part too
  .venv-vllm/bin/python -m pytest -q -ra tests/with_vllm || status=$?
fi
exit $status
