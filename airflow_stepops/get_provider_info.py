"""Provider metadata read by Airflow's providers manager; static so it costs nothing to load.

``tests/unit/test_provider.py`` checks that every form field here matches the flavor's config model.
"""

from __future__ import annotations

from typing import Any


def _field(label: str, kind: str | list[str] = "string", description: str = "", **schema: Any) -> dict[str, Any]:
    types = [kind] if isinstance(kind, str) else list(kind)
    out: dict[str, Any] = {"label": label, "schema": {"type": [*types, "null"], **schema}}
    if description:
        out["description"] = description
    return out


_COMMON_FIELDS = {
    "artifact_store": _field("Artifact store URI", description="Where step bundles and results are kept."),
    "max_result_size": _field("Max result size", description='Largest result a step may store, e.g. "10GB".'),
    "inline_result_max_size": _field(
        "Max inline (XCom) result size", description='JSON results up to this size go to XCom, e.g. "48KB".'
    ),
}

_HIDDEN = ["host", "schema", "login", "password", "port", "extra"]


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-stepops",
        "name": "Step Operators",
        "description": "Run chosen Python tasks on Kubernetes, SageMaker, Vertex AI, Azure ML, Modal or a "
        "detached local process: the step-operator model for Airflow.",
        "versions": ["0.1.0"],
        "connection-types": [
            {
                "hook-class-name": "airflow_stepops.hooks.local.LocalStepOperatorHook",
                "hook-name": "Step operator: local subprocess",
                "connection-type": "stepops_local",
                "ui-field-behaviour": {"hidden-fields": _HIDDEN, "relabeling": {}, "placeholders": {}},
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
            {"integration-name": "Step Operators", "python-modules": ["airflow_stepops.hooks.local"]},
        ],
        "operators": [
            {"integration-name": "Step Operators", "python-modules": ["airflow_stepops.operators.local"]},
        ],
        "triggers": [
            {"integration-name": "Step Operators", "python-modules": ["airflow_stepops.triggers.local"]},
        ],
        "integrations": [
            {
                "integration-name": "Step Operators",
                "external-doc-url": "https://pypi.org/project/airflow-stepops/",
                "tags": ["software"],
            }
        ],
    }
