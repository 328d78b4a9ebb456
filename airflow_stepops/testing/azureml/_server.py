"""HTTPS front of the emulator (aiohttp, own thread and event loop, 127.0.0.1): ARM, run history, discovery.

Routes (``{ws}`` is ``/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.MachineLearningServices/
workspaces/{name}``; paths match case-insensitively, as ARM's do):

* ARM (``api-version`` required, any bearer token): ``GET {ws}``; ``GET {ws}/datastores[?isDefault=]``,
  ``GET {ws}/datastores/{n}``, ``POST {ws}/datastores/{n}/listSecrets``; ``GET {ws}/computes``,
  ``GET {ws}/computes/{n}``; ``PUT|GET {ws}/environments/{n}/versions/{v}``, ``GET {ws}/environments/{n}/versions``;
  ``PUT|GET {ws}/jobs/{n}``, ``GET {ws}/jobs[?listViewType=&tag=&jobType=&$skipToken=]``,
  ``POST {ws}/jobs/{n}/cancel`` (202 + ``Location`` + ``Retry-After``) and
  ``GET /subscriptions/{sub}/providers/Microsoft.MachineLearningServices/locations/{loc}/mfeOperationResults/{op}``
  (202 while the cancel is under way, 200 once the job ended).
* Run history (bearer token): ``GET /history/v1.0{ws}[/experiments/{e}]/runs/{id}[/details]``,
  ``PATCH /history/v1.0{ws}/experiments/{e}/runs/{id}``, ``GET .../runs/{id}/artifacts`` and
  ``GET .../runs/{id}/artifacts/contentinfo?path=``.
* ``GET /discovery/workspaces/{id}`` (the workspace's ``discoveryUrl``), ``GET /msi/token`` (an App Service
  style managed-identity endpoint), ``GET /emulator/jobs/{n}/logs`` (plain text) and ``GET /emulator/health``.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from airflow_stepops.testing._kit import take_request_fault
from airflow_stepops.testing.azureml._auth import IDENTITY_HEADER, managed_identity_answer
from airflow_stepops.testing.azureml._faults import JSON, ApiError, RequestFault, not_found
from airflow_stepops.testing.azureml._jobs import STD_LOG
from airflow_stepops.testing.azureml._logs import ARTIFACT_PREFIX
from airflow_stepops.testing.azureml._service import Service, encode_token
from airflow_stepops.testing.azureml._transfer import BlobLocation

_WS = (r"/subscriptions/(?P<sub>[^/]+)/resourcegroups/(?P<rg>[^/]+)/providers/microsoft\.machinelearningservices"
       r"/workspaces/(?P<ws>[^/]+)")
_RUN = r"/history/v1\.0" + _WS + r"(?:/experiments/(?P<exp>[^/]+))?/runs/(?P<run>[^/]+)"
Handler = Callable[[web.Request, dict[str, str]], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, headers=headers, content_type="application/json")


def _found(body: Any, kind: str, name: str) -> web.Response:
    """``body`` as JSON; ARM's 404 for the ``kind`` named ``name`` when there is none."""
    if body is None:
        raise not_found(kind, name)
    return _json(body)


def _error(exc: ApiError) -> web.Response:
    return _json(exc.body(), exc.status, {"x-ms-error-code": exc.code, **exc.headers})


