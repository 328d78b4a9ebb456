"""The emulator's changes to moto's SageMaker service, written against moto 5.2.5 (pinned exactly).

moto 5.2.5 keeps training jobs as records only: ``CreateTrainingJob`` stores a ``FakeTrainingJob``
that is ``Completed`` at once (with a fabricated ``MetricDefinitions`` and ``FinalMetricDataList``),
drops the request fields it has no parameter for (``Environment``, ``RetryStrategy``, ...), silently
replaces a job of the same name, has no ``StopTrainingJob``, and filters ``ListTrainingJobs`` by name
only after paginating. ``apply()`` replaces, on moto's classes:

* ``SageMakerResponse.create_training_job`` / ``describe_training_job`` / ``list_training_jobs`` and the
  new ``stop_training_job``: they hand the whole parsed request to the backend methods below;
* ``SageMakerModelBackend.create_training_job`` (a name, tags or environment outside the limits of the
  API reference answer ``ValidationException``, which moto never does; same name: a duplicate answers
  ``ResourceInUse`` as SageMaker does) storing a ``TrainingJob`` (``_jobs.py``) in moto's ``training_jobs`` dict, so moto's
  tag and search code keep working, and telling the listener (the emulator) to run it;
  ``describe_training_job`` (``ValidationException: Requested resource not found.`` when missing),
  ``list_training_jobs`` (filters, ``SortBy``/``SortOrder``, pages of ``MaxResults`` (default 10), then
  ``StatusEquals`` within the page, as SageMaker documents) and ``stop_training_job``.

And one change to moto's CloudWatch Logs, whose ``FilterLogEvents`` ignores ``logStreamNamePrefix``
(returning every stream's events, so "the lines of job X" came back mixed with other jobs' lines):
``LogsResponse.filter_log_events`` turns the prefix into the ``logStreamNames`` moto does honour.

Nothing else of moto changes. ``apply()`` is idempotent; with no listener set, jobs stay ``Starting``.
"""

from __future__ import annotations

import json
import re
import threading
import unicodedata
import warnings
from datetime import datetime, timezone
from typing import Any, Protocol

from airflow_stepops.testing.sagemaker._jobs import JSON, JobStateError, TrainingJob

MOTO_VERSION = "5.2.5"

#: CreateTrainingJob's limits as the API reference publishes them (moto checks none):
#: https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_CreateTrainingJob.html (TrainingJobName
#: 1-63 characters, pattern ^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}; Tags 0-50 items; Environment at most 100
#: entries, keys [a-zA-Z_][a-zA-Z0-9_]* and keys and values at most 512 characters) and
#: https://docs.aws.amazon.com/sagemaker/latest/APIReference/API_Tag.html (Key 1-128 and Value 0-256
#: characters, both ^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$: letters, separators, numbers and _.:/=+-@).
_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
_ENV_KEY = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_TAG_PATTERN = r"^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$"


def _tag_text(text: str) -> bool:
    return all(unicodedata.category(c)[0] in "LZN" or c in "_.:/=+-@" for c in text)


class Listener(Protocol):
    def job_created(self, job: TrainingJob) -> None: ...

    def job_stop_requested(self, job: TrainingJob) -> None: ...


_listener: Listener | None = None
_applied = False
_apply_lock = threading.Lock()
#: guards the check-then-insert of CreateTrainingJob (moto's server answers requests on many threads)
_create_lock = threading.Lock()


def set_listener(listener: Listener | None) -> None:
    global _listener
    _listener = listener


def apply() -> None:
    """Patch moto's SageMaker response and backend classes (once per process)."""
    global _applied
    with _apply_lock:
        if _applied:
            return
        import moto
        from moto.logs.responses import LogsResponse
        from moto.sagemaker.models import SageMakerModelBackend
        from moto.sagemaker.responses import SageMakerResponse

        if moto.__version__ != MOTO_VERSION:
            warnings.warn(f"the SageMaker emulator patches moto {MOTO_VERSION}; moto {moto.__version__} is "
                          "installed and may not fit", RuntimeWarning, stacklevel=2)
        for cls, names in ((SageMakerModelBackend, ("create_training_job", "describe_training_job",
                                                    "list_training_jobs", "add_tags", "list_tags")),
                           (SageMakerResponse, ("create_training_job", "describe_training_job",
                                                "list_training_jobs", "_get_params", "sagemaker_backend")),
                           (LogsResponse, ("filter_log_events", "logs_backend"))):
            missing = [n for n in names if not hasattr(cls, n)]
            if missing:
                raise RuntimeError(f"moto {moto.__version__}: {cls.__name__} lacks {missing}; the SageMaker "
                                   f"emulator needs moto {MOTO_VERSION}")
        backend: Any = SageMakerModelBackend
        backend.create_training_job = _backend_create
        backend.describe_training_job = _backend_describe
        backend.list_training_jobs = _backend_list
        backend.stop_training_job = _backend_stop
        response: Any = SageMakerResponse
        response.create_training_job = _response_create
        response.describe_training_job = _response_describe
        response.list_training_jobs = _response_list
        response.stop_training_job = _response_stop
        logs: Any = LogsResponse
        original = logs.filter_log_events

        def filter_log_events(self: Any) -> Any:
            return _logs_filter(self, original)
        logs.filter_log_events = filter_log_events
        _applied = True


