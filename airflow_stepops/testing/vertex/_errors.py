"""Google's error shapes: the JSON body of a failed API call and the ``google.rpc.Status`` of a failed job.

``google.api_core.exceptions.from_http_response`` reads ``{"error": {"code", "message", "status",
"details"}}`` into ``InvalidArgument``, ``NotFound``, ``ResourceExhausted``... so clients see the same
exception classes as against Vertex AI.
"""

from __future__ import annotations

from typing import Any

#: canonical status -> HTTP status (google.rpc.Code's documented mapping)
HTTP_STATUS = {
    "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
    "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503,
    "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}
#: canonical status -> google.rpc.Code number (what a CustomJob's ``error.code`` holds)
RPC_CODE = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9, "ABORTED": 10,
    "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
#: HTTP status -> the canonical status Google pairs with it, for ``fail_requests(503)`` without a status
DEFAULT_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  409: "ABORTED", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                  501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
#: the message Google's front end gives with each status when nothing more specific is said
DEFAULT_MESSAGE = {
    "UNAVAILABLE": "The service is currently unavailable.",
    "INTERNAL": "Internal error encountered.",
    "DEADLINE_EXCEEDED": "Deadline expired before operation could complete.",
    "RESOURCE_EXHAUSTED": "Quota exceeded for quota metric 'Resource management requests' and limit "
                          "'Resource management requests per minute per region' of service "
                          "'aiplatform.googleapis.com'.",
    "UNAUTHENTICATED": "Request is missing required authentication credential. Expected OAuth 2 access token, "
                       "login cookie or other valid authentication credential. See "
                       "https://developers.google.com/identity/sign-in/web/devconsole-project.",
    "ABORTED": "The operation was aborted.",
}


class ApiError(Exception):
    """A failed call, answered as Google's error JSON with HTTP status ``http`` (from ``status`` by default)."""

    def __init__(self, status: str, message: str, *, http: int | None = None,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.http = http if http is not None else HTTP_STATUS.get(status, 500)
        self.details = details or []

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.http, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


def invalid_argument(message: str, violations: list[tuple[str, str]] | None = None) -> ApiError:
    """400 INVALID_ARGUMENT with a ``google.rpc.BadRequest`` naming each bad field, as Google sends it."""
    details = [{"@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": f, "description": d} for f, d in violations]}] if violations else None
    return ApiError("INVALID_ARGUMENT", message, details=details)


def job_error(status: str, message: str) -> dict[str, Any]:
    """A CustomJob's ``error`` (a ``google.rpc.Status``) with the numeric code of ``status``."""
    return {"code": RPC_CODE[status], "message": message}
