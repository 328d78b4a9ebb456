"""The conformance suite against a real account: ``make test-cloud FLAVOR=...``, as Airflow's provider system
tests do.

``STEPOPS_CLOUD_FLAVOR`` (set by the Makefile) selects one flavor; its step operator connection and the
environment of the Airflow processes are then built from the ``STEPOPS_CLOUD_<FLAVOR>_*`` variables (and the
service's usual credentials) instead of an emulator, and only that flavor's scenarios are collected. The
variables are listed per flavor in docs/permissions.md and in ``VARIABLES`` below. Without them every test is
skipped with a message naming the missing ones, never failed.

The harnesses here read a task instance's jobs from the service itself, with the service's own client library
(boto3, google-cloud-aiplatform, azure-ai-ml, kubernetes), never through this project's hooks, so the suite
does not check the code with itself. What a real service cannot do for the suite is skipped with its reason
(``CloudHarness.unsupported``): injecting a preemption, and the scenarios whose steps must share files with
this host (their invocation marker, release file and pid), which a step running on the service cannot.

Under ``make test`` (no ``STEPOPS_CLOUD_FLAVOR``) nothing here applies: the emulators are used.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from .harness import K8S_LABEL, Harness

FLAVOR_VARIABLE = "STEPOPS_CLOUD_FLAVOR"
#: a factor for every wait of the suite (real jobs take minutes to start); default per flavor
TIME_SCALE_VARIABLE = "STEPOPS_CLOUD_TIME_SCALE"
CONN_ID = "cloud_step_operator"
#: what the step operator connection gives every step (the results scenario checks it reached the step)
CONN_ENVIRONMENT = {"E2E_FROM_CONN": "from-cloud-connection"}

#: flavor -> {variable: (required, what it is)}
VARIABLES: dict[str, dict[str, tuple[bool, str]]] = {
    "kubernetes": {
        "STEPOPS_CLOUD_KUBERNETES_NAMESPACE": (True, "namespace of the step Jobs"),
        "STEPOPS_CLOUD_KUBERNETES_IMAGE": (True, "step image: Python of this interpreter's major.minor + cloudpickle"),
        "STEPOPS_CLOUD_KUBERNETES_KUBECONFIG": (False, "kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)"),
        "STEPOPS_CLOUD_KUBERNETES_CONTEXT": (False, "kubeconfig context (default: the current one)"),
        "STEPOPS_CLOUD_KUBERNETES_SERVICE_ACCOUNT": (False, "service account of the step pods"),
        "STEPOPS_CLOUD_KUBERNETES_ARTIFACT_STORE": (False, "artifact store (default: the flavor's inline transport)"),
    },
    "sagemaker": {
        "STEPOPS_CLOUD_SAGEMAKER_ROLE": (True, "ARN of the execution role the training jobs run as"),
        "STEPOPS_CLOUD_SAGEMAKER_ARTIFACT_STORE": (True, "s3:// prefix of the artifact store"),
        "STEPOPS_CLOUD_SAGEMAKER_IMAGE": (True, "ECR image URI: Python of this interpreter's major.minor + cloudpickle"),
        "STEPOPS_CLOUD_SAGEMAKER_REGION": (True, "AWS region"),
        "STEPOPS_CLOUD_SAGEMAKER_INSTANCE_TYPE": (False, "training instance type (default ml.m5.large)"),
    },
    "vertex": {
        "STEPOPS_CLOUD_VERTEX_PROJECT": (True, "Google Cloud project"),
        "STEPOPS_CLOUD_VERTEX_LOCATION": (True, "Vertex AI region, e.g. us-central1"),
        "STEPOPS_CLOUD_VERTEX_ARTIFACT_STORE": (True, "gs:// prefix of the artifact store"),
        "STEPOPS_CLOUD_VERTEX_IMAGE": (True, "image URI: Python of this interpreter's major.minor + cloudpickle"),
        "STEPOPS_CLOUD_VERTEX_SERVICE_ACCOUNT": (False, "service account the CustomJobs run as "
                                                        "(default: Vertex AI's custom code service agent)"),
        "STEPOPS_CLOUD_VERTEX_MACHINE_TYPE": (False, "machine type (default n1-standard-4)"),
        "STEPOPS_CLOUD_VERTEX_API_ENDPOINT": (False, "JobService endpoint (default: <location>-aiplatform.googleapis.com)"),
    },
    "azureml": {
        "STEPOPS_CLOUD_AZUREML_SUBSCRIPTION": (True, "subscription id"),
        "STEPOPS_CLOUD_AZUREML_RESOURCE_GROUP": (True, "resource group of the workspace"),
        "STEPOPS_CLOUD_AZUREML_WORKSPACE": (True, "Azure ML workspace name"),
        "STEPOPS_CLOUD_AZUREML_IMAGE": (True, "image: Python of this interpreter's major.minor + cloudpickle"),
        "STEPOPS_CLOUD_AZUREML_ARTIFACT_STORE": (True, "azureml://datastores/<datastore>/paths/<prefix> or "
                                                       "abfs://<container>/<prefix>"),
        "STEPOPS_CLOUD_AZUREML_STORAGE_CONNECTION_STRING": (False, "connection string of the store's storage account "
                                                                   "(default: adlfs's AZURE_STORAGE_* variables)"),
        "STEPOPS_CLOUD_AZUREML_COMPUTE": (False, "compute target (default: serverless)"),
        "STEPOPS_CLOUD_AZUREML_INSTANCE_TYPE": (False, "serverless VM size (default: chosen by the flavor)"),
    },
    "modal": {
        "STEPOPS_CLOUD_MODAL_TOKEN_ID": (True, "Modal token id (ak-...)"),
        "STEPOPS_CLOUD_MODAL_TOKEN_SECRET": (True, "Modal token secret (as-...)"),
        "STEPOPS_CLOUD_MODAL_ENVIRONMENT": (True, "Modal environment, e.g. main"),
        "STEPOPS_CLOUD_MODAL_APP_NAME": (False, "prefix of the deployed apps (default stepops-conformance)"),
    },
}

#: what the skip message says of credentials a flavor could not find
CREDENTIALS = {
    "AWS credentials": "AWS_PROFILE, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, SSO, an instance role... as boto3 "
                       "finds them",
    "Google credentials": "GOOGLE_APPLICATION_CREDENTIALS, or `gcloud auth application-default login`",
    "a kubeconfig file": "STEPOPS_CLOUD_KUBERNETES_KUBECONFIG, else $KUBECONFIG, else ~/.kube/config: none exists",
}

#: environment variables the Airflow processes keep in a cloud run (tests/e2e/conftest.py drops them for the
#: emulators): the service's usual credentials and settings
PASSTHROUGH = {
    "kubernetes": ("KUBECONFIG",),
    "sagemaker": ("AWS_",),
    "vertex": ("GOOGLE_", "CLOUDSDK_"),
    "azureml": ("AZURE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_"),
    "modal": ("MODAL_SERVER_URL",),  # not the token: it comes from modal_default only
}

#: test -> why a real service cannot run it (flavors add their own in ``CloudHarness.unsupported``)
_HOST_FILES = ("its steps must share files with this host (the invocation marker it counts, the release file "
               "it waits on, the step's pid), which a step running on the service cannot")
UNSUPPORTED = {
    "test_killed_worker_retry_reattaches_to_the_one_job": _HOST_FILES,
    "test_clearing_a_successful_task_runs_it_again": _HOST_FILES,
    "test_recreated_run_with_the_same_run_id_gets_a_new_job": _HOST_FILES,
    "test_mark_failed_while_deferred_stops_the_job": _HOST_FILES,
    "test_execution_timeout_while_deferred_stops_the_job_and_raises_step_timeout_error": _HOST_FILES,
    "test_preempted_step_raises_step_preempted_error_and_the_retry_sees_its_checkpoint":
        "a preemption cannot be injected into a real service",
}


def flavor() -> str | None:
    """The flavor of a cloud run, or None (the emulators)."""
    return os.environ.get(FLAVOR_VARIABLE) or None


def time_scale() -> float:
    """The factor for every wait of the suite: 1 with the emulators."""
    chosen = flavor()
    if chosen is None:
        return 1.0
    return float(os.environ.get(TIME_SCALE_VARIABLE) or _HARNESSES[chosen].time_scale)


def value(name: str, default: str = "") -> str:
    return os.environ.get(name) or default


# ---------------------------------------------------------------------------------------------
# harnesses on the real services
# ---------------------------------------------------------------------------------------------
@dataclass
class CloudHarness(Harness):
    """A flavor on its real service: its connection and environment from ``VARIABLES``, its jobs read with the
    service's own client."""

    #: the suite's waits are multiplied by this (``STEPOPS_CLOUD_TIME_SCALE`` overrides it)
    time_scale: float = 4.0
    #: test -> reason, beyond ``UNSUPPORTED``
    unsupported: dict[str, str] = field(default_factory=dict)
    #: when the session started: job listings need not look further back
    since: float = field(default_factory=time.time)

    def missing(self) -> list[str]:
        """The required variables not set (and credentials not found), as the skip message names them."""
        return [name for name, (required, _) in VARIABLES[self.flavor].items() if required and not value(name)]

    def connections(self, home: Path) -> dict[str, dict[str, str]]:
        """The connections to import (the step operator's ``CONN_ID`` and what it names)."""
        raise NotImplementedError

    def session_env(self, env: dict[str, str]) -> dict[str, str]:
        """The Airflow processes' environment: the emulator-free one plus the service's usual variables."""
        kept = {k: v for k, v in os.environ.items() if k.startswith(PASSTHROUGH[self.flavor])}
        return {**env, **kept}

    @staticmethod
    def step_operator(conn_type: str, extra: dict[str, Any]) -> dict[str, str]:
        return {"conn_type": conn_type, "extra": json.dumps(extra)}


