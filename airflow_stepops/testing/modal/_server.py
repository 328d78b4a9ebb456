"""The grpclib servicer: the ``modal.client.ModalClient`` RPCs the client calls to deploy a function, spawn
it, read its result, cancel it and read its logs.

Every request is recorded, must carry the emulator's token (``x-modal-token-id`` / ``x-modal-token-secret``
metadata, which ``Client.from_credentials`` / ``from_env`` send; else UNAUTHENTICATED, which the client
raises as ``AuthError``) and may be failed by a ``RequestFault``. The generated ``ModalClientBase`` declares
every RPC of Modal's API abstract; those not implemented here answer UNIMPLEMENTED naming the method (the
client raises ``UnimplementedError``).
"""

from __future__ import annotations

import abc
import asyncio
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

import grpclib.const
from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Stream
from modal_proto import api_grpc, api_pb2

from airflow_stepops.testing._kit import take_request_fault
from airflow_stepops.testing.modal._blobs import BlobStore
from airflow_stepops.testing.modal._calls import TERMINAL, Call, CallStore
from airflow_stepops.testing.modal._dicts import DictStore
from airflow_stepops.testing.modal._faults import RequestFault
from airflow_stepops.testing.modal._ids import new_id
from airflow_stepops.testing.modal._limits import OUTPUT_RETENTION_SECS
from airflow_stepops.testing.modal._logs import LogQuery, LogStore, batches
from airflow_stepops.testing.modal._objects import IMAGE_BUILDER_VERSION, Registry

GR = api_pb2.GenericResult
OCT = api_pb2.ObjectCreationType
_POLL = 0.05
MAX_WAIT = 55.0  # the client's OUTPUTS_TIMEOUT: the longest a long poll is asked to wait