# ----- errors, as moto serialises them ------------------------------------------------------------


def _validation(message: str) -> Exception:
    from moto.sagemaker.exceptions import ValidationError

    return ValidationError(message=message)


def _not_found() -> Exception:
    return _validation("Requested resource not found.")


def _check_request(request: JSON) -> None:
    """ValidationException for what CreateTrainingJob's published limits refuse, in AWS's wording."""
    errors: list[str] = []

    def fail(value: Any, where: str, constraint: str) -> None:
        errors.append(f"Value '{value}' at '{where}' failed to satisfy constraint: {constraint}")

    name = str(request.get("TrainingJobName", ""))
    if len(name) > 63:
        fail(name, "trainingJobName", "Member must have length less than or equal to 63")
    if not _NAME.fullmatch(name):
        fail(name, "trainingJobName", f"Member must satisfy regular expression pattern: ^{_NAME.pattern}")
    tags = list(request.get("Tags") or [])
    if len(tags) > 50:
        fail(tags, "tags", "Member must have length less than or equal to 50")
    for number, tag in enumerate(tags, 1):
        for field, low, high in (("Key", 1, 128), ("Value", 0, 256)):
            text, where = str(tag.get(field, "")), f"tags.{number}.member.{field.lower()}"
            if not low <= len(text) <= high:
                fail(text, where, f"Member must have length between {low} and {high}")
            if not _tag_text(text):
                fail(text, where, f"Member must satisfy regular expression pattern: {_TAG_PATTERN}")
    environment = dict(request.get("Environment") or {})
    if len(environment) > 100:
        fail(environment, "environment", "Member must have length less than or equal to 100")
    for key, value in environment.items():
        if len(key) > 512 or not _ENV_KEY.fullmatch(key):
            fail(key, "environment", "Map keys must satisfy constraints: [Member must have length less than or "
                 f"equal to 512, Member must satisfy regular expression pattern: {_ENV_KEY.pattern}]")
        if len(str(value)) > 512:
            fail(value, "environment", "Map value must satisfy constraint: [Member must have length less than "
                 "or equal to 512]")
    pending = (request.get("StoppingCondition") or {}).get("MaxPendingTimeInSeconds")
    if pending is not None and not 1800 <= pending <= 2419200:  # the range of StoppingCondition's API reference
        fail(pending, "stoppingCondition.maxPendingTimeInSeconds",
             "Member must have value greater than or equal to 1800" if pending < 1800 else
             "Member must have value less than or equal to 2419200")
    if errors:
        count = f"{len(errors)} validation error{'s' if len(errors) > 1 else ''} detected"
        raise _validation(f"{count}: {'; '.join(errors)}")


# ----- backend methods (self: moto's SageMakerModelBackend) ---------------------------------------


def _backend_create(self: Any, request: JSON) -> TrainingJob:
    from moto.sagemaker.exceptions import ResourceInUseException
    from moto.sagemaker.utils import arn_formatter

    _check_request(request)
    name = request["TrainingJobName"]
    stopping = request.get("StoppingCondition") or {}
    if request.get("EnableManagedSpotTraining"):
        wait, runtime = stopping.get("MaxWaitTimeInSeconds"), stopping.get("MaxRuntimeInSeconds", 86400)
        if wait is None or wait < runtime:
            raise _validation("Invalid MaxWaitTimeInSeconds. It must be present and be greater than or equal "
                              "to MaxRuntimeInSeconds")
    arn = arn_formatter("training-job", name, self.account_id, self.region_name)
    with _create_lock:
        if name in self.training_jobs:
            raise ResourceInUseException(message="Training job names must be unique within an AWS account and "
                                                 f"region, and a training job with this name already exists ({arn})")
        job = TrainingJob(request, arn)
        self.training_jobs[name] = job
    listener = _listener
    if listener is not None:
        listener.job_created(job)
    return job


def _backend_job(self: Any, name: str) -> TrainingJob:
    job = self.training_jobs.get(name)
    if not isinstance(job, TrainingJob):
        raise _not_found()
    return job


