"""Errors the way Azure ML words them, and the faults a test can inject.

A job fault reaches a job through a rule registered with ``AzureMLEmulator.inject`` and taken when the
job is created; ``AzureMLEmulator.fail_requests`` makes the REST API itself answer errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from airflow_stepops.testing import _kit

JSON = dict[str, Any]

#: What a job on preemptible capacity (``queueSettings.jobTier: Spot``, a low-priority cluster) fails with when
#: its node is taken back: the text AmlCompute reports, quoted in
#: https://github.com/MicrosoftDocs/azure-docs/issues/66288 and https://github.com/microsoft/MLOpsPython/issues/346
#: ("UserError: AzureMLCompute job failed. PreemptionError: ..."). The AmlCompute code also travels as the
#: ``innerError`` code (run history's RootError: "A nested structure of errors"), which is what clients compare.
PREEMPTION_ERROR: JSON = {
    "code": "UserError",
    "message": ("AzureMLCompute job failed. PreemptionError: Nodes of this job got pre-empted. Check if the run "
                "has failed or restarted. Reason: Received pre-emption warning signal"),
    "innerError": {"code": "PreemptionError"},
}
#: What a dedicated-node job fails with when a ``preemption`` fault strikes it (the node is lost; the
#: emulator's wording and code: Azure reports such losses as system errors).
NODE_LOST_ERROR: JSON = {
    "code": "SystemError",
    "message": "AzureMLCompute job failed. NodeFailure: the node running the job became unavailable and the job "
               "was stopped.",
    "innerError": {"code": "NodeFailure"},
}
#: Default of a ``failure`` fault.
INJECTED_FAILURE: JSON = {"code": "SystemError", "message": "AzureMLCompute job failed. JobFailed: injected failure."}


def user_process_error(command: str, exit_code: int, tail: list[str]) -> JSON:
    """The error of a job whose process exited non-zero, worded as Azure ML's common runtime does:
    ``Execution failed. User process 'python' exited with status code 2. Please check log file
    'user_logs/std_log.txt' for error details. Error: <the output's last lines>``."""
    program = command.strip().split(None, 1)[0] if command.strip() else "bash"
    detail = "\n".join(tail[-10:]).strip()
    message = (f"Execution failed. User process '{program}' exited with status code {exit_code}. "
               "Please check log file 'user_logs/std_log.txt' for error details.")
    if detail:
        message += f" Error: {detail}"
    return {"code": "UserError", "message": message[:3000],  # run history keeps 3,000 characters of a message
            "messageParameters": {"exitCode": str(exit_code)}}


def data_error(message: str) -> JSON:
    return {"code": "UserError", "message": message, "innerError": {"code": "DataAccessError"}}


# ----- the REST API's errors ------------------------------------------------------------------------


