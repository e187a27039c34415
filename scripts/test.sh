#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. CI runs exactly this.
# The suite also checks GGUF exports in llama.cpp itself: llama-cpp-python compiles llama.cpp when it is
# installed (once, about 5 minutes on 2 cores), so only this script, not setup.sh, installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c "import llama_cpp" 2>/dev/null \
  || .venv/bin/python -m pip install -q --disable-pip-version-check "llama-cpp-python>=0.3.36"
exec .venv/bin/python -m pytest tests "$@"
