#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