class ApiError(Exception):
    """An ARM-shaped error answer: ``{"error": {"code", "message", "details", "additionalInfo"}}``."""

    def __init__(self, status: int, code: str, message: str, *, details: list[JSON] | None = None,
                 inner: JSON | None = None, target: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.inner, self.target = details or [], inner, target
        self.headers = headers or {}

    def body(self) -> JSON:
        error: JSON = {"code": self.code, "message": self.message, "details": self.details,
                       "additionalInfo": [{"type": "ComponentName", "info": {"value": "managementfrontend"}}]}
        if self.target:
            error["target"] = self.target
        if self.inner:
            error["innerError"] = self.inner
        return {"error": error}


def bad_request(message: str, *, target: str | None = None, code: str = "ValidationError",
                detail_code: str = "Invalid") -> ApiError:
    detail = {"code": detail_code, "message": message, "target": target, "details": [], "additionalInfo": []}
    return ApiError(400, code, message, details=[detail], target=target)


def not_found(kind: str, name: str) -> ApiError:
    return ApiError(404, "UserError", f"{kind} {name} not found.", inner={"code": "NotFoundError"})


#: the update rule of the service for an existing job name (MicrosoftDocs/azure-docs#122250, and
#: Azure/azure-sdk-for-python#47389 for the innerError ``Immutable`` / ``JobPropertyImmutable``)
IMMUTABLE_JOB_MESSAGE = (
    "A job with this name already exists. If you are trying to create a new job, use a different name. If you are "
    "trying to update an existing job, the existing job's {fields} cannot be changed. Only description, tags, "
    "displayName, properties, and isArchived can be updated.")


def immutable_job(fields: list[str]) -> ApiError:
    names = ",  ".join(fields)
    return ApiError(400, "UserError", IMMUTABLE_JOB_MESSAGE.format(fields=names),
                    inner={"code": "Immutable", "innerError": {"code": "JobPropertyImmutable"}},
                    details=[{"code": "JobPropertyImmutable", "message": f"Changed: {names}", "details": [],
                              "additionalInfo": []}])


# ----- quota ----------------------------------------------------------------------------------------

#: vCPUs of the VM sizes tests are likely to name (others count 4)
_VCPUS = {"STANDARD_DS1_V2": 1, "STANDARD_DS2_V2": 2, "STANDARD_DS3_V2": 4, "STANDARD_DS4_V2": 8,
          "STANDARD_DS11_V2": 2, "STANDARD_DS12_V2": 4, "STANDARD_D2S_V3": 2, "STANDARD_D4S_V3": 4,
          "STANDARD_E4S_V3": 4, "STANDARD_F4S_V2": 4, "STANDARD_NC6S_V3": 6, "STANDARD_NC24ADS_A100_V4": 24,
          "STANDARD_ND96ASR_V4": 96}


def vm_family(vm_size: str) -> str:
    """``Standard_DS3_v2`` -> ``Standard DSv2``, ``Standard_NC6s_v3`` -> ``Standard NCSv3`` (quota families)."""
    found = re.match(r"(?i)standard_([a-z]+)\d+([a-z]*)(?:_[a-z0-9]+)*?(?:_(v\d))?$", vm_size)
    if not found:
        return vm_size
    letters, suffix, version = found.group(1).upper(), found.group(2).upper(), (found.group(3) or "").lower()
    return f"Standard {letters}{suffix}{version}"


def quota_error(vm_size: str, instance_count: int, quota: int, status: int) -> ApiError:
    """The submission error of a job whose nodes exceed the VM family's core quota, worded as in
    https://github.com/MicrosoftLearning/mslearn-dp100/issues/35 (status code JobNodeCountExceedsCoreQuota)."""
    family = vm_family(vm_size)
    vcpus = _VCPUS.get(vm_size.upper(), 4) * max(instance_count, 1)
    message = (f"Job submission to AzureML Compute encountered an Exception with status code "
               f"JobNodeCountExceedsCoreQuota, The specified subscription has a {family} family vCPU quota of {quota} "
               f"and is less than the requested job node count of {instance_count} which maps to {vcpus} vCPUs. Talk "
               "to your Subscription Admin or refer to https://docs.microsoft.com/azure/machine-learning/"
               f"how-to-manage-quotas#request-quota-increases to increase the {family} family vCPU quota")
    return ApiError(status, "UserError", message, inner={"code": "JobNodeCountExceedsCoreQuota"},
                    details=[{"code": "JobNodeCountExceedsCoreQuota", "message": message, "details": [],
                              "additionalInfo": []}])


# ----- injected faults ------------------------------------------------------------------------------

#: kinds that strike ``after`` seconds into the user process
RUNNING_KINDS = frozenset({"preemption", "failure"})
KINDS = RUNNING_KINDS | {"quota_exceeded", "slow_start"}


@dataclass(frozen=True)
class Fault(_kit.Fault):
    """One injected misfortune of a job.

    kind:
        ``preemption`` — ``after`` seconds into ``Running`` the node is taken back: the process group gets
        SIGTERM (SIGKILL after ``stop_grace_period``). A job with ``queueSettings.jobTier: Spot`` or on a
        low-priority cluster ends ``Failed`` with ``PREEMPTION_ERROR``; any other job ``Failed`` with
        ``NODE_LOST_ERROR`` (an ordinary failure). Outputs are uploaded as for any failure.
        ``quota_exceeded`` — the job's create (PUT) answers the core-quota error (``quota_error``: HTTP
        ``status_code``, default 400; ``quota`` vCPUs, default 0) and no job is made.
        ``failure`` — the job fails with ``message`` (code ``SystemError``) ``after`` seconds into
        ``Running``, killing the process if it still runs (a process that ended sooner fails all the same).
        ``slow_start`` — the job stays ``Queued`` ``duration`` seconds longer.
    """

    KINDS = KINDS

    duration: float = 2.0
    quota: int = 0
    status_code: int = 400

    def failure_error(self) -> JSON:
        return {"code": "SystemError", "message": self.message} if self.message else dict(INJECTED_FAILURE)


FaultRule, take_faults = _kit.FaultRule, _kit.take_faults


#: what ``RequestFault.lose_reply`` does to the reply of a request the service did carry out
LOST_REPLIES = frozenset({"drop", "hang"})


@dataclass
class RequestFault:
    """Answer the next ``times`` matching API requests (None: all) with HTTP ``status_code`` and the ARM
    error ``code``; ``path_contains`` and ``method`` narrow the requests (both None: any).

    With ``lose_reply`` the request is carried out (a PUT creates its job) but its reply is lost, as when a
    connection breaks after the service acted: ``drop`` closes the connection without an answer, ``hang``
    sends nothing for ``hang_seconds`` (then closes it); ``status_code`` and ``code`` are not used."""

    status_code: int
    code: str
    times: int | None = 1
    path_contains: str | None = None
    method: str | None = None
    message: str | None = None
    lose_reply: str | None = None
    hang_seconds: float = 30.0
    hits: int = 0

    def __post_init__(self) -> None:
        if self.lose_reply is not None and self.lose_reply not in LOST_REPLIES:
            raise ValueError(f"lose_reply must be one of {sorted(LOST_REPLIES)}, not {self.lose_reply!r}")

    def matches(self, method: str, path_qs: str) -> bool:
        if self.method and method.upper() != self.method.upper():
            return False
        return self.path_contains is None or self.path_contains.lower() in path_qs.lower()

    def error(self) -> ApiError:
        message = self.message or f"Injected {self.code} error from the Azure ML emulator."
        headers = {"Retry-After": "1"} if self.status_code in (429, 503) else {}
        return ApiError(self.status_code, self.code, message, headers=headers)
