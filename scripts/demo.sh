#!/usr/bin/env bash
# make demo: install, set up a throw-away Airflow home, register the example step operator and run
# the mixed pipeline with `airflow dags test`, then print where each step ran and what it returned.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVOR="${FLAVOR:-local}"
UV=$(scripts/ensure-uv.sh)
case "$FLAVOR" in  # the extras a flavor needs (its emulator's too)
  local) EXTRAS=() ;;
  kubernetes) EXTRAS=(--extra kubernetes) ;;
  sagemaker) EXTRAS=(--extra aws --extra tests) ;;
  vertex) EXTRAS=(--extra gcp --extra tests) ;;
  azureml) EXTRAS=(--extra azure --extra tests) ;;
  modal) EXTRAS=(--extra modal --extra tests) ;;
  *) EXTRAS=() ;;
esac
"$UV" sync --frozen --quiet --inexact "${EXTRAS[@]}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$PWD/.airflow/demo}"
export AIRFLOW__CORE__DAGS_FOLDER="$PWD/dags_examples"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__LOGGING__LOGGING_LEVEL="${AIRFLOW__LOGGING__LOGGING_LEVEL:-WARNING}"
mkdir -p "$AIRFLOW_HOME"
NEW_HOME=$([ -f "$AIRFLOW_HOME/airflow.cfg" ] || echo 1)
"$UV" run --frozen airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { cat "$AIRFLOW_HOME/db-migrate.log"; exit 1; }
# a home this run created gets the demo's settings in its airflow.cfg, so commands run later with only
# AIRFLOW_HOME set (stepops render, airflow dags list) see the example DAGs; an existing one is left as it is
[ -z "$NEW_HOME" ] || sed -i -e "s|^dags_folder = .*|dags_folder = $AIRFLOW__CORE__DAGS_FOLDER|" \
  -e "s|^load_examples = .*|load_examples = False|" "$AIRFLOW_HOME/airflow.cfg"