class ModalServicer(api_grpc.ModalClientBase):
    """What the emulator answers; state lives in the stores it is given."""

    def __init__(self, registry: Registry, calls: CallStore, blobs: BlobStore, logs: LogStore, *,
                 token_id: str, token_secret: str, on_call: Callable[[Call], None],
                 on_cancel: Callable[[Call], None], console_url: str = "http://127.0.0.1") -> None:
        self.registry, self.calls, self.blobs, self.logs = registry, calls, blobs, logs
        self.token_id, self.token_secret = token_id, token_secret
        self.on_call, self.on_cancel = on_call, on_cancel
        self.console_url = console_url
        self.lock = threading.Lock()
        self.records: deque[dict[str, Any]] = deque(maxlen=100_000)  # a long session keeps the latest
        self.faults: list[RequestFault] = []
        #: seconds a queued input is not yet counted as unfinished (nor listed as pending) after its call was
        #: made: a call just spawned then shows what an expired one shows (no output, no unfinished input)
        self.uncounted_queue_seconds = 0.0
        self.publish_seconds = 0.0  # how long a deploy's AppPublish takes (see ModalEmulator.publish_seconds)
        self._environment_ids: dict[str, str] = {}
        self.dicts = DictStore()
        self._mapped: dict[str, api_pb2.FunctionMapResponse] = {}  # x-idempotency-key -> the answer it got

    # ----- every request ------------------------------------------------------------------------------

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {path: handler._replace(func=self._guarded(path.rsplit("/", 1)[-1], handler.func))
                for path, handler in super().__mapping__().items()}

    def _guarded(self, method: str, func: Callable[[Stream[Any, Any]], Any]) -> Callable[[Stream[Any, Any]], Any]:
        async def handle(stream: Stream[Any, Any]) -> None:
            record: dict[str, Any] = {"method": method, "time": time.time(), "status": "OK"}
            with self.lock:
                self.records.append(record)
            try:
                self._authenticate(stream)
                with self.lock:
                    fault = take_request_fault(self.faults, lambda f: f.method in (None, method))
                if fault is not None and fault.lose_reply:
                    record["status"] = "LOST"
                    await func(cast("Stream[Any, Any]", _Unanswered(stream)))
                    await asyncio.sleep(MAX_WAIT)  # cancelled when the client gives up on the attempt
                    return
                if fault is not None:
                    raise GRPCError(fault.status, fault.message or f"{fault.status.name} (injected fault)")
                await func(stream)
            except GRPCError as exc:
                record["status"] = exc.status.name
                raise
            except Exception:  # grpclib answers UNKNOWN
                record["status"] = Status.UNKNOWN.name
                raise
        return handle

    def _authenticate(self, stream: Stream[Any, Any]) -> None:
        metadata = stream.metadata or {}
        token_id, token_secret = metadata.get("x-modal-token-id"), metadata.get("x-modal-token-secret")
        if token_id is None and token_secret is None:
            raise GRPCError(Status.UNAUTHENTICATED, "Token missing. Could not authenticate client.")
        if token_id != self.token_id or token_secret != self.token_secret:
            raise GRPCError(Status.UNAUTHENTICATED, "Token ID or token secret is invalid.")

    # ----- client, environments, apps ------------------------------------------------------------------

    async def ClientHello(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_message(api_pb2.ClientHelloResponse())

    async def EnvironmentGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        name = request.deployment_name or "main"
        if request.object_creation_type == OCT.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
            with self.registry.lock:
                self.registry.environments.add(name)
        name = self.registry.environment(name)
        environment_id = self._environment_ids.setdefault(name, new_id("en"))
        await stream.send_message(api_pb2.EnvironmentGetOrCreateResponse(
            environment_id=environment_id,
            metadata=api_pb2.EnvironmentMetadata(name=name, settings=api_pb2.EnvironmentSettings(
                image_builder_version=IMAGE_BUILDER_VERSION, webhook_suffix="modal.run"))))

    def _app_urls(self, app_id: str) -> dict[str, str]:
        return {"app_page_url": f"{self.console_url}/apps/{app_id}",
                "app_logs_url": f"{self.console_url}/apps/{app_id}/logs"}

    async def AppCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        app = self.registry.create_app(request.description, request.environment_name, request.app_state)
        await stream.send_message(api_pb2.AppCreateResponse(app_id=app.id, **self._app_urls(app.id)))

    async def AppGetByDeploymentName(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        app = self.registry.deployed_app(request.name, request.environment_name)
        await stream.send_message(api_pb2.AppGetByDeploymentNameResponse(
            app_id=app.id if app else "", environment_name=self.registry.environment(request.environment_name)))

    async def AppGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        app = self.registry.deployed_app(request.app_name, request.environment_name)
        if app is None:
            if request.object_creation_type != OCT.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                raise GRPCError(Status.NOT_FOUND, f"App '{request.app_name}' not found")
            app = self.registry.create_app(request.app_name, request.environment_name, api_pb2.APP_STATE_DEPLOYED)
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app.id))

    async def AppGetLayout(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        app = self.registry.app(request.app_id)
        layout = api_pb2.AppLayout(function_ids=app.function_ids)
        for function_id in app.function_ids.values():
            fdef = self.registry.function(function_id)
            layout.objects.append(api_pb2.Object(object_id=function_id, function_handle_metadata=fdef.handle))
        await stream.send_message(api_pb2.AppGetLayoutResponse(app_layout=layout))

    async def AppHeartbeat(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        self.registry.app(request.app_id)
        await stream.send_message(empty_pb2.Empty())

    async def AppClientDisconnect(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        app = self.registry.app(request.app_id)
        with self.registry.lock:  # as Modal: stops an app still initializing or ephemeral; else a no-op
            if app.state in (api_pb2.APP_STATE_INITIALIZING, api_pb2.APP_STATE_EPHEMERAL):
                app.state = api_pb2.APP_STATE_STOPPED
        await stream.send_message(empty_pb2.Empty())

    async def AppPublish(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        await asyncio.sleep(self.publish_seconds)
        app = self.registry.publish(request)
        await stream.send_message(api_pb2.AppPublishResponse(
            url=f"{self.console_url}/apps/{app.id}", deployed_at=app.deployed_at or time.time()))

    # ----- images, secrets, volumes, mounts ---------------------------------------------------------------

    async def ImageGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        for base in request.image.base_images:
            self.registry.image(base.image_id)
        image = self.registry.add_image(request.image, request.builder_version)
        # no result yet: the client joins the "build" (ImageJoinStreaming), which succeeds at once
        await stream.send_message(api_pb2.ImageGetOrCreateResponse(image_id=image.id))

    async def ImageJoinStreaming(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        image = self.registry.image(request.image_id)
        metadata = api_pb2.ImageMetadata(image_builder_version=image.builder_version, workdir="/root",
                                         python_version_info=self.registry.python_version(image.id)
                                         or ".".join(str(v) for v in sys.version_info[:3]))
        await stream.send_message(api_pb2.ImageJoinStreamingResponse(
            result=GR(status=GR.GENERIC_STATUS_SUCCESS), metadata=metadata, entry_id="1", eof=True))

    async def SecretGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        kind = request.object_creation_type
        env = dict(request.env_dict)
        if kind in (OCT.OBJECT_CREATION_TYPE_EPHEMERAL, OCT.OBJECT_CREATION_TYPE_ANONYMOUS_OWNED_BY_APP):
            secret = self.registry.add_secret(None, env, request.environment_name)
        elif kind in (OCT.OBJECT_CREATION_TYPE_CREATE_IF_MISSING, OCT.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS,
                      OCT.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS):
            environment = self.registry.environment(request.environment_name)
            existing = self.registry.named_secret(request.deployment_name, environment)
            if existing is not None and kind == OCT.OBJECT_CREATION_TYPE_CREATE_IF_MISSING:
                secret = existing
            else:
                secret = self.registry.add_secret(
                    request.deployment_name, env, environment,
                    overwrite=kind == OCT.OBJECT_CREATION_TYPE_CREATE_OVERWRITE_IF_EXISTS)
        else:
            environment = self.registry.environment(request.environment_name)
            found = self.registry.named_secret(request.deployment_name, environment)
            if found is None:
                raise GRPCError(Status.NOT_FOUND,
                                f"Secret '{request.deployment_name}' not found in environment '{environment}'")
            missing = sorted(set(request.required_keys) - set(found.env))
            if missing:
                raise GRPCError(Status.NOT_FOUND, f"Secret '{request.deployment_name}' is missing the required "
                                                  f"key(s): {', '.join(missing)}")
            secret = found
        await stream.send_message(api_pb2.SecretGetOrCreateResponse(
            secret_id=secret.id, metadata=api_pb2.SecretMetadata(name=secret.name or "", keys=sorted(secret.env),
                                                                 environment_name=secret.environment)))

    async def VolumeGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        create = request.object_creation_type in (OCT.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
                                                  OCT.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS)
        volume = self.registry.volume(request.deployment_name, request.environment_name, create)
        version = request.version or api_pb2.VOLUME_FS_VERSION_V1
        await stream.send_message(api_pb2.VolumeGetOrCreateResponse(
            volume_id=volume.id, version=version, metadata=api_pb2.VolumeMetadata(name=volume.name, version=version)))

    async def DictGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        create = request.object_creation_type in (OCT.OBJECT_CREATION_TYPE_CREATE_IF_MISSING,
                                                  OCT.OBJECT_CREATION_TYPE_CREATE_FAIL_IF_EXISTS)
        environment = self.registry.environment(request.environment_name)
        found = self.dicts.get_or_create(request.deployment_name, environment, create)
        await stream.send_message(api_pb2.DictGetOrCreateResponse(
            dict_id=found.id, metadata=api_pb2.DictMetadata(name=found.name)))

    async def DictUpdate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        created = self.dicts.update(request.dict_id, [(e.key, e.value) for e in request.updates],
                                    request.if_not_exists)
        await stream.send_message(api_pb2.DictUpdateResponse(created=created))

    async def DictGet(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        value = self.dicts.get(request.dict_id, request.key)
        await stream.send_message(api_pb2.DictGetResponse(found=value is not None, value=value or b""))

    async def DictPop(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        value = self.dicts.pop(request.dict_id, request.key)
        await stream.send_message(api_pb2.DictPopResponse(found=value is not None, value=value or b""))

    async def MountGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        mount_id = self.registry.add_mount(request.deployment_name)
        await stream.send_message(api_pb2.MountGetOrCreateResponse(
            mount_id=mount_id, handle_metadata=api_pb2.MountHandleMetadata()))

    # ----- functions ------------------------------------------------------------------------------------

    async def FunctionPrecreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        fdef = self.registry.precreate(request)
        await stream.send_message(api_pb2.FunctionPrecreateResponse(function_id=fdef.id, handle_metadata=fdef.handle))

    async def FunctionCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        fdef = self.registry.create_function(request)
        await stream.send_message(api_pb2.FunctionCreateResponse(
            function_id=fdef.id, function=fdef.ranked[0], handle_metadata=fdef.handle,
            function_data=self.registry.function_data(fdef)))

    async def FunctionGet(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        fdef = self.registry.lookup_function(request.app_name, request.object_tag, request.environment_name)
        await stream.send_message(api_pb2.FunctionGetResponse(
            function_id=fdef.id, handle_metadata=fdef.handle, function=self.registry.function_data(fdef)))

    async def FunctionGetById(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        fdef = self.registry.function(request.function_id)
        await stream.send_message(api_pb2.FunctionGetByIdResponse(
            function_id=fdef.id, handle_metadata=fdef.handle, function=self.registry.function_data(fdef)))

    async def FunctionMap(self, stream: Stream[Any, Any]) -> None:
        """A new call, or the call a request with the same ``x-idempotency-key`` made: the modal client sends
        one key with every attempt of a request it retries (``_retry_transient_errors`` in
        modal/_utils/grpc_utils.py), FunctionMap included (``_Invocation.create``), so a retried spawn whose
        first reply was lost gets the call that request made, not a second one."""
        request = await stream.recv_message()
        key = (stream.metadata or {}).get("x-idempotency-key")
        with self.lock:
            known = self._mapped.get(key) if key else None
        if known is not None:
            await stream.send_message(known)
            return
        fdef = self.registry.function(request.function_id)
        if request.function_call_type != api_pb2.FUNCTION_CALL_TYPE_UNARY or len(request.pipelined_inputs) != 1:
            raise GRPCError(Status.UNIMPLEMENTED, "The Modal emulator serves single-input calls (.spawn() and "
                                                  ".remote()) only, not .map() / .spawn_map()")
        item = request.pipelined_inputs[0]
        if item.input.args_blob_id and not self.blobs.exists(item.input.args_blob_id):
            raise GRPCError(Status.NOT_FOUND, f"Blob {item.input.args_blob_id} not found")
        app = self.registry.app(fdef.app_id)
        call = self.calls.create(function_id=fdef.id, app_id=app.id, function_name=fdef.ranked[0].function_name,
                                 module_name=fdef.ranked[0].module_name, environment=app.environment,
                                 ranked=fdef.ranked, function_input=item.input,
                                 invocation_type=request.function_call_invocation_type)
        self.on_call(call)
        first = fdef.ranked[0]
        response = api_pb2.FunctionMapResponse(
            function_call_id=call.id, function_call_jwt=f"jwt-{call.id}", sync_client_retries_enabled=False,
            pipelined_inputs=[api_pb2.FunctionPutInputsResponseItem(idx=item.idx, input_id=call.input_id,
                                                                      input_jwt=f"jwt-{call.input_id}")])
        if first.HasField("retry_policy"):
            response.retry_policy.CopyFrom(first.retry_policy)
        if key:
            with self.lock:
                self._mapped[key] = response
        await stream.send_message(response)

    async def FunctionGetOutputs(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        call = self.calls.get(request.function_call_id)
        deadline = time.monotonic() + min(max(request.timeout, 0.0), MAX_WAIT)
        while not call.over and time.monotonic() < deadline:
            await asyncio.sleep(min(_POLL, max(deadline - time.monotonic(), 0.0)))
        response = api_pb2.FunctionGetOutputsResponse(last_entry_id="0-0", num_unfinished_inputs=self._unfinished(call))
        with call.lock:
            expired = call.finished_at is not None and time.time() - call.finished_at > OUTPUT_RETENTION_SECS
            if call.output is not None and not call.output_cleared and not expired and request.start_idx == 0:
                response.outputs.append(call.output)
                response.idxs.append(0)
                response.last_entry_id = "1-0"
                if request.clear_on_success and call.output.result.status == GR.GENERIC_STATUS_SUCCESS:
                    call.output_cleared = True
        await stream.send_message(response)

    def _unfinished(self, call: Call) -> int:
        """1 while the input is queued or running, except a queued one not counted yet; 0 once it is over."""
        if call.over or (call.state == "pending" and time.time() - call.created_at < self.uncounted_queue_seconds):
            return 0
        return 1

    async def FunctionCallFromId(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        call = self.calls.get(request.function_call_id)
        await stream.send_message(api_pb2.FunctionCallFromIdResponse(
            function_call_id=call.id, num_inputs=1,
            metadata=api_pb2.FunctionCallHandleMetadata(app_id=call.app_id, function_id=call.function_id)))

    async def FunctionCallGetInfo(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        call = self.calls.get(request.function_call_id)
        info = api_pb2.FunctionCallInfo(function_call_id=call.id, idx=0, created_at=call.created_at,
                                        scheduled_at=call.created_at, total_inputs=1)
        category = {"pending": info.pending_inputs, "running": info.pending_inputs, "success": info.succeeded_inputs,
                    "failure": info.failed_inputs, "init_failure": info.failed_inputs,
                    "timeout": info.timeout_inputs, "terminated": info.cancelled_inputs}[call.state]
        if call.over or self._unfinished(call):
            category.total = 1
            category.latest.append(api_pb2.InputInfo(input_id=call.input_id, idx=0, task_id=call.task_id or "",
                                                     started_at=call.started_at or 0.0,
                                                     finished_at=call.finished_at or 0.0))
        await stream.send_message(api_pb2.FunctionCallGetInfoResponse(info=info))

    async def FunctionGetCallGraph(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        call = self.calls.get(request.function_call_id)
        with call.lock:
            task_id = call.task_id or (call.task_ids[-1] if call.task_ids and call.over else "")
            status = call.graph_status()
        await stream.send_message(api_pb2.FunctionGetCallGraphResponse(
            inputs=[api_pb2.InputCallGraphInfo(input_id=call.input_id, status=status, function_call_id=call.id,
                                               task_id=task_id)],
            function_calls=[api_pb2.FunctionCallCallGraphInfo(function_call_id=call.id, parent_input_id="",
                                                              function_name=call.function_name,
                                                              module_name=call.module_name)]))

    async def FunctionCallCancel(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        call = self.calls.get(request.function_call_id)
        if call.state not in TERMINAL:  # cancelling a call that is over is a no-op
            call.cancel_requested.set()
            self.on_cancel(call)
        await stream.send_message(empty_pb2.Empty())

    # ----- blobs ----------------------------------------------------------------------------------------

    async def BlobCreate(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        blob_id, parts = self.blobs.create(request.content_length)
        response = api_pb2.BlobCreateResponse(blob_id=blob_id, blob_ids=[blob_id])
        if parts is None:
            response.upload_urls.items.append(self.blobs.upload_url(blob_id))
        else:
            response.multiparts.items.append(api_pb2.MultiPartUpload(
                part_length=self.blobs.part_size, upload_urls=parts, completion_url=self.blobs.completion_url(blob_id)))
        await stream.send_message(response)

    async def BlobGet(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if not self.blobs.exists(request.blob_id):
            raise GRPCError(Status.NOT_FOUND, f"Blob {request.blob_id} not found")
        await stream.send_message(api_pb2.BlobGetResponse(download_url=self.blobs.download_url(request.blob_id)))

    # ----- logs -----------------------------------------------------------------------------------------

    async def AppFetchLogs(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        self.registry.app(request.app_id)
        found = self.logs.fetch(LogQuery.of(request), request.limit)
        await stream.send_message(api_pb2.AppFetchLogsResponse(batches=batches(found)))

    async def AppCountLogs(self, stream: Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        self.registry.app(request.app_id)
        buckets = self.logs.count(LogQuery.of(request), request.bucket_secs)
        await stream.send_message(api_pb2.AppCountLogsResponse(app_id=request.app_id, buckets=buckets))

    async def AppGetLogs(self, stream: Stream[Any, Any]) -> None:
        """Entries after ``last_entry_id`` as they are written, until the request's ``timeout``."""
        request = await stream.recv_message()
        self.registry.app(request.app_id)
        query = LogQuery.of(request)
        after = int(request.last_entry_id) if request.last_entry_id.isdigit() else 0
        deadline = time.monotonic() + min(request.timeout or MAX_WAIT, MAX_WAIT)
        while time.monotonic() < deadline:
            found = self.logs.entries(query, after)
            if found:
                for batch in batches(found):
                    await stream.send_message(batch)
                after = found[-1].seq
            await asyncio.sleep(_POLL)


class _Unanswered:
    """A stream whose answer is lost: the request is read, what is sent never leaves."""

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self._stream = stream
        self.metadata = stream.metadata

    async def recv_message(self) -> Any:
        return await self._stream.recv_message()

    async def send_message(self, message: Any) -> None:
        return None


def _unimplemented(name: str) -> Callable[..., Any]:
    async def handler(self: ModalServicer, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, f"The Modal emulator does not implement {name}")

    handler.__name__ = name
    return handler


for _name in sorted(api_grpc.ModalClientBase.__abstractmethods__):
    if _name not in ModalServicer.__dict__:
        setattr(ModalServicer, _name, _unimplemented(_name))
abc.update_abstractmethods(ModalServicer)
