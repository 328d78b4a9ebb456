"""A service account whose key only the emulator knows, and the OAuth2 token endpoint that honours it.

``google.oauth2.service_account.Credentials`` built from ``info()`` refresh the way they do against
Google: they sign a JWT with the private key and POST it to ``token_uri`` as a jwt-bearer grant. The
endpoint checks the signature, issuer and audience like Google's (``invalid_grant`` otherwise) and hands
out an opaque access token. Clients that sign their own JWTs instead (``always_use_jwt_access``, as the
Vertex AI clients do) never call it; the API accepts any bearer token.
"""

from __future__ import annotations

import datetime
import secrets
import threading
import time
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

T = TypeVar("T")
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: google-auth signs its grants for Google's token endpoint whatever ``token_uri`` says; Google accepts both
GOOGLE_TOKEN_AUDIENCES = ("https://oauth2.googleapis.com/token", "https://www.googleapis.com/oauth2/v4/token")
TOKEN_LIFETIME = 3600


class AuthError(Exception):
    """A refused grant, answered as OAuth2's ``{"error", "error_description"}`` with HTTP 400."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error
        self.description = description


class ServiceAccount:
    """An RSA key pair standing in for a service account of ``project``."""

    def __init__(self, project: str, name: str = "stepops-emulator") -> None:
        self.project = project
        self.client_email = f"{name}@{project}.iam.gserviceaccount.com"
        self.client_id = str(100_000_000_000_000_000_000 + secrets.randbelow(10**20))
        self.private_key_id = secrets.token_hex(20)
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()).decode()
        self._public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self._lock = threading.Lock()
        self._tokens: dict[str, float] = {}

    def info(self, token_uri: str) -> dict[str, str]:
        """The service-account key file's JSON (what ``keyfile_dict`` and ``from_service_account_info`` take)."""
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": self.private_key_id,
            "private_key": self._private_pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
                                    + self.client_email.replace("@", "%40"),
            "universe_domain": UNIVERSE_DOMAIN,
        }

    def grant(self, form: dict[str, str], token_uri: str) -> dict[str, Any]:
        """Answer a token request (form fields); AuthError for what Google refuses."""
        from google.auth import exceptions, jwt

        grant_type = form.get("grant_type", "")
        if grant_type != JWT_BEARER:
            raise AuthError("unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = form.get("assertion", "")
        if not assertion:
            raise AuthError("invalid_request", "Missing required parameter: assertion")
        try:
            claims = jwt.decode(assertion, certs={self.private_key_id: self._public_pem},
                                audience=[token_uri, *GOOGLE_TOKEN_AUDIENCES], clock_skew_in_seconds=300)
        except (exceptions.GoogleAuthError, ValueError) as exc:
            raise AuthError("invalid_grant", f"Invalid JWT Signature. ({exc})") from None
        if claims.get("iss") != self.client_email:
            raise AuthError("invalid_grant", f"Invalid JWT: issuer {claims.get('iss')!r} is not "
                                             f"{self.client_email}")
        if not claims.get("scope") and not claims.get("target_audience"):
            raise AuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        token = "ya29.emulator-" + secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = time.time() + TOKEN_LIFETIME
        return {"access_token": token, "expires_in": TOKEN_LIFETIME, "token_type": "Bearer"}

    def issued(self, token: str) -> bool:
        """Whether ``token`` came from the token endpoint and has not expired."""
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and expiry > time.time()


#: the universe domain of the emulator's service account (and of ``env()``'s GOOGLE_CLOUD_UNIVERSE_DOMAIN):
#: google-auth looks up a service account's "regional access boundary" at Google only in the default
#: universe, so credentials from any key file the emulator hands out stay offline whoever builds them
UNIVERSE_DOMAIN = "stepops.test"

def without_boundary_lookup(credentials: T) -> T:
    """Keep google-auth credentials from calling Google itself: since google-auth 2.5x, service-account
    credentials look up their "regional access boundary" at iamcredentials.googleapis.com in a background
    thread after their first authorized request, whatever their ``token_uri`` (offline, a failing DNS lookup
    retried three times, then a cooldown). Giving them Google's no-op boundary (``0x0``) for a year makes them
    skip it; they then send ``x-allowed-locations: 0x0``, which the emulator ignores. Other credentials are
    returned unchanged."""
    setter = getattr(credentials, "_set_regional_access_boundary", None)
    if setter is not None:
        from google.auth import _helpers

        setter({"encodedLocations": "0x0", "expiry": _helpers.utcnow() + datetime.timedelta(days=365)})
    return credentials