def _backend_describe(self: Any, training_job_name: str) -> JSON:
    return _backend_job(self, training_job_name).describe()


def _backend_stop(self: Any, training_job_name: str) -> None:
    job = _backend_job(self, training_job_name)
    try:
        stopping = job.request_stop()
    except JobStateError as exc:
        raise _validation(str(exc))
    listener = _listener
    if stopping and listener is not None:
        listener.job_stop_requested(job)
    elif stopping:  # nobody runs it: it stops at once
        job.finish("Stopped", "Stopped", "Training job stopped")


def _aware(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(float(value), timezone.utc)


def _backend_list(self: Any, params: JSON) -> JSON:
    jobs = [job for job in list(self.training_jobs.values()) if isinstance(job, TrainingJob)]
    name_contains = params.get("NameContains")
    if name_contains:
        jobs = [job for job in jobs if name_contains in job.name]
    bounds = [("CreationTimeAfter", "creation_time", 1), ("CreationTimeBefore", "creation_time", -1),
              ("LastModifiedTimeAfter", "last_modified_time", 1), ("LastModifiedTimeBefore", "last_modified_time", -1)]
    for param, attr, sign in bounds:
        limit = _aware(params.get(param))
        if limit is not None:
            jobs = [job for job in jobs if (getattr(job, attr) > limit if sign > 0 else getattr(job, attr) < limit)]
    sort_by = params.get("SortBy") or "CreationTime"
    keys = {"Name": lambda j: j.name, "Status": lambda j: j.training_job_status,
            "CreationTime": lambda j: j.creation_time}
    jobs.sort(key=keys.get(sort_by, keys["CreationTime"]), reverse=(params.get("SortOrder") == "Descending"))
    start = 0
    if params.get("NextToken"):
        try:
            start = int(params["NextToken"])
        except ValueError:
            raise _validation("Invalid pagination token because of invalid input.")
    size = int(params.get("MaxResults") or 10)
    page = jobs[start:start + size]
    status = params.get("StatusEquals")
    summaries = [job.summary() for job in page]
    if status:  # SageMaker: "MaxResults jobs are first retrieved ignoring StatusEquals, then filtered"
        summaries = [s for s in summaries if s["TrainingJobStatus"] == status]
    out: JSON = {"TrainingJobSummaries": summaries}
    if start + size < len(jobs):
        out["NextToken"] = str(start + size)
    return out


# ----- response methods (self: moto's SageMakerResponse) ------------------------------------------


def _response_create(self: Any) -> Any:
    from moto.core.responses import ActionResult

    job = self.sagemaker_backend.create_training_job(dict(self._get_params()))
    return ActionResult({"TrainingJobArn": job.arn})


def _response_describe(self: Any) -> Any:
    from moto.core.responses import ActionResult

    return ActionResult(self.sagemaker_backend.describe_training_job(self._get_param("TrainingJobName")))


def _response_list(self: Any) -> Any:
    from moto.core.responses import ActionResult

    params = dict(self._get_params())
    status = params.get("StatusEquals")
    allowed = ["InProgress", "Completed", "Failed", "Stopping", "Stopped", "Deleting"]
    if status and status not in allowed:
        raise _validation(f"1 validation error detected: Value '{status}' at 'statusEquals' failed to satisfy "
                          f"constraint: Member must satisfy enum value set: [{', '.join(allowed)}]")
    return ActionResult(self.sagemaker_backend.list_training_jobs(params))


def _response_stop(self: Any) -> Any:
    from moto.core.responses import EmptyResult

    self.sagemaker_backend.stop_training_job(self._get_param("TrainingJobName"))
    return EmptyResult()


# ----- CloudWatch Logs (self: moto's LogsResponse) -------------------------------------------------


def _logs_filter(self: Any, original: Any) -> Any:
    """FilterLogEvents honouring ``logStreamNamePrefix``, which moto 5.2.5 ignores."""
    from moto.logs.exceptions import InvalidParameterException

    body = json.loads(self.body or "{}")
    prefix = body.get("logStreamNamePrefix")
    group = self.logs_backend.groups.get(body.get("logGroupName") or "")
    if prefix and group is not None:  # (an unknown group: moto's own answer, ResourceNotFoundException)
        if body.get("logStreamNames"):
            raise InvalidParameterException("Cannot specify both logStreamNames and logStreamNamePrefix")
        names = [name for name in list(group.streams) if name.startswith(prefix)]
        if not names:
            return json.dumps({"events": [], "searchedLogStreams": []})
        body["logStreamNames"] = names
        self.body = json.dumps(body)
    return original(self)
