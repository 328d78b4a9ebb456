#!/usr/bin/env bash
# Installs uv from PyPI when it is missing; prints the path of the uv to use.
set -euo pipefail
if command -v uv >/dev/null 2>&1; then command -v uv; exit 0; fi
if [ -x "$HOME/.local/bin/uv" ]; then echo "$HOME/.local/bin/uv"; exit 0; fi
PY=$(command -v python3 || command -v python)
"$PY" -m pip install --quiet --user uv >&2 || "$PY" -m pip install --quiet uv >&2
command -v uv 2>/dev/null || echo "$HOME/.local/bin/uv"
