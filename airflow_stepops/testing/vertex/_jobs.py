"""CustomJobs: what the JobService REST methods see — validation, ids, states, listing, cancelling.

A job is kept as CustomJob JSON (camelCase, enum names) and answered through the ``CustomJob`` proto, so
what the clients parse is what Vertex AI would send: int64 fields as strings, enums as numbers when the
request asked for ``$alt=json;enum-encoding=int`` (the generated REST transports do), as names otherwise.

Names use the project NUMBER, as Vertex does (``projects/123456789012/locations/us-central1/customJobs/
<id>``); request paths may name the project by id or number. Another project answers 403
PERMISSION_DENIED, as Google does for projects that do not exist or are not yours; another location
answers 400 INVALID_ARGUMENT (a regional endpoint serves one location).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable
from typing import Any

from airflow_stepops.testing.vertex._errors import ApiError, invalid_argument
from airflow_stepops.testing.vertex._filters import job_filter
from airflow_stepops.testing.vertex._machines import machine_spec_errors
from airflow_stepops.testing.vertex._time import Clock, format_rfc3339

JSON = dict[str, Any]
STATES = frozenset({"JOB_STATE_UNSPECIFIED", "JOB_STATE_QUEUED", "JOB_STATE_PENDING", "JOB_STATE_RUNNING",
                    "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLING", "JOB_STATE_CANCELLED",
                    "JOB_STATE_PAUSED", "JOB_STATE_EXPIRED", "JOB_STATE_UPDATING",
                    "JOB_STATE_PARTIALLY_SUCCEEDED"})
TERMINAL = frozenset({"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED",
                      "JOB_STATE_PARTIALLY_SUCCEEDED"})
OUTPUT_ONLY = ("name", "state", "createTime", "startTime", "endTime", "updateTime", "error", "webAccessUris",
               "satisfiesPzs", "satisfiesPzi")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: label requirements, https://cloud.google.com/resource-manager/docs/labels-overview#requirements (the page
#: CustomJob.labels links to): up to 64 labels; keys 1-63 characters, values up to 63; lowercase letters,
#: digits, underscores and dashes, international characters allowed; keys start with a lowercase letter or an
#: international character
_MOST_LABELS, _LONGEST_LABEL = 64, 63
_NO_FIELD = re.compile(r'has no field named "([^"]+)" at "([^"]+)"')


class Job:
    """One CustomJob; its JSON changes only under its lock, so snapshots are consistent."""

    def __init__(self, job_id: str, data: JSON, created_ns: int) -> None:
        self.id = job_id
        self.created_ns = created_ns
        self._data = data
        self._lock = threading.Lock()
        self.history: list[str] = [data["state"]]
        self.cancel_requested = threading.Event()
        #: seconds the create call holds its reply before dropping the connection (a ``lost_create_reply``)
        self.lose_reply: float | None = None
        #: the create call is holding its reply right now
        self.reply_held = False

    @property
    def name(self) -> str:
        return str(self._data["name"])

    @property
    def state(self) -> str:
        with self._lock:
            return str(self._data["state"])

    def snapshot(self) -> JSON:
        with self._lock:
            return copy.deepcopy(self._data)

    def spec(self) -> JSON:
        with self._lock:
            return copy.deepcopy(self._data["jobSpec"])

    def advance(self, state: str, now_ns: int, *, start: bool = False) -> bool:
        """Move to a non-terminal ``state`` unless the job is cancelling or over; whether it moved."""
        with self._lock:
            if self._data["state"] in TERMINAL or self._data["state"] == "JOB_STATE_CANCELLING":
                return False
            self._set(state, now_ns, start=start)
            return True

    def finish(self, state: str, now_ns: int, error: JSON | None = None) -> bool:
        """End the job (``endTime``, ``error``); no-op if it already ended."""
        with self._lock:
            if self._data["state"] in TERMINAL:
                return False
            self._set(state, now_ns, end=True, error=error)
            return True

    def request_cancel(self, now_ns: int) -> None:
        """JOB_STATE_CANCELLING now; the runner ends it. FAILED_PRECONDITION once the job is over."""
        with self._lock:
            state = self._data["state"]
            if state in TERMINAL:
                raise ApiError("FAILED_PRECONDITION", f'Cannot cancel CustomJob "{self._data["name"]}": it is '
                                                      f"already in a terminal state ({state}).")
            if state != "JOB_STATE_CANCELLING":
                self._set("JOB_STATE_CANCELLING", now_ns)
        self.cancel_requested.set()

    def _set(self, state: str, now_ns: int, *, start: bool = False, end: bool = False,
             error: JSON | None = None) -> None:
        stamp = format_rfc3339(now_ns, 6)
        self._data["state"] = state
        self._data["updateTime"] = stamp
        if start:
            self._data["startTime"] = stamp
        if end:
            self._data["endTime"] = stamp
        if error is not None:
            self._data["error"] = error
        self.history.append(state)


# ----- validation and rendering -------------------------------------------------------------------------

def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), name)


def parse_custom_job(body: Any) -> JSON:
    """The request body as CustomJob JSON (camelCase, enum names); Google's INVALID_ARGUMENT if the proto
    does not accept it (unknown fields included)."""
    from google.cloud.aiplatform_v1.types import CustomJob
    from google.protobuf import json_format

    if not isinstance(body, dict):
        raise invalid_argument("Invalid JSON payload received. Expected an object for 'custom_job'.")
    message = CustomJob.pb()()
    try:
        json_format.ParseDict(body, message)
    except json_format.ParseError as exc:
        text = str(exc)
        unknown = _NO_FIELD.search(text)
        if unknown:
            where = unknown.group(2).split(".", 1)
            path = "custom_job" + ("." + ".".join(_snake(p) for p in where[1].split(".")) if len(where) > 1 else "")
            detail = f"Invalid JSON payload received. Unknown name \"{unknown.group(1)}\" at '{path}': " \
                     "Cannot find field."
            raise invalid_argument(detail, [(path, detail)]) from None
        detail = f"Invalid JSON payload received. {text.splitlines()[0]}"
        raise invalid_argument(detail, [("custom_job", detail)]) from None
    return json_format.MessageToDict(message)


def check_custom_job(job: JSON) -> None:
    """What Vertex AI requires beyond the proto's shape, reported its way ("List of found errors: ...")."""
    found: list[tuple[str, str]] = []
    name = job.get("displayName", "")
    if not name:
        found.append(("custom_job.display_name", "Required field is not set."))
    elif len(name) > 128:
        found.append(("custom_job.display_name", "The display name must be at most 128 characters long."))
    pools = (job.get("jobSpec") or {}).get("workerPoolSpecs") or []
    if not pools:
        found.append(("custom_job.job_spec.worker_pool_specs", "Required field is not set."))
    for i, pool in enumerate(pools):
        where = f"custom_job.job_spec.worker_pool_specs[{i}]"
        if not pool:
            if i == 0:
                found.append((where, "The first worker pool spec must not be empty."))
            continue  # an empty spec skips a later pool, as Vertex allows
        if not (pool.get("machineSpec") or {}).get("machineType"):
            found.append((f"{where}.machine_spec.machine_type", "Required field is not set."))
        found += machine_spec_errors(pool.get("machineSpec") or {}, f"{where}.machine_spec")
        replicas = int(pool.get("replicaCount") or 0)
        if replicas <= 0:
            found.append((f"{where}.replica_count", "Replica count must be a positive number."))
        elif i == 0 and replicas != 1:
            found.append((f"{where}.replica_count", "The replica count of the first (chief) worker pool must "
                                                    "be 1."))
        container, package = pool.get("containerSpec"), pool.get("pythonPackageSpec")
        if container is None and package is None:
            found.append((f"{where}.task", "Exactly one of container_spec and python_package_spec must be "
                                           "set."))
        elif container is not None and not container.get("imageUri"):
            found.append((f"{where}.container_spec.image_uri", "Required field is not set."))
        elif package is not None and not package.get("executorImageUri"):
            found.append((f"{where}.python_package_spec.executor_image_uri", "Required field is not set."))
    labels = job.get("labels") or {}
    if len(labels) > _MOST_LABELS:
        found.append(("custom_job.labels", f"At most {_MOST_LABELS} labels are allowed."))
    for key, value in labels.items():
        if not (_label_ok(key) and key[:1] and _label_start_ok(key[0])) or not _label_ok(value) \
                or len(key) > _LONGEST_LABEL:
            found.append((f"custom_job.labels[{key}]", "Label keys must start with a lowercase letter and, like "
                                                       "values, hold at most 63 lowercase letters, digits, "
                                                       "underscores and dashes."))
    for i, pool in enumerate(pools):
        for env in ((pool or {}).get("containerSpec") or {}).get("env") or []:
            name = env.get("name", "")
            if not (name.isascii() and name.isidentifier()):  # EnvVar.name "Must be a valid C identifier."
                found.append((f"custom_job.job_spec.worker_pool_specs[{i}].container_spec.env",
                              f'Environment variable name "{name}" must be a valid C identifier.'))
    if found:
        text = "".join(f"{n}.Field: {f}; Message: {m}\t" for n, (f, m) in enumerate(found, 1))
        raise invalid_argument(f"List of found errors:\t{text}", found)


