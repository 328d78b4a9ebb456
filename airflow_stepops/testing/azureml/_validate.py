"""Checks of a job's PUT body, as Azure ML's management front end (MFE) makes them, and its defaults.

Bad bodies answer 400 in ARM's error format: ``ValidationError`` for the shape of the body (missing or
mistyped fields, unknown enum values), ``UserError`` for references that do not resolve (compute,
environment, datastore). The emulator runs ``Command`` jobs only.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Callable
from typing import Any

import isodate

from airflow_stepops.testing.azureml._faults import JSON, ApiError, bad_request

#: the ``id`` of Jobs_CreateOrUpdate in the REST API's specification (azure-rest-api-specs, specification/
#: machinelearningservices/resource-manager/Microsoft.MachineLearningServices/stable/2024-04-01/mfe.json)
JOB_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_\-]{0,254}$")
#: experiment names as run history takes them: azureml-core's ``_base_sdk_common.common._valid_experiment_name``
#: ("between 1 and 255 characters long. Its first character has to be alphanumeric, and the rest may contain
#: hyphens and underscores. No whitespace is allowed.")
EXPERIMENT_LENGTH_MIN, EXPERIMENT_LENGTH_MAX = 1, 255
EXPERIMENT_NAME = re.compile(rf"^[a-zA-Z0-9][\w\-]{{{EXPERIMENT_LENGTH_MIN - 1},{EXPERIMENT_LENGTH_MAX - 1}}}$", re.ASCII)
IO_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]{0,254}$")
PLACEHOLDER = re.compile(r"\$\{\{\s*(inputs|outputs)\.([A-Za-z0-9_]+)\s*\}\}")
#: ``$[[...]]``: a part of the command kept only when the inputs it names are given
OPTIONAL_PART = re.compile(r"\$\[\[(.*?)\]\]", re.S)

#: "Runs" in Azure ML's service limits (https://learn.microsoft.com/en-us/azure/machine-learning/
#: resource-limits-capacity#runs): (most entries, longest key, longest value) of tags and properties, and the
#: longest display name and description
RUN_MAPS = {"tags": (50, 100, 1000), "properties": (50, 100, 1000)}
RUN_TEXTS = {"displayName": 256, "description": 5000}
INPUT_TYPES = {"literal", "uri_file", "uri_folder", "mltable", "custom_model", "mlflow_model", "triton_model"}
OUTPUT_TYPES = INPUT_TYPES - {"literal"}
INPUT_MODES = {"ReadOnlyMount", "ReadWriteMount", "Download", "Direct", "EvalMount", "EvalDownload"}
OUTPUT_MODES = {"ReadWriteMount", "Upload", "Direct"}
JOB_TIERS = {"Null", "Spot", "Basic", "Standard", "Premium"}
#: the fields the service lets a PUT change on an existing job (MicrosoftDocs/azure-docs#122250)
MUTABLE_FIELDS = frozenset({"description", "tags", "displayName", "properties", "isArchived"})
#: fields only the service writes; ignored in a PUT body
READ_ONLY_FIELDS = frozenset({"status", "services", "parameters"})


def parse_timeout(value: Any) -> float:
    """``limits.timeout`` in seconds: the REST shape is an ISO 8601 duration (``PT30M``); a number of
    seconds is accepted too."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(\.\d+)?", value.strip()):
        seconds = float(value)
    elif isinstance(value, str):
        duration = isodate.parse_duration(value)
        if not isinstance(duration, datetime.timedelta):  # months or years
            raise ValueError(value)
        seconds = duration.total_seconds()
    else:
        raise ValueError(value)
    if seconds <= 0:
        raise ValueError(value)
    return seconds


def _require_dict(value: Any, where: str) -> JSON:
    if not isinstance(value, dict):
        raise bad_request(f"{where} must be an object.", target=where)
    return value


def _require_str(props: JSON, key: str) -> str:
    value = props.get(key)
    if not isinstance(value, str) or not value.strip():
        raise bad_request(f"{key} is required and must be a non-empty string.", target=key, detail_code="Required")
    return value


