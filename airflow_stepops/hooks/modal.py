"""The ``modal`` flavor: each step try is one call, with ``spawn``, of a deployed Modal function.

Credentials come from the modal provider's ``ModalHook`` (a ``modal`` connection, default
``modal_default``; without one, Modal's own ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET`` or
``~/.modal.toml``). The function (``runtime/modal_runner.run_step``) is deployed once per set of options
(see ``modal_function``); the bundle is the call's argument and the output its return value, so no
artifact store has to be reachable from Modal and no credentials of ours travel. A spawned call runs on
after the worker hands the wait to the triggerer, which reads its status with the same client.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import time
from functools import cached_property
from typing import Any, ClassVar

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks import modal_call
from airflow_stepops.hooks.base import JobHandle, JobState, JobStatus, StepOperatorHook, StepSpec
from airflow_stepops.hooks.modal_function import (
    ENTRY_SOURCE,
    FUNCTION_NAME,
    app_name,
    deployed_function,
    function_options,
)
from airflow_stepops.settings.modal import ModalStepOperatorConfig, ModalStepOperatorSettings

BUNDLE_FILES = ("payload.pkl", "bootstrap.py", "meta.json")
#: calls a hook remembers (FunctionCall objects, start times) before it starts over
MAX_KEPT = 10_000


class ModalStepOperatorHook(StepOperatorHook):
    """Runs steps as calls of a deployed Modal function."""

    flavor: ClassVar[str] = "modal"
    conn_type = "stepops_modal"
    default_conn_name = "stepops_modal_default"
    hook_name = "Step operator: Modal function call"
    default_poll_interval: ClassVar[float] = 10.0
    min_poll_interval: ClassVar[float] = 1.0

    config: ModalStepOperatorConfig  # type: ignore[assignment]

    # ---- the client ---------------------------------------------------------------------------
    @cached_property
    def _modal_hook(self) -> Any:
        """The modal provider's hook (None: no provider, or no connection id: Modal's own credentials)."""
        if not self.config.modal_conn_id:
            return None
        try:
            from airflow.providers.modal.hooks.modal import ModalHook
        except ImportError:
            if self.config.modal_conn_id != "modal_default":
                raise StepOperatorConfigError(
                    f"modal_conn_id: {self.config.modal_conn_id!r} needs apache-airflow-providers-modal "
                    "(pip install 'airflow-stepops[modal]'), which reads modal connections") from None
            return None
        return ModalHook(modal_conn_id=self.config.modal_conn_id)

    @cached_property
    def client(self) -> Any:
        import modal

        try:
            return self._modal_hook.client if self._modal_hook is not None else modal.Client.from_env()
        except StepOperatorConfigError:
            raise
        except Exception as exc:
            raise StepOperatorConfigError(f"modal_conn_id: cannot build a Modal client from "
                                          f"{self.config.credentials_source()}: {exc}") from None

    @cached_property
    def environment(self) -> str | None:
        if self.config.environment:
            return self.config.environment
        hook = self._modal_hook
        return hook.environment_name if hook is not None else None

    def _api_error(self, exc: Exception, action: str) -> Exception:
        from modal.exception import AuthError, InvalidError, NotFoundError

        if isinstance(exc, (AuthError, InvalidError, NotFoundError)):
            return StepOperatorConfigError(f"Modal refused to {action} ({self.config.credentials_source()}, "
                                           f"environment {self.environment or 'default'}): "
                                           f"{type(exc).__name__}: {exc}")
        return exc

    # ---- the request --------------------------------------------------------------------------
    def _settings(self, spec: StepSpec) -> ModalStepOperatorSettings:
        if not isinstance(spec.settings, ModalStepOperatorSettings):
            raise StepOperatorConfigError(f"settings: expected ModalStepOperatorSettings, got "
                                          f"{type(spec.settings).__name__}")
        return spec.settings

    def options(self, spec: StepSpec) -> dict[str, Any]:
        try:
            return function_options(self.config, self._settings(spec), spec.resources,
                                    "{}.{}".format(*sys.version_info[:2]))
        except ValueError as exc:
            raise StepOperatorConfigError(f"settings['step_operator.modal'].{exc}") from None

    def _environment(self, spec: StepSpec) -> dict[str, str]:
        refs = {str(i): {"inline": f"refs/{i}.pkl"} for i in range(len(spec.refs))}
        return {**self.config.environment_variables, **self._settings(spec).environment,
                "STEPOPS_FLAVOR": "modal", "STEPOPS_REFS": json.dumps(refs)}

    def render(self, spec: StepSpec) -> dict[str, Any]:
        options = self.options(spec)
        return {"app_name": app_name(self.config, options), "function": FUNCTION_NAME,
                "environment": self.environment, "options": options,
                "call": {"method": "spawn", "args": ["<gzip-tar of the step's bundle and input artifacts>",
                                                     "<source of airflow_stepops/runtime/pod_entry.py>",
                                                     self._environment(spec)]}}

    def _bundle_archive(self, spec: StepSpec) -> bytes:
        """The bundle and input artifacts as one gzip-tar: the call's first argument."""
        bundle = store_path(spec.bundle_uri)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for name in BUNDLE_FILES:
                self._add(tar, name, (bundle / name).read_bytes())
            for index, ref in enumerate(spec.refs):
                with ref.open() as source:
                    self._add(tar, f"refs/{index}.pkl", source.read())
        return buffer.getvalue()

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o600
        tar.addfile(info, io.BytesIO(data))

    # ---- lifecycle ----------------------------------------------------------------------------
    # ---- the record of calls (Modal has no look-up of calls by anything of ours) ----------------
    @cached_property
    def _calls(self) -> Any:
        """``<app_name>-calls``: step try digest → handle of its call, written right after ``spawn``."""
        import modal

        record = modal.Dict.from_name(f"{self.config.app_name}-calls", environment_name=self.environment,
                                      create_if_missing=True, client=self.client)
        record.hydrate()
        return record

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        """The call of this step try, from the record ``submit`` keeps. The task state store holds the same
        handle (Airflow 3.3); this record is what a retry finds on Airflow 3.1/3.2."""
        try:
            text = modal_call.dict_text(self.client, self._calls.object_id, identity.digest)
        except Exception as exc:
            raise self._api_error(exc, f"read the record of calls {self.config.app_name}-calls") from exc
        if text is None:
            return None
        try:
            handle = json.loads(text)
        except ValueError:
            return None
        if not isinstance(handle, dict) or not str(handle.get("job_id", "")).startswith("fc-"):
            return None
        return handle

    def _record(self, identity: StepIdentity, handle: JobHandle) -> None:
        try:
            self._calls.put(identity.digest, json.dumps(handle, sort_keys=True))
        except Exception as exc:  # the task state store has the handle too: say so, do not fail the step
            self.log.warning("Could not record Modal call %s in %s-calls (a retry on Airflow < 3.3 cannot find "
                             "it): %s", handle["job_id"], self.config.app_name, exc)

    def submit(self, spec: StepSpec) -> JobHandle:
        options = self.options(spec)
        name = app_name(self.config, options)
        try:
            function = deployed_function(self.client, self.environment, name, options, self.log)
        except Exception as exc:
            raise self._api_error(exc, f"deploy the app {name}") from exc
        archive = self._bundle_archive(spec)
        try:
            call = function.spawn(archive, ENTRY_SOURCE.read_text(), self._environment(spec))
        except Exception as exc:
            raise self._api_error(exc, f"call {name}.{FUNCTION_NAME}") from exc
        gpu = options.get("gpu")
        self.log.info("Spawned Modal call %s of %s.%s (%s; bundle %d bytes)", call.object_id, name, FUNCTION_NAME,
                      ", ".join(f"{k}={v}" for k, v in options.items() if k in ("gpu", "cpu", "memory", "timeout",
                                                                               "region", "cloud")) or "defaults",
                      len(archive))
        handle = {"flavor": "modal", "job_id": call.object_id, "app_name": name, "spawned_at": time.time(),
                  "function_id": getattr(function, "object_id", None), "environment": self.environment,
                  "output_uri": spec.output_uri, "conn_id": self.step_operator_conn_id,
                  "try_number": spec.identity.try_number, "timeout": options["timeout"],
                  "gpu": gpu if isinstance(gpu, str) or gpu is None else list(gpu), "memory": options.get("memory"),
                  "spot": not options.get("nonpreemptible"),
                  "instance_type": gpu if isinstance(gpu, str) else (", ".join(gpu) if gpu else "cpu")}
        self._record(spec.identity, handle)
        return handle

    def _call(self, handle: JobHandle) -> Any:
        """The call's ``FunctionCall``, kept per hook: it hydrates itself (one RPC) on first use."""
        import modal

        calls: dict[str, Any] = self.__dict__.setdefault("_calls_by_id", {})
        if len(calls) > MAX_KEPT:  # a triggerer's hook lives long: forget old calls (re-hydrated if needed)
            calls.clear()
        if handle["job_id"] not in calls:
            calls[handle["job_id"]] = modal.FunctionCall.from_id(handle["job_id"], client=self.client)
        return calls[handle["job_id"]]

    def _details(self, handle: JobHandle) -> dict[str, Any]:
        return {"app_name": handle.get("app_name"), "gpu": handle.get("gpu"), "call_id": handle["job_id"]}

    def get_status(self, handle: JobHandle) -> JobStatus:
        from modal.exception import NotFoundError

        try:
            finished = modal_call.fetch_result(self.client, handle["job_id"])
            if finished is not None:
                return self._started(modal_call.finished_status(finished[0], handle, self._details(handle)), handle)
            if self._seen_running(handle):
                return self._started(JobStatus(JobState.RUNNING, "running", self._details(handle)), handle)
            inputs = self._call(handle).get_call_graph()
        except NotFoundError:
            return JobStatus(JobState.FAILED, f"Modal call {handle['job_id']} does not exist",
                             {"reason": "job_missing"})
        except Exception as exc:
            raise self._api_error(exc, f"read call {handle['job_id']}") from exc
        return self._started(modal_call.running_status(inputs, handle, self._details(handle)), handle)

    def _seen_running(self, handle: JobHandle) -> bool:
        """A call once running stays so until it ends (a preempted container is replaced by Modal): then
        its output alone tells, and the call graph is not read again."""
        return handle["job_id"] in self.__dict__.get("_started_at", {})

    def _started(self, status: JobStatus, handle: JobHandle) -> JobStatus:
        """Modal does not report when a call's container started: the first poll that saw it running (a
        call that finished between two polls has none)."""
        seen: dict[str, float] = self.__dict__.setdefault("_started_at", {})
        tasks: dict[str, str] = self.__dict__.setdefault("_task_ids", {})
        if len(seen) > MAX_KEPT:
            seen.clear()
            tasks.clear()
        if status.state == JobState.RUNNING:
            seen.setdefault(handle["job_id"], time.time())
            if status.details.get("task_id"):
                tasks[handle["job_id"]] = status.details["task_id"]
        if handle["job_id"] in seen:
            status.details["started_at"] = seen[handle["job_id"]]
        if handle["job_id"] in tasks:
            status.details.setdefault("task_id", tasks[handle["job_id"]])
        return status

    def cancel(self, handle: JobHandle) -> None:
        self._call(handle).cancel(terminate_containers=True)
        self.log.info("Cancelled Modal call %s (its container is terminated)", handle["job_id"])

    def collect_output(self, handle: JobHandle) -> None:
        """Unpack the call's return value (the output directory as gzip-tar) into the artifact store, or
        write the step's error that a failed call carried in its exception text."""
        output = store_path(handle["output_uri"])
        if (output / "result.json").exists() or (output / "error.json").exists():
            return
        finished = modal_call.fetch_result(self.client, handle["job_id"])
        if finished is None:
            return
        result, data = finished
        error = modal_call.step_error(result)
        if data is None and error is None:
            return
        output.mkdir(parents=True, exist_ok=True)
        if error is not None:
            (output / "error.json").write_text(json.dumps(error))
            return
        assert data is not None
        with tarfile.open(fileobj=io.BytesIO(modal_call.output_bytes(data)), mode="r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and "/" not in m.name),
                             key=lambda m: m.name in ("result.json", "error.json"))  # they mark completion
            for member in members:
                source = tar.extractfile(member)
                assert source is not None
                (output / member.name).write_bytes(source.read())

    def read_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        entries = list(self._call(handle).logs.fetch(since=modal_call.since(cursor, handle)))
        return modal_call.log_lines(entries, cursor)

    def console_url(self, handle: JobHandle) -> str | None:
        return self.config.console_url_template.format(
            call_id=handle["job_id"], app_name=handle.get("app_name") or "", environment=handle.get("environment")
            or "", function_id=handle.get("function_id") or "")

    # ---- async (triggerer) --------------------------------------------------------------------
    async def _aclient(self) -> Any:
        """The client, built in a thread: in the triggerer, reading the modal connection on the event loop
        fails outside a trigger's own ``run()``."""
        import asyncio

        if "client" not in self.__dict__:
            await asyncio.to_thread(lambda: (self.client, self.environment))
        return self.client

    async def _astatus(self, handle: JobHandle) -> JobStatus:
        from modal.exception import NotFoundError

        client = await self._aclient()
        try:
            finished = await modal_call.afetch_result(client, handle["job_id"])
            if finished is not None:
                return self._started(modal_call.finished_status(finished[0], handle, self._details(handle)), handle)
            if self._seen_running(handle):
                return self._started(JobStatus(JobState.RUNNING, "running", self._details(handle)), handle)
            inputs = await self._call(handle).get_call_graph.aio()
        except NotFoundError:
            return JobStatus(JobState.FAILED, f"Modal call {handle['job_id']} does not exist",
                             {"reason": "job_missing"})
        return self._started(modal_call.running_status(inputs, handle, self._details(handle)), handle)

    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        """One status read per waiting call: Modal has no list of calls changed since a time."""
        import asyncio

        await self._aclient()
        return list(await asyncio.gather(*(self._astatus(h) for h in handles), return_exceptions=True))

    async def acancel(self, handle: JobHandle) -> None:
        await self._aclient()
        await self._call(handle).cancel.aio(terminate_containers=True)
        self.log.info("Cancelled Modal call %s (its container is terminated)", handle["job_id"])

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        await self._aclient()
        call = self._call(handle)
        entries = [entry async for entry in call.logs.fetch.aio(since=modal_call.since(cursor, handle))]
        return modal_call.log_lines(entries, cursor)
