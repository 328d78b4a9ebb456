#!/usr/bin/env bash
# make demo: install, set up a throw-away Airflow home, register the example step operator and run
# the mixed pipeline with `airflow dags test`, then print where each step ran and what it returned.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOR="${FLAVOR:-local}"
UV=$(scripts/ensure-uv.sh)
"$UV" sync --frozen --quiet --inexact
export AIRFLOW_HOME="${AIRFLOW_HOME:-$PWD/.airflow/demo}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags_examples"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW__LOGGING__LOGGING_LEVEL:-WARNING}"
mkdir -p "$AIRFLOW_HOME"
"$UV" run --frozen airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
"$UV" run --frozen python dags_examples/setup_connections.py "$FLAVOR"
echo "Running the mixed pipeline (step operator flavor: $FLAVOR) ..."
"$UV" run --frozen airflow dags test mixed_pipeline >"$AIRFLOW_HOME/dags-test.log" 2>&1 || {
  tail -n 80 "$AIRFLOW_HOME/dags-test.log"; echo "demo failed; full log: $AIRFLOW_HOME/dags-test.log"; exit 1; }
"$UV" run --frozen python dags_examples/show_run.py mixed_pipeline
