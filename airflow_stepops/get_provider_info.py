"""Provider metadata read by Airflow's providers manager; it imports only the flavor registry (stdlib only).

``tests/unit/test_provider.py`` checks that every form field here matches the flavor's config model.
"""

from __future__ import annotations

from typing import Any

from airflow_stepops.flavors import FLAVORS


def _field(label: str, kind: str | list[str] = "string", description: str = "", **schema: Any) -> dict[str, Any]:
    types = [kind] if isinstance(kind, str) else list(kind)
    out: dict[str, Any] = {"label": label, "schema": {"type": [*types, "null"], **schema}}
    if description:
        out["description"] = description
    return out


def _api_fields(timeout: float, attempts: int | None = None) -> dict[str, Any]:
    """Every call to a backend is bounded: a lost reply must never hang a worker or the triggerer."""
    fields = {"api_timeout_seconds": _field("API call timeout (s)", "number", description="Seconds one call to "
                                            "the service may wait for its answer before it is retried.",
                                            default=timeout)}
    if attempts is not None:
        fields["api_max_attempts"] = _field("API call attempts", "integer", description="Attempts of a call that "
                                            "fails on the way, the first included.", default=attempts)
    return fields


_COMMON_FIELDS = {
    "artifact_store": _field("Artifact store URI", description="Where step bundles and results are kept."),
    "max_result_size": _field("Max result size", description='Largest result a step may store, e.g. "10GB".'),
    "inline_result_max_size": _field(
        "Max inline (XCom) result size", description='JSON results up to this size go to XCom, e.g. "48KB".'
    ),
}

_HIDDEN = ["host", "schema", "login", "password", "port", "extra"]


