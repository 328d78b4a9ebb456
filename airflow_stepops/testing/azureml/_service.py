"""``Service``: the emulated workspace's job operations, independent of HTTP.

Creating a job validates its body (``_validate``), applies injected faults (``_faults``), stores a
``Job`` and starts its ``JobRunner``; a second PUT of the same name answers the existing job when
only updatable fields differ, and the service's "already exists" 400 otherwise.
"""

from __future__ import annotations

import base64
import threading
from typing import Any

from airflow_stepops.testing.azureml._faults import (
    JSON,
    ApiError,
    FaultRule,
    bad_request,
    immutable_job,
    not_found,
    quota_error,
)
from airflow_stepops.testing.azureml._jobs import TERMINAL, Job
from airflow_stepops.testing.azureml._runner import JobRunner, RunContext
from airflow_stepops.testing.azureml._validate import immutable_changes, validate_job
from airflow_stepops.testing.azureml._workspace import Workspace

LIST_VIEW_TYPES = {"activeonly": "ActiveOnly", "archivedonly": "ArchivedOnly", "all": "All"}


class Service:
    """Jobs of the workspace: the operations behind the REST routes, and the emulator's inspection."""

    def __init__(self, workspace: Workspace, ctx: RunContext) -> None:
        self.workspace = workspace
        self.ctx = ctx
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}
        self.runners: dict[str, JobRunner] = {}
        self.rules: list[FaultRule] = []
        self.operations: dict[str, str] = {}  # cancel operation id -> job name
        self.closed = False

    # ----- create / update --------------------------------------------------------------------------

    def put_job(self, name: str, body: Any) -> tuple[JSON, int]:
        """PUT a job: (resource, 201) when created, (resource, 200) for an allowed update."""
        ws = self.workspace
        props = validate_job(name, body, locate=self.ctx.storage.locate, compute_exists=ws.compute_exists,
                             environment_exists=ws.environment_exists, workspace_path=ws.path)
        if props.get("codeId"):
            raise bad_request("codeId: the emulator runs no code assets (the SDK uploads them straight to the "
                              "storage account, which cannot be Azurite); ship code through inputs instead.",
                              target="codeId")
        with self.lock:
            if self.closed:
                raise ApiError(503, "ServiceUnavailable", "The emulator is shutting down.")
            existing = self.jobs.get(name)
            if existing is not None:
                changed = immutable_changes(existing.request, props)
                if changed:
                    raise immutable_job(changed)
                existing.update_mutable(props)
                return existing.arm(), 200
            compute_name = ws.compute_name(props["computeId"]) if props.get("computeId") else None
            spec = ws.compute_spec(compute_name) if compute_name else None
            tier = (props.get("queueSettings") or {}).get("jobTier")
            spot = tier == "Spot" or bool(spec and spec.low_priority)
            # a preemption waiting for new jobs goes to preemptible capacity only (Spot tier, low-priority nodes):
            # low-priority VMs "might be preempted at any time", dedicated ones are not
            # (https://learn.microsoft.com/en-us/azure/machine-learning/how-to-use-low-priority-batch), and only the
            # Spot job tier runs serverless jobs on such capacity; one given to a job by name strikes it all the
            # same (a dedicated node is lost: NodeFailure)
            faults = [rule.fault for rule in self.rules
                      if (spot or rule.fault.kind != "preemption" or rule.job == name) and rule.take(name)]
            quota = next((f for f in faults if f.kind == "quota_exceeded"), None)
            if quota is not None:
                vm_size = (props["resources"].get("instanceType") or (spec.vm_size if spec else "STANDARD_DS3_V2"))
                raise quota_error(vm_size, props["resources"]["instanceCount"], quota.quota, quota.status_code)
            job = Job(name, props, workspace_path=ws.path, location=ws.config.location,
                      run_number=len(self.jobs) + 1, spot=spot, compute_name=compute_name)
            runner = JobRunner(job, faults, self.ctx, ws.environment_image(props.get("environmentId") or ""))
            self.jobs[name] = job
            self.runners[name] = runner
            self.operations[job.cancel_operation] = name
            created = job.arm()  # as the service answers a create: NotStarted
        runner.start()
        return created, 201

    # ----- reads ------------------------------------------------------------------------------------

    def job(self, name: str) -> Job:
        with self.lock:
            found = self.jobs.get(name)
        if found is None:
            raise not_found("Job", name)
        return found

    def runner(self, name: str) -> JobRunner:
        with self.lock:
            found = self.runners.get(name)
        if found is None:
            raise KeyError(f"no job {name!r}")
        return found

    def list_jobs(self, query: Any) -> tuple[list[JSON], int | None]:
        """One page of jobs, newest first: (resources, offset of the next page or None)."""
        view = LIST_VIEW_TYPES.get(str(query.get("listViewType") or "ActiveOnly").lower())
        if view is None:
            raise bad_request(f"listViewType {query.get('listViewType')!r} is not ActiveOnly, ArchivedOnly or All.",
                              target="listViewType")
        tag = query.get("tag")
        job_type = query.get("jobType")
        token = query.get("$skipToken") or query.get("$skip")
        offset = _decode_token(token) if token else 0
        with self.lock:
            jobs = list(self.jobs.values())
        jobs.sort(key=lambda j: (j.created, j.run_number), reverse=True)
        selected = []
        for job in jobs:
            with job.lock:
                archived = bool(job.request.get("isArchived"))
                tags = dict(job.request.get("tags") or {})
                jtype = job.request.get("jobType")
            if (view == "ActiveOnly" and archived) or (view == "ArchivedOnly" and not archived):
                continue
            if job_type and str(job_type).lower() != str(jtype).lower():
                continue
            if tag and not _tag_matches(str(tag), tags):
                continue
            selected.append(job)
        size = self.ctx.config.page_size
        page = selected[offset: offset + size]
        following = offset + size if offset + size < len(selected) else None
        return [j.arm() for j in page], following

    # ----- cancel -----------------------------------------------------------------------------------

    def cancel(self, name: str) -> Job:
        job = self.job(name)
        if job.request_cancel():
            self.runner(name).wake()
        return job

    def operation_done(self, operation: str) -> bool:
        with self.lock:
            name = self.operations.get(operation)
        if name is None:
            raise ApiError(404, "NotFound", f"Operation {operation} was not found.")
        job = self.job(name)
        with job.lock:
            return job.status in TERMINAL

    # ----- faults and lifecycle ---------------------------------------------------------------------

    def add_rule(self, rule: FaultRule) -> None:
        with self.lock:
            self.rules.append(rule)

    def shutdown(self) -> None:
        with self.lock:
            self.closed = True
            runners = list(self.runners.values())
        for runner in runners:
            runner.shutdown()


def encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        padded = token + "=" * (-len(token) % 4)
        kind, _, value = base64.urlsafe_b64decode(padded.encode()).decode().partition(":")
        if kind != "offset":
            raise ValueError(token)
        return max(int(value), 0)
    except Exception:
        raise bad_request(f"The skip token {token!r} is invalid.", target="$skipToken")


def _tag_matches(tag: str, tags: dict[str, str]) -> bool:
    """``tag=key`` keeps jobs with that tag; ``tag=key=value`` those whose tag has that value."""
    key, sep, value = tag.partition("=")
    if key not in tags:
        return False
    return not sep or tags[key] == value
