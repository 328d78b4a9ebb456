#!/usr/bin/env bash
# make test-cloud FLAVOR=...: the conformance suite against a real account of one flavor's service.
# Configured by STEPOPS_CLOUD_<FLAVOR>_* variables (docs/permissions.md); without them every test is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
FLAVORS="kubernetes sagemaker vertex azureml modal"
FLAVOR="${1:-}"
case " $FLAVORS " in
  *" $FLAVOR "*) ;;
  *) echo "make test-cloud: FLAVOR=${FLAVOR:-<unset>} is not a cloud flavor; use FLAVOR=<one of: ${FLAVORS// /, }>" >&2
     echo "(the local flavor has no cloud: make test runs it)" >&2
     exit 2 ;;
esac
shift
UV=$(scripts/ensure-uv.sh)
"$UV" sync --frozen --quiet --extra kubernetes --extra aws --extra gcp --extra azure --extra modal --extra openlineage
# tests/e2e/cloud.py reads the flavor's variables; the Airflow processes get only what it passes on
STEPOPS_CLOUD_FLAVOR="$FLAVOR" "$UV" run --frozen pytest tests/e2e/test_conformance.py "$@"
