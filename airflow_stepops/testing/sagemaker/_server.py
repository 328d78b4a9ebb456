"""moto's threaded server on 127.0.0.1 behind a gateway that records requests and can fail them.

``ThreadedMotoServer`` builds its WSGI app inside ``_server_entry``; the subclass here builds the same
app (moto 5.2.5's ``DomainDispatcherApplication(create_backend_app)``), wraps it in ``Gateway`` and
silences werkzeug's line per request. One server answers every service: moto tells them apart by the
SigV4 credential scope, so S3, SageMaker and CloudWatch Logs share one ``endpoint_url``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

from airflow_stepops.testing._kit import take_request_fault

#: appended to the User-Agent of the emulator's own clients, so their requests are told apart
INTERNAL_AGENT = "stepops-sagemaker-emulator"

_SCOPE = re.compile(r"Credential=[^/]*/[^/]*/([^/]*)/([^/]*)/")


@dataclass
class ApiFault:
    """Answer the next ``count`` matching requests (None: all) with ``code`` and HTTP ``status``.

    ``service`` is the SigV4 signing name (``sagemaker``, ``s3``, ``logs``); ``action`` the operation of
    the JSON protocols (``DescribeTrainingJob``, ``GetLogEvents``); both None match every request. The
    emulator's own S3 and log traffic is never failed. With ``hold`` > 0 the request is served instead
    (it takes effect) and its reply held back ``hold`` seconds, as if lost on the way: the client's
    read timeout fires first.
    """

    code: str = "ThrottlingException"
    status: int = 400
    service: str | None = None
    action: str | None = None
    count: int | None = 1
    message: str = "Rate exceeded"
    hits: int = 0
    hold: float = 0.0

    def matches(self, service: str | None, action: str | None) -> bool:
        return (self.service is None or self.service == service) and (self.action is None or self.action == action)


class Gateway:
    """WSGI middleware in front of moto: the request log and injected API errors."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.records: deque[dict[str, Any]] = deque(maxlen=100_000)  # a long session keeps the latest
        self.faults: list[ApiFault] = []

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scope = _SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        service = scope.group(2) if scope else None
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        action = target.rpartition(".")[2] or None
        internal = INTERNAL_AGENT in environ.get("HTTP_USER_AGENT", "")
        record: dict[str, Any] = {"time": time.time(), "service": service, "action": action,
                                  "method": environ.get("REQUEST_METHOD"), "path": environ.get("PATH_INFO"),
                                  "query": environ.get("QUERY_STRING", ""), "internal": internal, "status": None}
        fault = None
        if not internal:
            with self.lock:
                fault = take_request_fault(self.faults, lambda f: f.matches(service, action), "count")
        if fault is not None and not fault.hold:
            record["status"] = fault.status
            self._record(record)
            return _error(fault, target, start_response)

        def recording_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            record["status"] = int(status.split()[0])
            return start_response(status, headers, exc_info)

        try:
            reply = self.app(environ, recording_start_response)
            if fault is not None:
                reply = [b"".join(reply)]  # served now, answered after the client gave up
                time.sleep(fault.hold)
            return reply
        finally:
            self._record(record)

    def _record(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.records.append(record)


def _error(fault: ApiFault, target: str, start_response: Callable[..., Any]) -> list[bytes]:
    reason = {400: "Bad Request", 429: "Too Many Requests", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(fault.status, "Error")
    if target:  # the JSON protocols (SageMaker, CloudWatch Logs)
        body = json.dumps({"__type": fault.code, "message": fault.message}).encode()
        content_type = "application/x-amz-json-1.1"
    else:  # S3's XML
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                f"<Message>{fault.message}</Message><RequestId>emulator</RequestId></Error>").encode()
        content_type = "application/xml"
    start_response(f"{fault.status} {reason}", [("Content-Type", content_type), ("Content-Length", str(len(body))),
                                                 ("x-amzn-RequestId", "emulator")])
    return [body]


class _QuietHandler(MotoRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class MotoServer(ThreadedMotoServer):
    """``ThreadedMotoServer`` on 127.0.0.1 whose app is wrapped in a ``Gateway``."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(ip_address="127.0.0.1", port=port, verbose=False)
        self.gateway = Gateway(DomainDispatcherApplication(create_backend_app))
        self.error: BaseException | None = None

    def _server_entry(self) -> None:
        try:
            self._server = make_server(self._ip_address, self._port, self.gateway, True,
                                       request_handler=_QuietHandler)
        except BaseException as exc:  # e.g. the port is taken: reported by start()
            self.error = exc
            self._server_ready_event.set()
            return
        self._server_ready_event.set()
        self._server.serve_forever()

    def start(self) -> None:
        super().start()
        if self.error is not None:
            raise RuntimeError(f"moto's server could not listen on 127.0.0.1:{self._port}") from self.error
