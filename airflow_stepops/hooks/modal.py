"""The ``modal`` flavor: each step try is one call, with ``spawn``, of a deployed Modal function.

Credentials come from the modal provider's ``ModalHook`` (a ``modal`` connection, default
``modal_default``; without one, Modal's own ``MODAL_TOKEN_ID``/``MODAL_TOKEN_SECRET`` or
``~/.modal.toml``). The function (``runtime/entry.run_step``) is deployed once per set of options
(see ``modal_function``); the bundle is the call's argument and the output its return value, so no
artifact store has to be reachable from Modal and no credentials of ours travel. A spawned call runs on
after the worker hands the wait to the triggerer, which reads its status with the same client.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar, cast

from airflow_stepops.artifacts import store_path
from airflow_stepops.bundle import RUNTIME_DIR, StepIdentity
from airflow_stepops.exceptions import StepOperatorConfigError
from airflow_stepops.hooks import modal_call
from airflow_stepops.hooks.base import (
    JobHandle,
    JobState,
    JobStatus,
    StepOperatorHook,
    StepSpec,
    settings_as,
    with_queue_limit,
)
from airflow_stepops.hooks.modal_function import (
    FUNCTION_NAME,
    app_name,
    deployed_function,
    function_options,
)
from airflow_stepops.prices import Price
from airflow_stepops.runtime import protocol
from airflow_stepops.runtime.protocol import Env
from airflow_stepops.settings.modal import (
    CHECKPOINT_MOUNT,
    MIN_TIMEOUT,
    ModalStepOperatorConfig,
    ModalStepOperatorSettings,
)
from airflow_stepops.settings.step import settings_error

SUCCESS = 1  # modal_proto GenericResult.GENERIC_STATUS_SUCCESS (not imported at module load)
#: what the record of calls keeps of a handle (the rest is rebuilt from the step operator and the try)
RECORDED = ("job_id", "app_name", "function_id", "environment", "spawned_at", "timeout", "gpu", "memory", "spot",
            "on_demand", "instance_type", "step_digest", "spawn_key", "max_queue_seconds")
_CLIENTS: dict[tuple[Any, ...], Any] = {}
_CLIENTS_LOCK = threading.Lock()
#: calls a hook remembers (start times, ended calls) before it starts over
MAX_KEPT = 10_000


class ModalStepOperatorHook(StepOperatorHook):
    """Runs steps as calls of a deployed Modal function."""

    flavor: ClassVar[str] = "modal"
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
        """One client per process and credentials: each opened Modal client stays registered until the
        process ends, so a triggerer must not open one per deferred step."""
        import modal

        try:
            credentials = self._modal_hook.credentials if self._modal_hook is not None else None
            key = (os.getpid(), credentials, modal.config.config.get("server_url"))
            with _CLIENTS_LOCK:
                if key not in _CLIENTS:
                    _CLIENTS[key] = (modal.Client.from_credentials(*credentials) if credentials
                                     else modal.Client.from_env())
                return _CLIENTS[key]
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
    def options(self, spec: StepSpec) -> dict[str, Any]:
        try:
            options = function_options(self.config, settings_as(spec, ModalStepOperatorSettings), spec.resources,
                                       "{}.{}".format(*sys.version_info[:2]), spec.timeout_seconds,
                                       on_demand=spec.on_demand)
        except ValueError as exc:
            raise settings_error("modal", exc) from None
        if spec.cost_seconds:  # what max_cost leaves the attempt (a function of its own: the timeout names the app)
            options["timeout"] = min(options["timeout"], max(spec.cost_seconds, MIN_TIMEOUT))
        return options

    def max_runtime(self, spec: StepSpec) -> int:
        return int(self.options(spec)["timeout"])

    def price(self, spec: StepSpec) -> Price:
        from airflow_stepops.settings.modal_prices import function_price

        return function_price(self.options(spec), self.prices())

    def spot(self, spec: StepSpec) -> bool:
        """Modal preempts functions unless they are ``nonpreemptible`` (https://modal.com/docs/guide/preemption),
        which "is not supported for GPU Functions" (same page): a GPU step has no on-demand capacity to escalate to
        on Modal, so its attempts after a preemption stay where they are, as ``on_preemption="retry"``."""
        return not settings_as(spec, ModalStepOperatorSettings).nonpreemptible and not self.options(spec).get("gpu")

    def _environment(self, spec: StepSpec) -> dict[str, str]:
        refs = {str(i): {"inline": protocol.staged_ref(i)} for i in range(len(spec.refs))}
        return {**self.config.environment_variables, **settings_as(spec, ModalStepOperatorSettings).environment,
                Env.FLAVOR: "modal", Env.REFS: json.dumps(refs),
                # on the checkpoint volume, the same for every try of the task instance: what a preempted try
                # wrote there and Modal committed is what the retry's container mounts (a call argument, so
                # steps share the deployed function)
                Env.CHECKPOINT_DIR: spec.identity.step_path(CHECKPOINT_MOUNT)}

    def build_request(self, spec: StepSpec) -> dict[str, Any]:
        options = self.options(spec)
        return {"app_name": app_name(self.config, options), "function": FUNCTION_NAME,
                "environment": self.environment, "options": options,
                "call": {"method": "spawn", "args": ["<gzip-tar of the step's bundle, entry.py and input artifacts>",
                                                     self._environment(spec)]}}

    def _bundle_archive(self, spec: StepSpec) -> bytes:
        """The bundle, the entry program and the input artifacts as one gzip-tar: the call's first argument."""
        bundle = store_path(spec.bundle_uri)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
            for name in protocol.BUNDLE_FILES:
                self._add(tar, name, (bundle / name).read_bytes())
            self._add(tar, protocol.ENTRY_FILE, (RUNTIME_DIR / protocol.ENTRY_FILE).read_bytes())
            for index, ref in enumerate(spec.refs):
                with ref.open() as source:
                    self._add(tar, protocol.staged_ref(index), source.read())
        return buffer.getvalue()

    @staticmethod
    def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o600
        tar.addfile(info, io.BytesIO(data))

    # ---- the record of calls (Modal has no look-up of calls by anything of ours) ----------------
    @cached_property
    def _calls(self) -> Any:
        """``<app_name>-calls``: step try digest → handle of its call, written right after ``spawn``."""
        import modal

        record = modal.Dict.from_name(f"{self.config.app_name}-calls", environment_name=self.environment,
                                      create_if_missing=True, client=self.client)
        return modal_call.hydrate(record)

    def find_job(self, identity: StepIdentity) -> JobHandle | None:
        """The call of this step try while it still runs, from the record ``submit`` keeps. The task state
        store holds the same handle (Airflow 3.3); this record is what a retry finds on Airflow 3.1/3.2.

        Only the call's ids are taken from the record (anyone in the Modal workspace can write it): where
        the output goes is this step operator's own path for the try. A finished call is not followed: a
        run deleted and started again under the same run id must run its steps again.
        """
        record = self._read_record(identity)
        if not str(record.get("job_id", "")).startswith("fc-"):
            return None
        handle = cast(JobHandle, {**{key: record.get(key) for key in RECORDED}, "flavor": "modal",
                                  "conn_id": self.step_operator_conn_id, "try_number": identity.try_number,
                                  "step_digest": identity.digest,
                                  "output_uri": str(identity.prefix(self.artifact_root()) / "output")})
        status = self.get_status(handle)
        if status.state.terminal:
            self.log.info("Modal call %s of step try %s is over (%s): not re-attaching", handle["job_id"],
                          identity.try_number, status.state.value)
            return None
        return handle

    def _read_record(self, identity: StepIdentity) -> dict[str, Any]:
        """What the record of calls holds for this step try (empty when nothing, or nothing readable)."""
        try:
            text = modal_call.dict_text(self.client, self._calls.object_id, identity.digest)
        except Exception as exc:
            raise self._api_error(exc, f"read the record of calls {self.config.app_name}-calls") from exc
        try:
            record = json.loads(text) if text is not None else None
        except ValueError:
            record = None
        return record if isinstance(record, dict) else {}

    def _record(self, identity: StepIdentity, handle: Mapping[str, Any]) -> None:
        """Write the handle to the record of calls (each RPC bounded), as on Airflow 3.1/3.2 it is the only one."""
        try:
            modal_call.dict_put(self.client, self._calls.object_id, identity.digest,
                                json.dumps({k: handle.get(k) for k in RECORDED}, sort_keys=True))
        except Exception as exc:
            self.log.warning("Could not record Modal call %s in %s-calls (a retry without a task state store "
                             "cannot find it): %s", handle.get("job_id"), self.config.app_name, exc)

    def _spawn_key(self, identity: StepIdentity) -> str:
        """The idempotency key of this try's spawn, recorded before the spawn is sent. Modal has no look-up of
        calls by anything of ours, but it answers a request repeated under the same key with the call the
        first one made: a spawn whose reply was lost, here or in a worker that died, is sent again under the
        key the step try recorded and finds its call instead of making a second one."""
        record = self._read_record(identity)
        key = record.get("spawn_key")
        if record.get("job_id") or not isinstance(key, str) or not key.startswith(f"stepops-{identity.digest}-"):
            key = f"stepops-{identity.digest}-{uuid.uuid4().hex[:12]}"
            self._record(identity, {"spawn_key": key, "step_digest": identity.digest})
        return key

    def _forget(self, handle: JobHandle) -> None:
        """Drop a finished call from the record (best effort)."""
        digest = handle.get("step_digest")
        if not digest or not isinstance(digest, str):
            return
        try:
            modal_call.dict_drop(self.client, self._calls.object_id, digest)
        except Exception as exc:
            self.log.debug("Could not drop %s from the record of calls: %s", handle["job_id"], exc)

    # ---- lifecycle ----------------------------------------------------------------------------
    def submit(self, spec: StepSpec) -> JobHandle:
        request = self.prepare(spec)
        options, name = request["options"], request["app_name"]
        try:
            function = deployed_function(self.client, self.environment, name, options, self.log)
        except Exception as exc:
            raise self._api_error(exc, f"deploy the app {name}") from exc
        archive = self._bundle_archive(spec)
        key = self._spawn_key(spec.identity)
        try:
            call_id = modal_call.spawn(self.client, function, (archive, request["call"]["args"][1]), key)
        except Exception as exc:
            raise self._api_error(exc, f"call {name}.{FUNCTION_NAME}") from exc
        gpu = options.get("gpu")
        self.log.info("Spawned Modal call %s of %s.%s (%s; bundle %d bytes)", call_id, name, FUNCTION_NAME,
                      ", ".join(f"{k}={v}" for k, v in options.items() if k in ("gpu", "cpu", "memory", "timeout",
                                                                               "region", "cloud")) or "defaults",
                      len(archive))
        handle: JobHandle = {
            "flavor": "modal", "job_id": call_id, "app_name": name, "spawned_at": time.time(), "spawn_key": key,
            "function_id": getattr(function, "object_id", None), "environment": self.environment,
            "output_uri": spec.output_uri, "conn_id": self.step_operator_conn_id,
            "try_number": spec.identity.try_number,
            "timeout": options["timeout"], "gpu": gpu if isinstance(gpu, str) or gpu is None else list(gpu),
            "memory": options.get("memory"), "spot": not options.get("nonpreemptible"), "on_demand": spec.on_demand,
            "instance_type": gpu if isinstance(gpu, str) else (", ".join(gpu) if gpu else "cpu"),
            "step_digest": spec.identity.digest}
        # Modal keeps an input waiting while no container of the function can be had: it schedules the function "on
        # each requested GPU type in order" as capacity fluctuates (https://modal.com/docs/examples/gpu_fallbacks)
        # and fails no call for want of capacity, so max_queue_seconds is the trigger's to enforce
        with_queue_limit(handle, spec)
        self._record(spec.identity, handle)
        return handle

    def _details(self, handle: JobHandle) -> dict[str, Any]:
        return {"app_name": handle.get("app_name"), "gpu": handle.get("gpu"), "call_id": handle["job_id"]}

    def get_status(self, handle: JobHandle) -> JobStatus:
        from modal.exception import NotFoundError

        try:
            item, unfinished = modal_call.fetch_result(self.client, handle["job_id"])
            if item is not None:
                return self._ended(item, handle)
            if self._seen_running(handle):
                return self._started(JobStatus(JobState.RUNNING, "running", self._details(handle)), handle)
            info = modal_call.call_info(self.client, handle.get("function_id") or "", handle["job_id"])
        except NotFoundError:
            return JobStatus(JobState.FAILED, f"Modal call {handle['job_id']} does not exist",
                             {"reason": "job_missing"})
        except Exception as exc:
            raise self._api_error(exc, f"read call {handle['job_id']}") from exc
        return self._waiting(unfinished, info, handle)

    def _waiting(self, unfinished: int, info: Any, handle: JobHandle) -> JobStatus:
        """A call without an output: expired only when Modal's retention says it can be (see
        ``modal_call.output_expired``), else queued or running as its pending inputs tell."""
        if modal_call.output_expired(unfinished, info.created_at, handle):
            return self._ended(None, handle)
        return self._started(modal_call.running_status(list(info.pending_inputs.latest), handle,
                                                       self._details(handle)), handle)

    def _ended(self, item: Any, handle: JobHandle) -> JobStatus:
        status = modal_call.finished_status(item, handle, self._details(handle))
        self._forget_running(handle)
        ended: dict[str, bool] = self.__dict__.setdefault("_ended_calls", {})
        if len(ended) > MAX_KEPT:
            ended.clear()
        ended[handle["job_id"]] = True
        return status

    def _lines(self, handle: JobHandle, batches: list[Any], cursor: Any) -> tuple[list[str], Any]:
        """New whole lines; once the call is over and a read brings no new line, an unfinished last line too."""
        lines, cursor = modal_call.log_lines(batches, cursor)
        if not lines and cursor.get("partial") and self.__dict__.get("_ended_calls", {}).get(handle["job_id"]):
            lines += [("[system] " if source == "system" else "") + text
                      for source, text in cursor["partial"].items()]
            cursor["partial"] = {}
        return lines, cursor

    def _seen_running(self, handle: JobHandle) -> bool:
        """A call once running stays so until it ends (a preempted container is replaced by Modal): then
        its output alone tells, and its inputs are not read again."""
        return handle["job_id"] in self.__dict__.get("_running", {})

    def _started(self, status: JobStatus, handle: JobHandle) -> JobStatus:
        """Remember a running call's task and start time, so later polls need only its output."""
        running: dict[str, dict[str, Any]] = self.__dict__.setdefault("_running", {})
        if len(running) > MAX_KEPT:
            running.clear()
        if status.state == JobState.RUNNING:
            known = running.setdefault(handle["job_id"], {})
            for key in ("modal_task_id", "started_at"):
                if status.details.get(key):
                    known.setdefault(key, status.details[key])
            known.setdefault("started_at", time.time())
            status.details.update(known)
        return status

    def _forget_running(self, handle: JobHandle) -> None:
        self.__dict__.get("_running", {}).pop(handle["job_id"], None)

    def cancel(self, handle: JobHandle) -> None:
        modal_call.cancel(self.client, handle["job_id"])
        self.log.info("Cancelled Modal call %s (its container is terminated)", handle["job_id"])

    def collect_output(self, handle: JobHandle) -> None:
        """Unpack the call's return value (the output directory as gzip-tar) into the artifact store, or
        write the step's error that a failed call carried in its exception text. The return value is
        streamed through a temporary file and unpacked member by member: it may be large, and in the
        triggerer many steps share one process."""
        output = store_path(handle["output_uri"])
        if any((output / name).exists() for name in protocol.OUTCOME_FILES):
            return
        with tempfile.TemporaryDirectory(prefix="stepops-modal-") as tmp:
            raw = os.path.join(tmp, "result")
            item = modal_call.save_output(self.client, handle["job_id"], raw)
            if item is None:
                return
            error = modal_call.step_error(item.result)
            if error is not None:
                self._write(output, protocol.ERROR_FILE, io.BytesIO(json.dumps(error).encode()))
            elif item.result.status == SUCCESS:
                with modal_call.open_output(raw, item.data_format) as archive, \
                        tarfile.open(fileobj=archive, mode="r|gz") as tar:
                    finals = []
                    for member in tar:
                        if not member.isfile() or "/" in member.name:
                            continue
                        source = tar.extractfile(member)
                        assert source is not None
                        if member.name in protocol.OUTCOME_FILES:  # they mark completion: last
                            finals.append((member.name, source.read()))
                        else:
                            self._write(output, member.name, source)
                    for name, data in finals:
                        self._write(output, name, io.BytesIO(data))
            else:
                return
        self._forget(handle)

    @staticmethod
    def _write(output: Any, name: str, source: Any) -> None:
        """Write one output file under a temporary name, then rename it: never a half-written file."""
        output.mkdir(parents=True, exist_ok=True)
        partial = output / f".{name}.partial"
        with partial.open("wb") as target:
            shutil.copyfileobj(source, target, 8 << 20)
        partial.rename(output / name)

    def console_url(self, handle: JobHandle) -> str | None:
        return self.config.console_url_template.format(
            call_id=handle["job_id"], app_name=handle.get("app_name") or "", environment=handle.get("environment")
            or "", function_id=handle.get("function_id") or "")

    def cost_url(self, handle: JobHandle) -> str | None:
        return "https://modal.com/settings/usage"

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
            item, unfinished = await modal_call.afetch_result(client, handle["job_id"])
            if item is not None:
                return self._ended(item, handle)
            if self._seen_running(handle):
                return self._started(JobStatus(JobState.RUNNING, "running", self._details(handle)), handle)
            info = await modal_call.acall_info(client, handle.get("function_id") or "", handle["job_id"])
        except NotFoundError:
            return JobStatus(JobState.FAILED, f"Modal call {handle['job_id']} does not exist",
                             {"reason": "job_missing"})
        except Exception as exc:
            raise self._api_error(exc, f"read call {handle['job_id']}") from exc
        return self._waiting(unfinished, info, handle)

    async def aget_statuses(self, handles: list[JobHandle]) -> list[JobStatus | BaseException]:
        """One status read per waiting call: Modal has no list of calls changed since a time."""
        import asyncio

        await self._aclient()
        return list(await asyncio.gather(*(self._astatus(h) for h in handles), return_exceptions=True))

    async def acancel(self, handle: JobHandle) -> None:
        await modal_call.acancel(await self._aclient(), handle["job_id"])
        self.log.info("Cancelled Modal call %s (its container is terminated)", handle["job_id"])

    async def aread_logs(self, handle: JobHandle, cursor: Any) -> tuple[list[str], Any]:
        client = await self._aclient()
        cursor = dict(cursor or {})
        batches, cursor["app_id"] = await modal_call.alog_batches(client, handle["job_id"], cursor.get("app_id", ""),
                                                                  cursor.get("entry_id", ""))
        return self._lines(handle, batches, cursor)