def _connection_type(name: str) -> dict[str, Any]:
    """What the flavor registry declares of a connection type; the form fields follow per flavor."""
    flavor = FLAVORS[name]
    return {"hook-class-name": flavor.hook_class, "hook-name": f"Step operator: {flavor.display_name}",
            "connection-type": flavor.conn_type,
            "ui-field-behaviour": {"hidden-fields": _HIDDEN, "relabeling": {}, "placeholders": {}}}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-stepops",
        "name": "Step Operators",
        "description": "Run chosen Python tasks on Kubernetes, SageMaker, Vertex AI, Azure ML, Modal or a "
        "detached local process: the step-operator model for Airflow.",
        "versions": ["0.1.0"],
        "connection-types": [
            {
                **_connection_type("local"),
                "conn-fields": {
                    **_COMMON_FIELDS,
                    "python": _field(
                        "Python interpreter",
                        description="Interpreter for steps (same major.minor as the worker, with cloudpickle).",
                    ),
                    "jobs_dir": _field("Jobs directory", description="Default: $AIRFLOW_HOME/stepops/local/jobs"),
                    "nvidia_smi": _field("nvidia-smi executable", default="nvidia-smi"),
                    "environment": _field("Environment variables", "object", "Added to every step."),
                    "job_retention_days": _field(
                        "Job retention (days)", "number", "Finished job directories are removed after this.",
                        default=7,
                    ),
                },
            },
            {
                **_connection_type("kubernetes"),
                "conn-fields": {
                    **_COMMON_FIELDS,
                    **_api_fields(60),
                    "kubernetes_conn_id": _field(
                        "Kubernetes connection id", description="A cncf-kubernetes connection with the cluster "
                        "credentials (default: kubernetes_default)."),
                    "kubernetes_context": _field("kubeconfig context"),
                    "config_file": _field("kubeconfig file path"),
                    "incluster": _field("In cluster", "boolean", "Use the pod's service account.", default=False),
                    "kubernetes_namespace": _field("Namespace", default="default"),
                    "image": _field("Image", description="Container image of the steps (Python and cloudpickle)."),
                    "environment": _field("Environment variables", "object", "Added to every step (no secrets)."),
                    "worker_artifact_path": _field(
                        "Worker path of the pvc:// store", description="Where the claim is mounted on workers."),
                    "checkpoint_volume_claim": _field(
                        "Checkpoint volume claim", description="ReadWriteMany PersistentVolumeClaim holding "
                        "STEPOPS_CHECKPOINT_DIR (default: a pvc:// store's claim)."),
                    "checkpoint_volume_path": _field(
                        "Checkpoint path in the claim", description="Directory inside the checkpoint claim.",
                        default=""),
                    "inline_transfer_max_size": _field(
                        "Max inline transfer size", description='Bundles/outputs up to this size travel in the pod '
                        'spec and log, e.g. "512KiB".'),
                    "console_url_template": _field(
                        "Console URL template", description="Dashboard link with {namespace} and {name}."),
                    "service_account_name": _field("Service account"),
                    "node_selector": _field("Node selector", "object"),
                    "tolerations": _field("Tolerations", "array"),
                    "affinity": _field("Affinity", "object"),
                    "volumes": _field("Volumes", "array"),
                    "volume_mounts": _field("Volume mounts", "array"),
                    "image_pull_secrets": _field("Image pull secrets", "array"),
                    "labels": _field("Labels", "object"),
                    "annotations": _field("Annotations", "object"),
                    "priority_class_name": _field("Priority class"),
                    "security_context": _field("Pod security context", "object"),
                    "container_security_context": _field("Container security context", "object"),
                },
            },
            {
                **_connection_type("sagemaker"),
                "conn-fields": {
                    **_COMMON_FIELDS,
                    **_api_fields(60, attempts=5),
                    "aws_conn_id": _field("AWS connection id", description="Amazon provider connection.",
                                          default="aws_default"),
                    "region_name": _field("Region", description="e.g. us-east-1 (default: the aws connection's)."),
                    "role": _field("Execution role ARN", description="IAM role the training jobs run as."),
                    "image": _field("Training image", description="Image URI with Python and cloudpickle."),
                    "instance_type": _field("Default instance type", description="e.g. ml.g5.xlarge."),
                    "subnets": _field("VPC subnets", "array"),
                    "security_group_ids": _field("VPC security groups", "array"),
                    "kms_key_id": _field("KMS key", description="For the volume and the output."),
                    "tags": _field("Tags", "object"),
                    "environment": _field("Environment variables", "object", "Added to every step (no secrets)."),
                    "console_region_url": _field("Console URL template", description="With {region} and {name}."),
                },
            },
            {
                **_connection_type("vertex"),
                "conn-fields": {
                    **_COMMON_FIELDS,
                    **_api_fields(30),
                    "gcp_conn_id": _field("Google connection id", description="Google provider connection.",
                                          default="google_cloud_default"),
                    "project": _field("Project", description="GCP project (default: the google connection's)."),
                    "location": _field("Location", description="Vertex AI region, e.g. us-central1."),
                    "image": _field("Image", description="Container image URI with Python and cloudpickle."),
                    "service_account": _field("Service account", description="The jobs run as this account."),
                    "network": _field("VPC network", description="projects/<number>/global/networks/<name>."),
                    "reserved_ip_ranges": _field("Reserved IP ranges", "array"),
                    "encryption_spec_key_name": _field("KMS key (CMEK)"),
                    "persistent_resource_id": _field("Persistent resource id"),
                    "labels": _field("Labels", "object", "Added to every CustomJob."),
                    "environment": _field("Environment variables", "object", "Added to every step (no secrets)."),
                    "machine_type": _field("Default machine type", description="e.g. n1-standard-8."),
                    "accelerator_type": _field("Default accelerator", description="e.g. NVIDIA_TESLA_T4."),
                    "accelerator_count": _field("Default accelerator count", "integer"),
                    "api_endpoint": _field("Vertex API endpoint", description="Default: "
                                           "<location>-aiplatform.googleapis.com."),
                    "logging_endpoint": _field("Cloud Logging endpoint", description="Default: logging.googleapis.com."),
                    "log_settle_seconds": _field("Log settle time (s)", "number", description="Wait after a job "
                                                 "ends for Cloud Logging to take in its last lines.", default=10),
                    "console_url_template": _field("Console URL template",
                                                   description="With {location}, {job_id} and {project}."),
                },
            },
            {
                **_connection_type("azureml"),
                "conn-fields": {
                    **_COMMON_FIELDS,
                    **_api_fields(60, attempts=4),
                    "azure_conn_id": _field("Azure connection id", description="microsoft-azure provider connection "
                                            "(DefaultAzureCredential when it has no service principal).",
                                            default="azure_default"),
                    "subscription_id": _field("Subscription id", description="Azure subscription of the workspace."),
                    "resource_group": _field("Resource group"),
                    "workspace_name": _field("Workspace name", description="Azure ML workspace."),
                    "compute_target_name": _field("Compute target", description="Cluster or compute instance; "
                                                  "empty: serverless compute."),
                    "image": _field("Image", description="Container image with Python and cloudpickle."),
                    "azureml_environment": _field("Registered environment", description="azureml:<name>:<version> "
                                                  "instead of an image."),
                    "storage_conn_id": _field("Storage connection id", description="wasb/adls connection workers "
                                              "use for the artifact store when its URI names none."),
                    "datastore": _field("Datastore", description="Datastore the jobs reach an abfs:// store "
                                        "through.", default="workspaceblobstore"),
                    "instance_type": _field("Default VM size", description="e.g. Standard_D4s_v3 (serverless)."),
                    "experiment_name": _field("Experiment name", description="Default: the DAG id."),
                    "tags": _field("Tags", "object", "Added to every job."),
                    "environment": _field("Environment variables", "object", "Added to every step (no secrets)."),
                    "console_url_template": _field("Console URL template", description="With {job_name}, "
                                                   "{subscription_id}, {resource_group} and {workspace_name}."),
                },
            },
            {
                **_connection_type("modal"),
                "conn-fields": {
                    **_COMMON_FIELDS,
                    "modal_conn_id": _field("Modal connection id", description="modal provider connection (token "
                                            "id and secret); without it, MODAL_TOKEN_ID/MODAL_TOKEN_SECRET or "
                                            "~/.modal.toml.", default="modal_default"),
                    "environment": _field("Modal environment", description="Default: the modal connection's."),
                    "app_name": _field("App name prefix", description="One deployed app per image and set of "
                                       "function options, named <prefix>-<hash>.", default="airflow-stepops"),
                    "image": _field("Image", description="Registry image with Python and cloudpickle; default: "
                                    "Modal's debian_slim."),
                    "python_version": _field("Python version", description="Of the default image (default: the "
                                             "worker's), or added to a registry image without Python."),
                    "pip_packages": _field("pip packages", "array", "Installed into the image."),
                    "secrets": _field("Modal secrets", "array", "Names of Modal secrets every step gets."),
                    "volumes": _field("Modal volumes", "object", "Mount path -> volume name."),
                    "checkpoint_volume": _field("Checkpoint volume", description="Modal volume holding "
                                                "STEPOPS_CHECKPOINT_DIR (default: <app name>-checkpoints)."),
                    "region": _field("Region", ["string", "array"], "Default region(s), e.g. us-east."),
                    "cloud": _field("Cloud", description="aws, gcp, oci or auto."),
                    "environment_variables": _field("Environment variables", "object",
                                                    "Added to every step (no secrets)."),
                    "console_url_template": _field("Console URL template", description="With {call_id}, "
                                                   "{app_name}, {function_id} and {environment}."),
                },
            },
        ],
        "config": {
            "stepops": {
                "description": "Defaults of airflow-stepops step operators.",
                "options": {
                    "default_deferrable": {
                        "description": "Whether step tasks wait for their remote job in the triggerer unless "
                        "the task sets deferrable=. The environment variable "
                        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE, when set, takes precedence.",
                        "version_added": "0.1.0",
                        "type": "boolean",
                        "example": None,
                        "default": "True",
                    },
                },
            },
        },
        "task-decorators": [
            {"name": "step_operator", "class-name": "airflow_stepops.decorators.step_operator.step_operator_task"},
        ],
        "extra-links": ["airflow_stepops.links.StepJobLink"],
        "hooks": [
            {"integration-name": "Step Operators", "python-modules": ["airflow_stepops.hooks.local", "airflow_stepops.hooks.kubernetes",
                                                                     "airflow_stepops.hooks.sagemaker", "airflow_stepops.hooks.vertex",
                                                                     "airflow_stepops.hooks.azureml", "airflow_stepops.hooks.modal"]},
        ],
        "operators": [
            {"integration-name": "Step Operators", "python-modules": ["airflow_stepops.operators.local", "airflow_stepops.operators.kubernetes",
                                                                     "airflow_stepops.operators.sagemaker", "airflow_stepops.operators.vertex",
                                                                     "airflow_stepops.operators.azureml", "airflow_stepops.operators.modal"]},
        ],
        "triggers": [
            {"integration-name": "Step Operators", "python-modules": ["airflow_stepops.triggers.local", "airflow_stepops.triggers.kubernetes",
                                                                     "airflow_stepops.triggers.sagemaker", "airflow_stepops.triggers.vertex",
                                                                     "airflow_stepops.triggers.azureml", "airflow_stepops.triggers.modal"]},
        ],
        "integrations": [
            {
                "integration-name": "Step Operators",
                "external-doc-url": "https://pypi.org/project/airflow-stepops/",
                "tags": ["software"],
            }
        ],
    }
