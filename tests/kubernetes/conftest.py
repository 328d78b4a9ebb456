"""Every Job the flavor creates in these tests is validated against the Kubernetes OpenAPI schema."""

from __future__ import annotations

import pytest

_VALIDATED: set[str] = set()


def validate_job(job: dict) -> None:
    """The Job as stored, minus server-set fields, against the Kubernetes 1.33 OpenAPI schema."""
    body = {"apiVersion": "batch/v1", "kind": "Job", "spec": job["spec"], "metadata": {
        k: v for k, v in job["metadata"].items() if k in ("name", "namespace", "labels", "annotations")}}
    pytest.importorskip("kubernetes_validate").validate(body, "1.33", strict=True)


def validate_new_jobs(k8s) -> None:
    """The step Jobs not validated yet."""
    for job in k8s.list_objects("jobs", "steps", "app.kubernetes.io/managed-by=airflow-stepops"):
        if job["metadata"]["uid"] not in _VALIDATED:
            validate_job(job)
            _VALIDATED.add(job["metadata"]["uid"])


@pytest.fixture(autouse=True)
def _validate_created_jobs(request):
    yield
    if "k8s_emulator" in request.fixturenames:
        validate_new_jobs(request.getfixturevalue("k8s_emulator"))
