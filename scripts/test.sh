#!/usr/bin/env bash
# make test: install everything the tests need, then run the whole suite (slow cases included).
set -euo pipefail
cd "$(dirname "$0")/.."
unset STEPOPS_CLOUD_FLAVOR  # make test always runs the emulators (make test-cloud sets it)
UV=$(scripts/ensure-uv.sh)
"$UV" sync --frozen --quiet --extra kubernetes --extra aws --extra gcp --extra azure --extra modal --extra openlineage
# Azurite (the Azure ML emulator's blob storage) comes from npm, pinned in package-lock.json
if [ ! -x node_modules/.bin/azurite-blob ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm is needed for the Azure ML emulator (Azurite): install Node.js 20+"; exit 1; }
  npm ci --no-audit --no-fund --loglevel=error
fi
"$UV" run --frozen ruff check airflow_stepops tests dags_examples benchmarks
"$UV" run --frozen mypy airflow_stepops
# tests mostly wait on emulated services: three workers overlap the waits (the end-to-end block runs on one)
"$UV" run --frozen pytest -n 3 "$@"
