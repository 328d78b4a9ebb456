#!/usr/bin/env bash
# make test: install everything the tests need, then run the whole suite (slow cases included).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=$(scripts/ensure-uv.sh)
"$UV" sync --frozen --quiet --extra kubernetes --extra aws --extra gcp --extra azure
"$UV" run --frozen ruff check airflow_stepops tests dags_examples benchmarks
"$UV" run --frozen mypy airflow_stepops
"$UV" run --frozen pytest "$@"