def _label_start_ok(ch: str) -> bool:
    return ("a" <= ch <= "z") or (not ch.isascii() and ch.isalpha() and not ch.isupper())


def _label_ok(text: str) -> bool:
    return len(text) <= _LONGEST_LABEL and all(
        ch in "-_" or ("a" <= ch <= "z") or ch.isdigit() or (not ch.isascii() and ch.isalnum() and not ch.isupper())
        for ch in text)


def render(job: JSON, *, int_enums: bool) -> JSON:
    """The job as the API answers it (through the proto: canonical JSON, enums as asked)."""
    from google.cloud.aiplatform_v1.types import CustomJob
    from google.protobuf import json_format

    message = json_format.ParseDict(job, CustomJob.pb()())
    return json_format.MessageToDict(message, use_integers_for_enums=int_enums)


# ----- the service ------------------------------------------------------------------------------------

class JobService:
    """create / get / list / cancel on the jobs of one project and location.

    ``admit()`` is called before a valid job is made (a quota fault raises there); ``started(job)`` once it
    exists (the emulator starts its runner); ``cancelled(job)`` after a cancel request (wakes the runner).
    """

    def __init__(self, project: str, project_number: str, location: str, clock: Clock,
                 admit: Callable[[], None], started: Callable[[Job], None],
                 cancelled: Callable[[Job], None]) -> None:
        self.project, self.project_number, self.location = project, project_number, location
        self.clock = clock
        self._admit, self._started, self._cancelled = admit, started, cancelled
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        #: seconds a new job stays out of list results (0: lists are consistent; Vertex documents no lag)
        self.list_lag = 0.0

    def check_parent(self, project: str, location: str, permission: str) -> None:
        if project not in (self.project, self.project_number):
            raise ApiError("PERMISSION_DENIED", f"Permission '{permission}' denied on resource "
                                                f"'//aiplatform.googleapis.com/projects/{project}/locations/"
                                                f"{location}' (or it may not exist).")
        if location != self.location:
            raise ApiError("INVALID_ARGUMENT", f'Location "{location}" is not served here: this endpoint is '
                                               f'the regional endpoint of "{self.location}".')

    def create(self, project: str, location: str, body: Any) -> Job:
        self.check_parent(project, location, "aiplatform.customJobs.create")
        parsed = parse_custom_job(body)
        check_custom_job(parsed)
        self._admit()
        now = self.clock.now()
        with self._lock:
            job_id = str(10**18 + secrets.randbelow(8 * 10**18))
            while job_id in self._jobs:
                job_id = str(10**18 + secrets.randbelow(8 * 10**18))
            stamp = format_rfc3339(now, 6)
            data = {k: v for k, v in parsed.items() if k not in OUTPUT_ONLY}
            for pool in data["jobSpec"]["workerPoolSpecs"]:  # Vertex fills in the boot disk it used
                if pool:
                    pool.setdefault("diskSpec", {"bootDiskType": "pd-ssd", "bootDiskSizeGb": 100})
            data.update(name=f"projects/{self.project_number}/locations/{self.location}/customJobs/{job_id}",
                        state="JOB_STATE_QUEUED", createTime=stamp, updateTime=stamp)
            job = Job(job_id, data, now)
            self._jobs[job_id] = job
        self._started(job)
        return job

    def get(self, project: str, location: str, job_id: str, permission: str = "aiplatform.customJobs.get") -> Job:
        self.check_parent(project, location, permission)
        if not job_id.isdigit():
            raise invalid_argument(f'Invalid resource name: "customJobs/{job_id}" (a CustomJob id is a number).')
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise ApiError("NOT_FOUND", "The CustomJob does not exist.")
        return job

    def list(self, project: str, location: str, query: dict[str, str], *, int_enums: bool) -> JSON:
        self.check_parent(project, location, "aiplatform.customJobs.list")
        text = query.get("filter", "")
        match = job_filter(text, STATES)
        try:
            size = int(query.get("pageSize") or DEFAULT_PAGE_SIZE)
        except ValueError:
            raise invalid_argument(f"Invalid value at 'page_size' (TYPE_INT32), \"{query.get('pageSize')}\"")
        size = min(size if size > 0 else DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        after = _read_token(query.get("pageToken"), digest)
        newest = self.clock.now() - int(self.list_lag * 1e9)
        with self._lock:
            jobs = sorted((j for j in self._jobs.values() if j.created_ns <= newest),
                          key=lambda j: (j.created_ns, j.id), reverse=True)
        if after is not None:
            jobs = [j for j in jobs if (j.created_ns, j.id) < after]
        page: list[tuple[Job, JSON]] = []
        for job in jobs:
            snapshot = job.snapshot()
            if not match(snapshot):
                continue
            if len(page) == size:
                last = page[-1][0]
                return {"customJobs": [render(s, int_enums=int_enums) for _, s in page],
                        "nextPageToken": _token((last.created_ns, last.id), digest)}
            page.append((job, snapshot))
        return {"customJobs": [render(s, int_enums=int_enums) for _, s in page]} if page else {}

    def cancel(self, project: str, location: str, job_id: str) -> None:
        job = self.get(project, location, job_id, "aiplatform.customJobs.cancel")
        job.request_cancel(self.clock.now())
        self._cancelled(job)

    def jobs(self) -> list[Job]:
        """Every job, oldest first."""
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: (j.created_ns, j.id))

    def find(self, job_id: str) -> Job:
        """A job by id or full resource name (KeyError if none)."""
        key = job_id.rsplit("/", 1)[-1]
        with self._lock:
            job = self._jobs.get(key)
        if job is None:
            raise KeyError(f"no custom job {job_id!r}")
        return job


def _token(after: tuple[int, str], digest: str) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": list(after), "q": digest}).encode()).decode()


def _read_token(token: str | None, digest: str) -> tuple[int, str] | None:
    if not token:
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token.encode()))
        after = (int(decoded["after"][0]), str(decoded["after"][1]))
        made_for = decoded["q"]
    except (ValueError, KeyError, TypeError, IndexError):
        raise invalid_argument(f"Invalid page token: {token!r}") from None
    if made_for != digest:
        raise invalid_argument("The page token does not belong to this filter: resend the same filter with it.")
    return after
