"""The emulator's one HTTP server (aiohttp): OAuth2 tokens, Vertex AI JobService v1 REST, Cloud Logging v2.

Paths are exactly those the generated REST transports call (``google.cloud.aiplatform_v1`` JobService
``rest_base.py``): ``POST|GET /v1/projects/*/locations/*/customJobs``, ``GET .../customJobs/*``,
``POST .../customJobs/*:cancel``; and ``POST /v2/entries:list``, ``POST /token``. API calls need an
``Authorization: Bearer`` header (any token: issued here, a self-signed service-account JWT, or a static
one), else 401 UNAUTHENTICATED as Google answers. Every request is recorded; ``ApiFault``s fail them.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from aiohttp import web

from airflow_stepops.testing._kit import take_request_fault
from airflow_stepops.testing.vertex._auth import AuthError, ServiceAccount
from airflow_stepops.testing.vertex._errors import DEFAULT_MESSAGE, ApiError, invalid_argument
from airflow_stepops.testing.vertex._faults import ApiFault
from airflow_stepops.testing.vertex._jobs import JobService, render
from airflow_stepops.testing.vertex._logging import LogStore

JSON = dict[str, Any]
_PARENT = r"^/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)/customJobs"
_ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"^/token$"), "token"),
    ("POST", re.compile(_PARENT + r"$"), "create"),
    ("GET", re.compile(_PARENT + r"$"), "list"),
    ("GET", re.compile(_PARENT + r"/(?P<job>[^/:]+)$"), "get"),
    ("POST", re.compile(_PARENT + r"/(?P<job>[^/:]+):cancel$"), "cancel"),
    ("POST", re.compile(r"^/v2/entries:list$"), "entries"),
]


class ApiServer:
    """Routes requests to the job service, the log store and the service account; records them."""

    def __init__(self, jobs: JobService, logs: LogStore, account: ServiceAccount,
                 token_uri: Callable[[], str]) -> None:
        self.jobs, self.logs, self.account = jobs, logs, account
        self._token_uri = token_uri
        self.lock = threading.Lock()
        self.records: deque[JSON] = deque(maxlen=100_000)  # a long session keeps the latest
        self.faults: list[ApiFault] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        record: JSON = {"time": time.time(), "method": request.method, "path": request.path,
                        "query": dict(request.query), "status": None}
        try:
            response = await self._dispatch(request)
        except ApiError as exc:
            response = _json(exc.body(), exc.http)
        except AuthError as exc:
            response = _json({"error": exc.error, "error_description": exc.description}, 400)
        record["status"] = response.status
        with self.lock:
            self.records.append(record)
        return response

    def _fault(self, request: web.Request) -> ApiFault | None:
        with self.lock:
            return take_request_fault(self.faults, lambda f: f.matches(request.method, request.path))

    async def _dispatch(self, request: web.Request) -> web.Response:
        fault = self._fault(request)
        if fault is not None:
            message = fault.message or DEFAULT_MESSAGE.get(fault.status, fault.status)
            raise ApiError(fault.status, message, http=fault.status_code)
        for method, pattern, name in _ROUTES:
            found = pattern.match(request.path)
            if found is None:
                continue
            if request.method != method:
                continue
            if name == "token":
                return await self._token(request)
            _authenticated(request)
            return await getattr(self, f"_{name}")(request, found.groupdict())
        raise ApiError("NOT_FOUND", f"The requested URL {request.path} ({request.method}) is not served by the "
                                    "Vertex AI emulator.")

    # ----- handlers -----------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        return _json(self.account.grant(form, self._token_uri()))

    async def _create(self, request: web.Request, path: dict[str, str]) -> web.Response:
        body = await _body(request)
        job = self.jobs.create(path["project"], path["location"], body)
        if job.lose_reply is not None:  # the job exists; its creator never hears of it
            job.reply_held = True
            try:
                await asyncio.sleep(job.lose_reply)
            finally:
                job.reply_held = False
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError
        return _json(render(job.snapshot(), int_enums=_int_enums(request)))

    async def _list(self, request: web.Request, path: dict[str, str]) -> web.Response:
        query = {k: request.query[k] for k in request.query}
        return _json(self.jobs.list(path["project"], path["location"], query, int_enums=_int_enums(request)))

    async def _get(self, request: web.Request, path: dict[str, str]) -> web.Response:
        job = self.jobs.get(path["project"], path["location"], path["job"])
        return _json(render(job.snapshot(), int_enums=_int_enums(request)))

    async def _cancel(self, request: web.Request, path: dict[str, str]) -> web.Response:
        await _body(request, required=False)
        self.jobs.cancel(path["project"], path["location"], path["job"])
        return _json({})

    async def _entries(self, request: web.Request, path: dict[str, str]) -> web.Response:
        body = await _body(request)
        if not isinstance(body, dict):
            raise invalid_argument("Invalid JSON payload received. Expected an object.")
        return _json(self.logs.list_entries(body))


def _authenticated(request: web.Request) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError("UNAUTHENTICATED", DEFAULT_MESSAGE["UNAUTHENTICATED"])


def _int_enums(request: web.Request) -> bool:
    """The generated clients ask ``$alt=json;enum-encoding=int``: enums as numbers, as Google then answers."""
    return "enum-encoding=int" in request.query.get("$alt", "")


async def _body(request: web.Request, required: bool = True) -> Any:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise invalid_argument("Invalid JSON payload received. Empty request body.")
        return {}
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise invalid_argument(f"Invalid JSON payload received. {exc}") from None


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json", charset="utf-8")