def validate_job(name: str, body: Any, *, locate: Callable[[str], Any], compute_exists: Callable[[str], bool],
                 environment_exists: Callable[[str], bool], workspace_path: str) -> JSON:
    """The job's ``properties`` with the service's defaults, or an ApiError saying what is wrong.

    ``locate`` maps a data URI to Azurite (raising on URIs the emulator cannot reach); the two
    ``*_exists`` callables look up workspace computes and environment versions by ARM id.
    """
    if not JOB_NAME.match(name):
        raise bad_request(f"The job name {name!r} is invalid: use letters, digits, '-' and '_', starting with a "
                          "letter or digit, at most 255 characters.", target="id")
    body = _require_dict(body, "body")
    props = copy.deepcopy(_require_dict(body.get("properties"), "properties"))
    for key in READ_ONLY_FIELDS:
        props.pop(key, None)
    job_type = props.get("jobType")
    if job_type is None:
        raise bad_request("properties.jobType is required.", target="jobType", detail_code="Required")
    if job_type != "Command":
        raise bad_request(f"jobType {job_type!r} is not supported by the emulator, which runs Command jobs only.",
                          target="jobType")
    command = _require_str(props, "command")
    environment_id = _require_str(props, "environmentId")
    if environment_id.lower().startswith("/subscriptions/") and not environment_exists(environment_id):
        raise ApiError(400, "UserError", f"Environment {environment_id} could not be found in the workspace.",
                       target="environmentId", inner={"code": "NotFoundError"})
    if not (environment_id.lower().startswith(("/subscriptions/", "azureml:"))):
        raise bad_request(f"environmentId {environment_id!r} is not an environment ARM id or an azureml: reference.",
                          target="environmentId")
    resources = _require_dict(props.setdefault("resources", {}) or {}, "resources")
    props["resources"] = resources
    count = resources.setdefault("instanceCount", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise bad_request("resources.instanceCount must be a positive integer.", target="resources.instanceCount")
    shm = resources.setdefault("shmSize", "2g")
    if not isinstance(shm, str) or not re.fullmatch(r"\d+[bkmgBKMG]?", shm):
        raise bad_request(f"resources.shmSize {shm!r} must be a number with an optional unit b, k, m or g.",
                          target="resources.shmSize")
    instance_type = resources.get("instanceType")
    if instance_type is not None and (not isinstance(instance_type, str) or not instance_type):
        raise bad_request("resources.instanceType must be a string.", target="resources.instanceType")
    compute_id = props.get("computeId")
    if compute_id:
        if not isinstance(compute_id, str):
            raise bad_request("computeId must be a string.", target="computeId")
        if not compute_id.lower().startswith(f"{workspace_path.lower()}/computes/"):
            raise bad_request(f"computeId {compute_id} is not a compute of workspace {workspace_path}.",
                              target="computeId")
        if not compute_exists(compute_id):
            raise ApiError(400, "UserError", f"Compute {compute_id.rsplit('/', 1)[-1]} was not found in the workspace.",
                           target="computeId", inner={"code": "NotFoundError"})
    elif not instance_type:
        raise bad_request("A job without computeId runs on serverless compute and needs resources.instanceType.",
                          target="resources.instanceType", detail_code="Required")
    env_vars = props.get("environmentVariables") or {}
    if not isinstance(env_vars, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in env_vars.items()):
        raise bad_request("environmentVariables must map names to string values.", target="environmentVariables")
    props["environmentVariables"] = env_vars
    _check_limits(props)
    _check_queue(props)
    inputs = _check_inputs(_require_dict(props.get("inputs") or {}, "inputs"), locate)
    outputs = _check_outputs(name, _require_dict(props.get("outputs") or {}, "outputs"), locate)
    props["inputs"], props["outputs"] = inputs, outputs
    for kind, ref in PLACEHOLDER.findall(OPTIONAL_PART.sub("", command)):
        declared = inputs if kind == "inputs" else outputs
        if ref not in declared:
            raise bad_request(f"The command refers to ${{{{{kind}.{ref}}}}}, which is not among the job's {kind}.",
                              target="command")
    for key in ("tags", "properties"):
        value = props.get(key) or {}
        if not isinstance(value, dict):
            raise bad_request(f"{key} must be an object.", target=key)
        props[key] = {str(k): "" if v is None else str(v) for k, v in value.items()}
        most, key_chars, value_chars = RUN_MAPS[key]
        if len(props[key]) > most:
            raise bad_request(f"The job has {len(props[key])} {key}; at most {most} are allowed.", target=key)
        for k, v in props[key].items():
            if not k or len(k) > key_chars or len(v) > value_chars:
                raise bad_request(f"{key} {k[:50]!r}: keys must have 1 to {key_chars} characters and values at most "
                                  f"{value_chars}.", target=key)
    for key, longest in RUN_TEXTS.items():
        if isinstance(props.get(key), str) and len(props[key]) > longest:
            raise bad_request(f"{key} must have at most {longest} characters.", target=key)
    experiment = props.setdefault("experimentName", "Default")
    if not isinstance(experiment, str) or not EXPERIMENT_NAME.match(experiment):
        raise bad_request(f"Experiment name must be between {EXPERIMENT_LENGTH_MIN} and {EXPERIMENT_LENGTH_MAX} "
                          "characters long. Its first character has to be alphanumeric, and the rest may contain "
                          "hyphens and underscores. No whitespace is allowed.", target="experimentName")
    props.setdefault("displayName", name)
    props.setdefault("isArchived", False)
    return props


def _check_limits(props: JSON) -> None:
    limits = props.get("limits")
    if limits is None:
        return
    limits = _require_dict(limits, "limits")
    if limits.get("jobLimitsType", "Command") != "Command":
        raise bad_request("limits.jobLimitsType must be Command for a command job.", target="limits.jobLimitsType")
    if limits.get("timeout") is not None:
        try:
            parse_timeout(limits["timeout"])
        except (ValueError, isodate.ISO8601Error):
            raise bad_request(f"limits.timeout {limits['timeout']!r} is not a positive ISO 8601 duration "
                              "(like PT30M).", target="limits.timeout")


def _check_queue(props: JSON) -> None:
    queue = props.get("queueSettings")
    if queue is None:
        return
    queue = _require_dict(queue, "queueSettings")
    tier = queue.get("jobTier")
    if tier is not None and tier not in JOB_TIERS:
        raise bad_request(f"queueSettings.jobTier {tier!r} is not one of {sorted(JOB_TIERS)}.",
                          target="queueSettings.jobTier")


def _check_inputs(inputs: JSON, locate: Callable[[str], Any]) -> JSON:
    checked: JSON = {}
    for key, value in inputs.items():
        where = f"inputs.{key}"
        if not IO_NAME.match(key):
            raise bad_request(f"Input name {key!r} is invalid.", target=where)
        item = dict(_require_dict(value, where))
        kind = item.get("jobInputType")
        if kind not in INPUT_TYPES:
            raise bad_request(f"{where}.jobInputType {kind!r} is not one of {sorted(INPUT_TYPES)}.", target=where)
        if kind == "literal":
            if "value" not in item or item["value"] is None:
                raise bad_request(f"{where}.value is required for a literal input.", target=where,
                                  detail_code="Required")
            item["value"] = str(item["value"])
        else:
            uri = item.get("uri")
            if not isinstance(uri, str) or not uri:
                raise bad_request(f"{where}.uri is required.", target=where, detail_code="Required")
            mode = item.setdefault("mode", "ReadOnlyMount")
            if mode not in INPUT_MODES:
                raise bad_request(f"{where}.mode {mode!r} is not an input mode ({sorted(INPUT_MODES)}).",
                                  target=where)
            _locate(locate, uri, where)
        checked[key] = item
    return checked


def _check_outputs(job_name: str, outputs: JSON, locate: Callable[[str], Any]) -> JSON:
    checked: JSON = {}
    for key, value in outputs.items():
        where = f"outputs.{key}"
        if not IO_NAME.match(key):
            raise bad_request(f"Output name {key!r} is invalid.", target=where)
        item = dict(_require_dict(value, where))
        kind = item.get("jobOutputType")
        if kind not in OUTPUT_TYPES:
            raise bad_request(f"{where}.jobOutputType {kind!r} is not one of {sorted(OUTPUT_TYPES)}.", target=where)
        mode = item.setdefault("mode", "ReadWriteMount")
        if mode not in OUTPUT_MODES:
            raise bad_request(f"{where}.mode {mode!r} is not an output mode ({sorted(OUTPUT_MODES)}).", target=where)
        if not item.get("uri"):
            suffix = "" if kind == "uri_file" else "/"
            item["uri"] = f"azureml://datastores/workspaceblobstore/paths/azureml/{job_name}/{key}{suffix}"
        _locate(locate, item["uri"], where)
        checked[key] = item
    return checked


def _locate(locate: Callable[[str], Any], uri: str, where: str) -> None:
    try:
        locate(uri)
    except Exception as exc:
        raise ApiError(400, "UserError", f"{where}: {exc}", target=where, inner={"code": "DataAccessError"})


def immutable_changes(old: JSON, new: JSON) -> list[str]:
    """The fields a re-PUT of an existing job would change that the service does not let change."""
    keys = (set(old) | set(new)) - MUTABLE_FIELDS - READ_ONLY_FIELDS
    return sorted(k for k in keys if _normal(old.get(k)) != _normal(new.get(k)))


def _normal(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items() if v is not None and v != {} and v != []}
    if isinstance(value, list):
        return [_normal(v) for v in value]
    return value