class CloudKubernetes(CloudHarness):
    def missing(self):
        found = super().missing()
        if not Path(self.kubeconfig()).expanduser().is_file():
            found.append("a kubeconfig file")
        return found

    @staticmethod
    def kubeconfig() -> str:
        chosen = value("STEPOPS_CLOUD_KUBERNETES_KUBECONFIG") or value("KUBECONFIG", "~/.kube/config")
        return str(Path(chosen.split(os.pathsep)[0]).expanduser())

    @property
    def namespace(self) -> str:
        return value("STEPOPS_CLOUD_KUBERNETES_NAMESPACE")

    def connections(self, home):
        extra: dict[str, Any] = {"config_file": self.kubeconfig(), "kubernetes_namespace": self.namespace,
                                 "image": value("STEPOPS_CLOUD_KUBERNETES_IMAGE"), "environment": CONN_ENVIRONMENT}
        optional = {"kubernetes_context": "STEPOPS_CLOUD_KUBERNETES_CONTEXT",
                    "service_account_name": "STEPOPS_CLOUD_KUBERNETES_SERVICE_ACCOUNT",
                    "artifact_store": "STEPOPS_CLOUD_KUBERNETES_ARTIFACT_STORE"}
        extra.update({key: value(name) for key, name in optional.items() if value(name)})
        return {CONN_ID: self.step_operator("stepops_kubernetes", extra)}

    def _api(self) -> Any:
        from kubernetes import client, config

        api = getattr(self, "_batch", None)
        if api is None:
            api = client.BatchV1Api(config.new_client_from_config(
                config_file=self.kubeconfig(), context=value("STEPOPS_CLOUD_KUBERNETES_CONTEXT") or None))
            self._batch = api
        return api

    def jobs(self, af, dag_id, run_id, task_id):
        selector = f"{K8S_LABEL}/dag-id={dag_id},{K8S_LABEL}/task-id={task_id}"
        found = self._api().list_namespaced_job(self.namespace, label_selector=selector).items
        found = [job for job in found if (job.metadata.annotations or {}).get(f"{K8S_LABEL}/run-id") == run_id]
        return [job.metadata.name for job in sorted(found, key=lambda job: job.metadata.creation_timestamp)]

    def state(self, af, job_id):
        from kubernetes.client.exceptions import ApiException

        try:
            job = self._api().read_namespaced_job(job_id, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return "gone"
            raise
        done = {c.type for c in (job.status.conditions or []) if c.status == "True"}
        return "succeeded" if "Complete" in done else "failed" if "Failed" in done else "running"


class CloudSageMaker(CloudHarness):
    STATES = {"Completed": "succeeded", "Failed": "failed", "Stopped": "cancelled"}

    def missing(self):
        import boto3

        found = super().missing()
        if boto3.Session().get_credentials() is None:
            found.append("AWS credentials")
        return found

    @property
    def region(self) -> str:
        return value("STEPOPS_CLOUD_SAGEMAKER_REGION")

    def connections(self, home):
        return {
            "aws_default": {"conn_type": "aws", "extra": json.dumps({"region_name": self.region})},
            CONN_ID: self.step_operator("stepops_sagemaker", {
                "role": value("STEPOPS_CLOUD_SAGEMAKER_ROLE"), "region_name": self.region,
                "image": value("STEPOPS_CLOUD_SAGEMAKER_IMAGE"),
                "artifact_store": value("STEPOPS_CLOUD_SAGEMAKER_ARTIFACT_STORE"),
                "instance_type": value("STEPOPS_CLOUD_SAGEMAKER_INSTANCE_TYPE", "ml.m5.large"),
                "environment": CONN_ENVIRONMENT})}

    def session_env(self, env):
        return {"AWS_DEFAULT_REGION": self.region, **super().session_env(env)}

    def _client(self) -> Any:
        import boto3

        client = getattr(self, "_sagemaker", None)
        if client is None:
            client = self._sagemaker = boto3.client("sagemaker", region_name=self.region)
            self._tags: dict[str, dict[str, str]] = {}
        return client

    def jobs(self, af, dag_id, run_id, task_id):
        client, found = self._client(), []
        since = datetime.fromtimestamp(self.since - 300, tz=timezone.utc)
        for page in client.get_paginator("list_training_jobs").paginate(CreationTimeAfter=since):
            for job in page["TrainingJobSummaries"]:
                arn = job["TrainingJobArn"]
                if arn not in self._tags:  # a job's identity tags never change
                    self._tags[arn] = {t["Key"]: t["Value"] for t in client.list_tags(ResourceArn=arn)["Tags"]}
                tags = self._tags[arn]
                if (tags.get("stepops:dag-id"), tags.get("stepops:run-id"), tags.get("stepops:task-id")) == (
                        dag_id, run_id, task_id):
                    found.append((job["CreationTime"], job["TrainingJobName"]))
        return [name for _, name in sorted(found)]

    def state(self, af, job_id):
        client = self._client()
        try:
            status = client.describe_training_job(TrainingJobName=job_id)["TrainingJobStatus"]
        except client.exceptions.ResourceNotFound:
            return "gone"
        except client.exceptions.ClientError as exc:  # SageMaker answers ValidationException for a missing job
            if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
                return "gone"
            raise
        return self.STATES.get(status, "running")


class CloudVertex(CloudHarness):
    STATES = {"JOB_STATE_SUCCEEDED": "succeeded", "JOB_STATE_FAILED": "failed", "JOB_STATE_CANCELLED": "cancelled"}

    def missing(self):
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError

        found = super().missing()
        try:
            google.auth.default()
        except DefaultCredentialsError:
            found.append("Google credentials")
        return found

    @property
    def parent(self) -> str:
        return f"projects/{value('STEPOPS_CLOUD_VERTEX_PROJECT')}/locations/{value('STEPOPS_CLOUD_VERTEX_LOCATION')}"

    def connections(self, home):
        extra: dict[str, Any] = {
            "gcp_conn_id": "google_cloud_default", "project": value("STEPOPS_CLOUD_VERTEX_PROJECT"),
            "location": value("STEPOPS_CLOUD_VERTEX_LOCATION"), "image": value("STEPOPS_CLOUD_VERTEX_IMAGE"),
            "artifact_store": value("STEPOPS_CLOUD_VERTEX_ARTIFACT_STORE"), "environment": CONN_ENVIRONMENT,
            "machine_type": value("STEPOPS_CLOUD_VERTEX_MACHINE_TYPE", "n1-standard-4")}
        if value("STEPOPS_CLOUD_VERTEX_SERVICE_ACCOUNT"):
            extra["service_account"] = value("STEPOPS_CLOUD_VERTEX_SERVICE_ACCOUNT")
        if value("STEPOPS_CLOUD_VERTEX_API_ENDPOINT"):
            extra["api_endpoint"] = value("STEPOPS_CLOUD_VERTEX_API_ENDPOINT")
        return {  # credentials: application-default ones, which GOOGLE_APPLICATION_CREDENTIALS may name
            "google_cloud_default": {"conn_type": "google_cloud_platform", "extra": json.dumps(
                {"project": value("STEPOPS_CLOUD_VERTEX_PROJECT")})},
            CONN_ID: self.step_operator("stepops_vertex", extra)}

    def _client(self) -> Any:
        from google.cloud import aiplatform_v1

        client = getattr(self, "_jobs", None)
        if client is None:
            endpoint = value("STEPOPS_CLOUD_VERTEX_API_ENDPOINT",
                             f"{value('STEPOPS_CLOUD_VERTEX_LOCATION')}-aiplatform.googleapis.com")
            client = self._jobs = aiplatform_v1.JobServiceClient(
                client_options={"api_endpoint": endpoint}, transport="rest")
        return client

    def jobs(self, af, dag_id, run_id, task_id):  # label values: lower case, at most 63 characters
        labels = {f"stepops-{key}": re.sub(r"[^a-z0-9_-]", "_", text.lower())[:63]
                  for key, text in (("dag", dag_id), ("run", run_id), ("task", task_id))}
        query = " AND ".join(f'labels.{key}="{text}"' for key, text in labels.items())
        found = self._client().list_custom_jobs(request={"parent": self.parent, "filter": query})
        found = [job for job in found if labels.items() <= dict(job.labels).items()]  # whatever the filter did
        return [job.name.rsplit("/", 1)[-1] for job in sorted(found, key=lambda job: job.create_time)]

    def state(self, af, job_id):
        from google.api_core.exceptions import NotFound

        try:
            job = self._client().get_custom_job(name=f"{self.parent}/customJobs/{job_id}")
        except NotFound:
            return "gone"
        return self.STATES.get(job.state.name, "running")


class CloudAzureML(CloudHarness):
    STATES = {"Completed": "succeeded", "Failed": "failed", "Canceled": "cancelled"}

    def connections(self, home):
        found: dict[str, dict[str, str]] = {}
        extra: dict[str, Any] = {
            "subscription_id": value("STEPOPS_CLOUD_AZUREML_SUBSCRIPTION"),
            "resource_group": value("STEPOPS_CLOUD_AZUREML_RESOURCE_GROUP"),
            "workspace_name": value("STEPOPS_CLOUD_AZUREML_WORKSPACE"), "image": value("STEPOPS_CLOUD_AZUREML_IMAGE"),
            "artifact_store": value("STEPOPS_CLOUD_AZUREML_ARTIFACT_STORE"), "environment": CONN_ENVIRONMENT}
        if value("STEPOPS_CLOUD_AZUREML_STORAGE_CONNECTION_STRING"):
            found["cloud_azure_storage"] = {"conn_type": "wasb", "extra": json.dumps(
                {"connection_string": value("STEPOPS_CLOUD_AZUREML_STORAGE_CONNECTION_STRING")})}
            extra["storage_conn_id"] = "cloud_azure_storage"
        if value("STEPOPS_CLOUD_AZUREML_COMPUTE"):
            extra["compute_target_name"] = value("STEPOPS_CLOUD_AZUREML_COMPUTE")
        if value("STEPOPS_CLOUD_AZUREML_INSTANCE_TYPE"):
            extra["instance_type"] = value("STEPOPS_CLOUD_AZUREML_INSTANCE_TYPE")
        # no azure connection: the flavor falls back to DefaultAzureCredential (AZURE_* variables, az login...)
        found[CONN_ID] = self.step_operator("stepops_azureml", extra)
        return found

    def _client(self) -> Any:
        from azure.ai.ml import MLClient
        from azure.identity import DefaultAzureCredential

        client = getattr(self, "_ml", None)
        if client is None:
            client = self._ml = MLClient(DefaultAzureCredential(), value("STEPOPS_CLOUD_AZUREML_SUBSCRIPTION"),
                                         value("STEPOPS_CLOUD_AZUREML_RESOURCE_GROUP"),
                                         value("STEPOPS_CLOUD_AZUREML_WORKSPACE"))
        return client

    def jobs(self, af, dag_id, run_id, task_id):
        wanted = {"stepops-dag": dag_id, "stepops-run": run_id, "stepops-task": task_id}
        found = [job for job in self._client().jobs.list() if wanted.items() <= (job.tags or {}).items()]
        return [job.name for job in sorted(found, key=lambda job: job.creation_context.created_at)]

    def state(self, af, job_id):
        from azure.core.exceptions import ResourceNotFoundError

        try:
            status = self._client().jobs.get(job_id).status
        except ResourceNotFoundError:
            return "gone"
        return self.STATES.get(status, "running")


class CloudModal(CloudHarness):
    """Modal has no documented API listing the calls of a function (its client finds a call only by its id),
    so the scenarios that count a task instance's jobs are skipped."""

    def connections(self, home):  # the token only in the metadata DB, as with the emulator
        return {
            "modal_default": {"conn_type": "modal", "login": value("STEPOPS_CLOUD_MODAL_TOKEN_ID"),
                              "password": value("STEPOPS_CLOUD_MODAL_TOKEN_SECRET"),
                              "extra": json.dumps({"environment": value("STEPOPS_CLOUD_MODAL_ENVIRONMENT")})},
            CONN_ID: self.step_operator("stepops_modal", {
                "environment": value("STEPOPS_CLOUD_MODAL_ENVIRONMENT"),
                "app_name": value("STEPOPS_CLOUD_MODAL_APP_NAME", "stepops-conformance"),
                "environment_variables": CONN_ENVIRONMENT})}

    def session_env(self, env):  # no ~/.modal.toml fallback: the token comes from modal_default only
        return {**super().session_env(env), "MODAL_CONFIG_PATH": str(Path(env["AIRFLOW_HOME"]) / "no-modal.toml")}

    def jobs(self, af, dag_id, run_id, task_id):  # the tests calling this are skipped (``unsupported``)
        raise NotImplementedError(_NO_LISTING)

    def state(self, af, job_id):
        raise NotImplementedError(_NO_LISTING)


_NO_LISTING = "Modal has no documented API listing a function's calls, so the task instance's jobs cannot be counted"
_HARNESSES: dict[str, CloudHarness] = {
    "kubernetes": CloudKubernetes("kubernetes", CONN_ID, time_scale=2.0),
    "sagemaker": CloudSageMaker("sagemaker", CONN_ID),
    "vertex": CloudVertex("vertex", CONN_ID),
    "azureml": CloudAzureML("azureml", CONN_ID),
    "modal": CloudModal("modal", CONN_ID, time_scale=2.0,
                        unsupported={"test_results_reach_xcom_and_downstream_steps": _NO_LISTING}),
}
FLAVORS = tuple(_HARNESSES)


def harness() -> CloudHarness | None:
    """The harness of this cloud run, or None (the emulators)."""
    chosen = flavor()
    return None if chosen is None else _HARNESSES[chosen]


# ---------------------------------------------------------------------------------------------
# pytest: registered by tests/e2e/conftest.py
# ---------------------------------------------------------------------------------------------
class Plugin:
    """Keeps only the cloud flavor's tests, skips what its service cannot run, or everything when variables are
    missing (pytest then reports them skipped with the names, not "no tests ran")."""

    def __init__(self, chosen: CloudHarness) -> None:
        self.harness = chosen
        self.missing = chosen.missing()

    @property
    def reason(self) -> str:
        return f"{self.harness.flavor} not configured, missing: {', '.join(self.missing)} (docs/permissions.md)"

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(self, session: pytest.Session, config: pytest.Config,
                                      items: list[pytest.Item]) -> None:
        kept, dropped = [], []
        for item in items:
            params = getattr(item, "callspec", None)
            other = params is not None and params.params.get("flavor", self.harness.flavor) != self.harness.flavor
            (dropped if other else kept).append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept
        unsupported = {**UNSUPPORTED, **self.harness.unsupported}
        for item in items:
            name = getattr(item, "originalname", item.name)
            if self.missing:
                item.add_marker(pytest.mark.skip(reason=self.reason))
            elif name in unsupported:
                item.add_marker(pytest.mark.skip(reason=f"{self.harness.flavor} on its real service: "
                                                        f"{unsupported[name]}"))
            else:  # real jobs take minutes to start: pytest-timeout's limit grows as the suite's waits do
                marker = item.get_closest_marker("timeout")
                if marker is not None and marker.args:
                    item.add_marker(pytest.mark.timeout(marker.args[0] * time_scale()), append=False)

    def pytest_report_header(self, config: pytest.Config) -> str:
        state = f"NOT CONFIGURED, missing: {', '.join(self.missing)}" if self.missing else "configured"
        return f"stepops cloud run: {self.harness.flavor} on its real service ({state})"

    @pytest.hookimpl(tryfirst=True)
    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.missing:
            terminalreporter.reportchars = terminalreporter.reportchars.replace("s", "")  # not 13 times the same
            terminalreporter.write_sep("=", "test-cloud skipped", yellow=True)
            terminalreporter.write_line(f"{self.harness.flavor}: every test skipped, nothing failed. Set:")
            for name in self.missing:
                what = VARIABLES[self.harness.flavor][name][1] if name.startswith("STEPOPS_") else CREDENTIALS[name]
                terminalreporter.write_line(f"  {name}" + (f"  ({what})" if what else ""))
            terminalreporter.write_line("The variables of each flavor are in docs/permissions.md.")


def configure(config: pytest.Config) -> None:
    """Register the cloud run's plugin when ``STEPOPS_CLOUD_FLAVOR`` is set (called from pytest_configure)."""
    chosen = flavor()
    if chosen is None:
        return
    if chosen not in _HARNESSES:
        raise pytest.UsageError(f"{FLAVOR_VARIABLE}={chosen!r}: the flavor must be one of {', '.join(FLAVORS)}")
    config.pluginmanager.register(Plugin(_HARNESSES[chosen]), "stepops-cloud")