class ApiServer:
    """Routes requests to the ``Service``; keeps the request log and the injected request faults."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.workspace = service.workspace
        self.base_url = ""
        self.requests: deque[dict[str, Any]] = deque(maxlen=100_000)
        self.faults: list[RequestFault] = []
        self.lock = threading.Lock()
        # (method, pattern, handler, needs api-version)
        self.routes: list[tuple[str, re.Pattern[str], Handler, bool]] = []
        arm: list[tuple[str, str, Handler]] = [
            ("GET", _WS, self._workspace),
            ("GET", _WS + r"/datastores", self._datastores),
            ("GET", _WS + r"/datastores/(?P<name>[^/]+)", self._datastore),
            ("POST", _WS + r"/datastores/(?P<name>[^/]+)/listsecrets", self._datastore_secrets),
            ("GET", _WS + r"/computes", self._computes),
            ("GET", _WS + r"/computes/(?P<name>[^/]+)", self._compute),
            ("GET", _WS + r"/environments/(?P<name>[^/]+)/versions", self._environment_versions),
            ("PUT", _WS + r"/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._put_environment),
            ("GET", _WS + r"/environments/(?P<name>[^/]+)/versions/(?P<version>[^/]+)", self._environment),
            ("GET", _WS + r"/jobs", self._list_jobs),
            ("PUT", _WS + r"/jobs/(?P<name>[^/]+)", self._put_job),
            ("GET", _WS + r"/jobs/(?P<name>[^/]+)", self._get_job),
            ("POST", _WS + r"/jobs/(?P<name>[^/]+)/cancel", self._cancel_job),
            ("GET", r"/subscriptions/(?P<sub>[^/]+)/providers/microsoft\.machinelearningservices/locations/"
                    r"(?P<loc>[^/]+)/mfeoperationresults/(?P<op>[^/]+)", self._operation),
        ]
        history: list[tuple[str, str, Handler]] = [
            ("GET", _RUN, self._run),
            ("GET", _RUN + r"/details", self._run_details),
            ("PATCH", _RUN, self._patch_run),
            ("GET", _RUN + r"/artifacts", self._artifacts),
            ("GET", _RUN + r"/artifacts/contentinfo", self._artifact_content),
        ]
        other: list[tuple[str, str, Handler]] = [
            ("GET", r"/discovery(?:/workspaces/(?P<id>[^/]+))?", self._discovery),
            ("GET", r"/msi/token", self._managed_identity),
            ("GET", r"/emulator/jobs/(?P<name>[^/]+)/logs", self._plain_logs),
            ("GET", r"/emulator/health", self._health),
        ]
        for table, versioned in ((arm, True), (history, False), (other, False)):
            for method, pattern, handler in table:
                self.routes.append((method, re.compile(f"^{pattern}/?$", re.I), handler, versioned))

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        return app

    # ----- dispatch ---------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        record: dict[str, Any] = {"method": request.method, "path": request.path, "query": dict(request.query),
                                  "time": time.time(), "status": None}
        internal = request.path.startswith("/emulator/")
        if not internal:
            with self.lock:
                self.requests.append(record)
        try:
            response = await self._handle(request, internal)
        except ApiError as exc:
            response = _error(exc)
        except Exception as exc:  # a bug of the emulator: answer as the service's 500 would
            response = _error(ApiError(500, "InternalServerError", f"The emulator failed: {exc!r}"))
        response.headers.setdefault("x-ms-request-id", str(uuid.uuid4()))
        record["status"] = response.status
        return response

    async def _handle(self, request: web.Request, internal: bool) -> web.StreamResponse:
        matched = None
        path_known = False
        for method, pattern, handler, versioned in self.routes:
            found = pattern.match(request.path)
            if found:
                path_known = True
                if method == request.method:
                    matched = (handler, found.groupdict(), versioned)
                    break
        if not internal:
            with self.lock:
                fault = take_request_fault(self.faults, lambda f: f.matches(request.method, request.path_qs))
            if fault is not None and fault.lose_reply is None:
                raise fault.error()
        else:
            fault = None
        if matched is None:
            if path_known:
                raise ApiError(405, "MethodNotAllowed", f"The method {request.method} is not allowed for "
                                                       f"{request.path}.")
            raise ApiError(404, "NotFound", f"No route for {request.method} {request.path} in the Azure ML emulator.")
        handler, params, versioned = matched
        if handler not in (self._discovery, self._managed_identity, self._plain_logs, self._health):
            self._authenticate(request)
        if versioned and not request.query.get("api-version"):
            raise ApiError(400, "MissingApiVersionParameter",
                           "The api-version query parameter (?api-version=) is required for all requests.")
        if "ws" in params:
            self._check_workspace(params)
        response = await handler(request, params)
        if fault is not None:  # carried out, but the client never hears of it
            if fault.lose_reply == "hang":
                await asyncio.sleep(fault.hang_seconds)
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return response

    @staticmethod
    def _authenticate(request: web.Request) -> None:
        header = request.headers.get("Authorization", "")
        if not header:
            raise ApiError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
        if not header.lower().startswith("bearer ") or not header[7:].strip():
            raise ApiError(401, "InvalidAuthenticationToken", "The access token is invalid.")

    def _check_workspace(self, params: dict[str, str]) -> None:
        cfg = self.workspace.config
        if params["sub"].lower() != cfg.subscription_id.lower():
            raise ApiError(404, "SubscriptionNotFound", f"The subscription '{params['sub']}' could not be found.")
        if params["rg"].lower() != cfg.resource_group.lower():
            raise ApiError(404, "ResourceGroupNotFound", f"Resource group '{params['rg']}' could not be found.")
        if params["ws"].lower() != cfg.workspace_name.lower():
            raise ApiError(404, "ResourceNotFound",
                           f"The Resource 'Microsoft.MachineLearningServices/workspaces/{params['ws']}' under "
                           f"resource group '{params['rg']}' was not found. For more details please go to "
                           "https://aka.ms/ARMResourceNotFoundFix")

    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ApiError(400, "UnsupportedMediaType", "The request body is not valid JSON.")

    # ----- ARM: workspace, datastores, computes, environments ---------------------------------------

    async def _workspace(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _json(self.workspace.arm())

    async def _datastores(self, request: web.Request, p: dict[str, str]) -> web.Response:
        names = list(self.workspace.datastores)
        flag = request.query.get("isDefault")
        if flag is not None and flag.lower() == "true":
            names = [n for n in names if n == "workspaceblobstore"]
        return _json({"value": [self.workspace.datastore(n) for n in names]})

    async def _datastore(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _found(self.workspace.datastore(p["name"]), "Datastore", p["name"])

    async def _datastore_secrets(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _found(self.workspace.datastore_secrets(p["name"]), "Datastore", p["name"])

    async def _computes(self, request: web.Request, p: dict[str, str]) -> web.Response:
        with self.workspace.lock:
            names = list(self.workspace.computes)
        return _json({"value": [self.workspace.compute(n) for n in names]})

    async def _compute(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _found(self.workspace.compute(p["name"]), "Compute", p["name"])

    async def _environment_versions(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _json({"value": self.workspace.environment_versions(p["name"])})

    async def _put_environment(self, request: web.Request, p: dict[str, str]) -> web.Response:
        body = await self._body(request)
        resource, created = self.workspace.put_environment(p["name"], p["version"], body)
        return _json(resource, 201 if created else 200)

    async def _environment(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _found(self.workspace.environment(p["name"], p["version"]), "Environment",
                      f"{p['name']}:{p['version']}")

    # ----- ARM: jobs --------------------------------------------------------------------------------

    async def _put_job(self, request: web.Request, p: dict[str, str]) -> web.Response:
        resource, status = self.service.put_job(p["name"], await self._body(request))
        return _json(resource, status)

    async def _get_job(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _json(self.service.job(p["name"]).arm())

    async def _list_jobs(self, request: web.Request, p: dict[str, str]) -> web.Response:
        page, following = self.service.list_jobs(request.query)
        body: JSON = {"value": page}
        if following is not None:
            query = {k: v for k, v in request.query.items() if k not in ("$skipToken", "$skip")}
            query["$skipToken"] = encode_token(following)
            body["nextLink"] = f"{self.base_url}{request.path}?{urlencode(query)}"
        return _json(body)

    async def _cancel_job(self, request: web.Request, p: dict[str, str]) -> web.Response:
        job = self.service.cancel(p["name"])
        cfg = self.workspace.config
        version = request.query.get("api-version", "")
        location = (f"{self.base_url}/subscriptions/{cfg.subscription_id}/providers/Microsoft.MachineLearningServices"
                    f"/locations/{cfg.location}/mfeOperationResults/jc:{job.cancel_operation}:{job.name}"
                    f"?{urlencode({'api-version': version})}")
        return web.Response(status=202, headers={"Location": location, "Retry-After": "1"})

    async def _operation(self, request: web.Request, p: dict[str, str]) -> web.Response:
        operation = p["op"].split(":")[1] if p["op"].count(":") >= 2 else p["op"]
        if self.service.operation_done(operation):
            return web.Response(status=200)
        return web.Response(status=202, headers={"Location": str(request.url.with_scheme("https")),
                                                 "Retry-After": "1"})

    # ----- run history ------------------------------------------------------------------------------

    def _job_for_run(self, run: str) -> Any:
        try:
            return self.service.job(run)
        except ApiError:
            raise ApiError(404, "UserError", f"Run {run} was not found", inner={"code": "NotFoundError"})

    async def _run(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _json(self._job_for_run(p["run"]).run(details=False))

    async def _run_details(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _json(self._job_for_run(p["run"]).run(details=True))

    async def _patch_run(self, request: web.Request, p: dict[str, str]) -> web.Response:
        job = self._job_for_run(p["run"])
        body = await self._body(request) or {}
        if not isinstance(body, dict):
            raise ApiError(400, "UserError", "The run update must be an object.")
        job.update_mutable({"displayName": body.get("displayName"), "description": body.get("description"),
                            "tags": body.get("tags") or {}, "properties": body.get("properties") or {},
                            "isArchived": body.get("hidden")})  # run history's "hidden" is MFE's isArchived
        return _json(job.run(details=False))

    def _artifact(self, job: Any, path: str) -> JSON:
        container = f"dcid.{job.name}"
        return {"artifactId": f"ExperimentRun/{container}/{path}", "origin": "ExperimentRun", "container": container,
                "path": path, "etag": None, "createdTime": None, "dataPath": None, "tags": {}}

    async def _artifacts(self, request: web.Request, p: dict[str, str]) -> web.Response:
        job = self._job_for_run(p["run"])
        with job.lock:
            has_log = job.log_url is not None
        return _json({"value": [self._artifact(job, STD_LOG)] if has_log else [], "continuationToken": None,
                      "nextLink": None})

    async def _artifact_content(self, request: web.Request, p: dict[str, str]) -> web.Response:
        job = self._job_for_run(p["run"])
        path = request.query.get("path", "")
        with job.lock:
            has_log = job.log_url is not None
        if path != STD_LOG or not has_log:
            raise ApiError(404, "UserError", f"Artifact {path} of run {job.name} was not found")
        location = BlobLocation(self.service.ctx.artifact_container,
                                f"{ARTIFACT_PREFIX.format(name=job.name)}/{STD_LOG}")
        info = self._artifact(job, path)
        info["contentUri"] = self.service.ctx.storage.sas_url(location)
        return _json({k: info[k] for k in ("contentUri", "origin", "container", "path", "tags")})

    # ----- other ------------------------------------------------------------------------------------

    async def _discovery(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _json(self.workspace.discovery())

    async def _managed_identity(self, request: web.Request, p: dict[str, str]) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != IDENTITY_HEADER:
            return _json({"error": "invalid_request", "error_description": "X-IDENTITY-HEADER is missing or wrong"},
                         400)
        resource = request.query.get("resource") or "https://management.azure.com"
        return _json(managed_identity_answer(resource))

    async def _plain_logs(self, request: web.Request, p: dict[str, str]) -> web.Response:
        try:
            runner = self.service.runner(p["name"])
        except KeyError:
            raise not_found("Job", p["name"])
        return web.Response(text="".join(line + "\n" for line in runner.log_lines()), content_type="text/plain")

    async def _health(self, request: web.Request, p: dict[str, str]) -> web.Response:
        return _json({"status": "ok"})