case "$FLAVOR" in
  local) ;;
  kubernetes)
    # the delegated steps run as Jobs on the local Kubernetes emulator, started for this demo
    rm -f "$AIRFLOW_HOME/kubeconfig"
    "$UV" run --frozen --inexact "${EXTRAS[@]}" python -m airflow_stepops.testing.kubernetes \
      --kubeconfig "$AIRFLOW_HOME/kubeconfig" --namespace ml >"$AIRFLOW_HOME/emulator.log" 2>&1 &
    EMULATOR_PID=$!
    trap 'kill "$EMULATOR_PID" 2>/dev/null || true; wait "$EMULATOR_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do [ -f "$AIRFLOW_HOME/kubeconfig" ] && break; kill -0 "$EMULATOR_PID" 2>/dev/null || break; sleep 0.2; done
    [ -f "$AIRFLOW_HOME/kubeconfig" ] || { cat "$AIRFLOW_HOME/emulator.log"; echo "the Kubernetes emulator did not start"; exit 1; }
    cat "$AIRFLOW_HOME/emulator.log" ;;
  sagemaker)
    # S3, SageMaker and CloudWatch Logs from the local SageMaker emulator, started for this demo
    rm -f "$AIRFLOW_HOME/sagemaker.env"
    "$UV" run --frozen --inexact "${EXTRAS[@]}" python -m airflow_stepops.testing.sagemaker \
      --env-file "$AIRFLOW_HOME/sagemaker.env" >"$AIRFLOW_HOME/emulator.log" 2>&1 &
    EMULATOR_PID=$!
    trap 'kill "$EMULATOR_PID" 2>/dev/null || true; wait "$EMULATOR_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do [ -f "$AIRFLOW_HOME/sagemaker.env" ] && break; kill -0 "$EMULATOR_PID" 2>/dev/null || break; sleep 0.2; done
    [ -f "$AIRFLOW_HOME/sagemaker.env" ] || { cat "$AIRFLOW_HOME/emulator.log"; echo "the SageMaker emulator did not start"; exit 1; }
    set -a; . "$AIRFLOW_HOME/sagemaker.env"; set +a
    head -n 1 "$AIRFLOW_HOME/emulator.log"
    "$UV" run --frozen python -c "import boto3; boto3.client('s3').create_bucket(Bucket='stepops-demo')" ;;
  vertex)
    # Vertex AI JobService, Cloud Logging, an OAuth token endpoint and GCS (fake-gcs-server) from the
    # local Vertex AI emulator, started for this demo
    rm -f "$AIRFLOW_HOME/vertex.env"
    "$UV" run --frozen --inexact "${EXTRAS[@]}" python -m airflow_stepops.testing.vertex \
      --env-file "$AIRFLOW_HOME/vertex.env" --project stepops-demo --bucket stepops-demo >"$AIRFLOW_HOME/emulator.log" 2>&1 &
    EMULATOR_PID=$!
    trap 'kill "$EMULATOR_PID" 2>/dev/null || true; wait "$EMULATOR_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do [ -f "$AIRFLOW_HOME/vertex.env" ] && break; kill -0 "$EMULATOR_PID" 2>/dev/null || break; sleep 0.2; done
    [ -f "$AIRFLOW_HOME/vertex.env" ] || { cat "$AIRFLOW_HOME/emulator.log"; echo "the Vertex AI emulator did not start"; exit 1; }
    set -a; . "$AIRFLOW_HOME/vertex.env"; set +a
    head -n 1 "$AIRFLOW_HOME/emulator.log" ;;
  azureml)
    # an Azure ML workspace (ARM, run history, a managed-identity token endpoint) and Azurite blobs from
    # the local Azure ML emulator, started for this demo; workers reach the blobs with adlfs's
    # AZURE_STORAGE_CONNECTION_STRING from its environment
    [ -x node_modules/.bin/azurite-blob ] || npm ci --silent
    rm -f "$AIRFLOW_HOME/azureml.env"
    "$UV" run --frozen --inexact "${EXTRAS[@]}" python -m airflow_stepops.testing.azureml \
      --env-file "$AIRFLOW_HOME/azureml.env" --workdir "$AIRFLOW_HOME/azureml-emulator" >"$AIRFLOW_HOME/emulator.log" 2>&1 &
    EMULATOR_PID=$!
    trap 'kill "$EMULATOR_PID" 2>/dev/null || true; wait "$EMULATOR_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do [ -f "$AIRFLOW_HOME/azureml.env" ] && break; kill -0 "$EMULATOR_PID" 2>/dev/null || break; sleep 0.2; done
    [ -f "$AIRFLOW_HOME/azureml.env" ] || { cat "$AIRFLOW_HOME/emulator.log"; echo "the Azure ML emulator did not start"; exit 1; }
    set -a; . "$AIRFLOW_HOME/azureml.env"; set +a
    head -n 1 "$AIRFLOW_HOME/emulator.log" ;;
  modal)
    # a Modal control plane (grpclib, 127.0.0.1) whose calls run as local processes, started for this
    # demo; its env file holds MODAL_SERVER_URL, the token and the modal_default connection
    rm -f "$AIRFLOW_HOME/modal.env"
    "$UV" run --frozen --inexact "${EXTRAS[@]}" python -m airflow_stepops.testing.modal \
      --env-file "$AIRFLOW_HOME/modal.env" >"$AIRFLOW_HOME/emulator.log" 2>&1 &
    EMULATOR_PID=$!
    trap 'kill "$EMULATOR_PID" 2>/dev/null || true; wait "$EMULATOR_PID" 2>/dev/null || true' EXIT
    for _ in $(seq 1 300); do [ -f "$AIRFLOW_HOME/modal.env" ] && break; kill -0 "$EMULATOR_PID" 2>/dev/null || break; sleep 0.2; done
    [ -f "$AIRFLOW_HOME/modal.env" ] || { cat "$AIRFLOW_HOME/emulator.log"; echo "the Modal emulator did not start"; exit 1; }
    set -a; . "$AIRFLOW_HOME/modal.env"; set +a
    head -n 1 "$AIRFLOW_HOME/emulator.log" ;;
  *) echo "FLAVOR=$FLAVOR: no demo for this flavor yet (available: local, kubernetes, sagemaker, vertex, azureml, modal)"; exit 2 ;;
esac
STEPOPS_EXAMPLE_STEP_OPERATOR=$("$UV" run --frozen python dags_examples/setup_connections.py "$FLAVOR")
export STEPOPS_EXAMPLE_STEP_OPERATOR
echo "Running the mixed pipeline (step operator flavor: $FLAVOR) ..."
# at INFO, the log holds the lines each step streamed; show_run.py prints them beside the job summaries
AIRFLOW__LOGGING__LOGGING_LEVEL=INFO "$UV" run --frozen airflow dags test mixed_pipeline >"$AIRFLOW_HOME/dags-test.log" 2>&1 || {
  tail -n 80 "$AIRFLOW_HOME/dags-test.log"; echo "demo failed; full log: $AIRFLOW_HOME/dags-test.log"; exit 1; }
"$UV" run --frozen python dags_examples/show_run.py mixed_pipeline "$AIRFLOW_HOME/dags-test.log"
echo "Full log: $AIRFLOW_HOME/dags-test.log. To use the CLI on this demo: . .venv/bin/activate; export AIRFLOW_HOME=$AIRFLOW_HOME; stepops list"
