"""Tokens for the emulator: any ``Authorization: Bearer`` token is accepted, these merely look real.

A token is an unsigned JWT (``alg: none``) whose claims carry the audience asked for, the emulator's
tenant (``tid``: ``MLClient`` decodes it to append ``&tid=`` to studio URLs) and principal.
``StaticTokenCredential`` implements azure-core's ``TokenCredential`` / ``SupportsTokenInfo`` protocols
like ``azure.identity`` credentials do, context management and ``close()`` included. Processes that build their own
``azure.identity`` credential get tokens from the emulator's managed-identity endpoint instead
(``IDENTITY_ENDPOINT`` / ``IDENTITY_HEADER`` of ``env()``: ``ManagedIdentityCredential`` and
``DefaultAzureCredential`` use it).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from azure.core.credentials import AccessToken, AccessTokenInfo

from airflow_stepops.testing.azureml._config import PRINCIPAL_ID, PRINCIPAL_NAME, TENANT_ID

#: the ``IDENTITY_HEADER`` secret of the emulated managed-identity endpoint (any value would do)
IDENTITY_HEADER = "stepops-azureml-emulator"
TOKEN_LIFETIME = 24 * 3600


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).rstrip(b"=").decode()


def audience(scope_or_resource: str) -> str:
    """``https://management.azure.com/.default`` -> ``https://management.azure.com``."""
    value = scope_or_resource
    if value.endswith("/.default"):
        value = value[: -len("/.default")]
    return value.rstrip("/")


def make_token(scope: str, expires_on: int) -> str:
    now = int(time.time())
    claims = {"aud": audience(scope), "iss": f"https://sts.windows.net/{TENANT_ID}/", "iat": now - 60,
              "nbf": now - 60, "exp": expires_on, "tid": TENANT_ID, "oid": PRINCIPAL_ID, "sub": PRINCIPAL_ID,
              "upn": PRINCIPAL_NAME, "name": "stepops emulator", "appid": PRINCIPAL_ID, "ver": "1.0"}
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."


class StaticTokenCredential:
    """A ``TokenCredential`` handing out emulator tokens (one per scope, valid a day)."""

    def __init__(self) -> None:
        self._expires_on = int(time.time()) + TOKEN_LIFETIME
        self._tokens: dict[str, str] = {}

    def _token(self, scopes: tuple[str, ...]) -> str:
        scope = scopes[0] if scopes else "https://management.azure.com/.default"
        if scope not in self._tokens:
            self._tokens[scope] = make_token(scope, self._expires_on)
        return self._tokens[scope]

    def get_token(self, *scopes: str, claims: str | None = None, tenant_id: str | None = None,
                  enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        return AccessToken(self._token(scopes), self._expires_on)

    def get_token_info(self, *scopes: str, options: Any = None) -> AccessTokenInfo:
        return AccessTokenInfo(self._token(scopes), self._expires_on, token_type="Bearer",
                               refresh_on=self._expires_on - 300)

    def close(self) -> None:
        pass

    def __enter__(self) -> StaticTokenCredential:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def managed_identity_answer(resource: str) -> dict[str, Any]:
    """What the App Service managed-identity endpoint (api-version 2019-08-01) answers."""
    expires_on = int(time.time()) + TOKEN_LIFETIME
    return {"access_token": make_token(resource, expires_on), "expires_on": str(expires_on),
            "resource": audience(resource), "token_type": "Bearer", "client_id": PRINCIPAL_ID}
