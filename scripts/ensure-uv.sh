#!/usr/bin/env bash
# Prints the path of a usable uv; installs it from PyPI into a private virtualenv when missing.
set -euo pipefail
if command -v uv >/dev/null 2>&1; then command -v uv; exit 0; fi
tools="${XDG_CACHE_HOME:-$HOME/.cache}/airflow-stepops/uv-venv"
if [ ! -x "$tools/bin/uv" ]; then
  PY=$(command -v python3 || command -v python) || { echo "python3 is required" >&2; exit 1; }
  "$PY" -m venv "$tools" >&2
  "$tools/bin/python" -m pip install --quiet --disable-pip-version-check uv >&2
fi
echo "$tools/bin/uv"
