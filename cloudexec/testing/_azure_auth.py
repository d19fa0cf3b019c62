"""TLS and expiring bearer tokens for the Azure emulator, the way Microsoft Entra ID hands them out.

azure-core refuses to send a bearer token over plain HTTP, and azure-storage-blob
refuses a token credential for an ``http://`` account, so an emulator that checks
token expiry has to speak HTTPS::

    EmulatorTokenCredential.get_token(scope) --> hooks.issue_credentials() (counted)
        |  a JWT: aud = the scope's resource, exp = now + credential_lifetime_s,
        |  uti = the issued key (what hooks.credentials_expired() looks up)
        v
    BatchClient / adlfs  ==HTTPS (throwaway CA)==>  Batch service, blob proxy
                                                      |  expired -> 401, Azure's body
                                                      v
                                                    Azurite (--oauth basic, --cert/--key)

The CA and the server certificate (for 127.0.0.1 only) are made fresh for each
emulator with ``cryptography`` and live in its temporary folder.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import math
import os
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cloudexec.testing._hooks import Hooks, ServedInThread

__all__ = [
    "BATCH_AUDIENCE",
    "STORAGE_AUDIENCE",
    "EmulatorTokenCredential",
    "IdentityEndpoint",
    "TlsFiles",
    "expired_token_detail",
    "make_tls_files",
    "storage_expired_answer",
    "token_claims",
    "trust_in_process",
]

# The resources azure-batch and azure-storage-blob ask tokens for (their scopes
# without "/.default"); Azurite accepts only storage audiences.
BATCH_AUDIENCE = "https://batch.core.windows.net/"
STORAGE_AUDIENCE = "https://storage.azure.com"
# A tenant id of zeros: Azurite checks the issuer's prefix only.
_ISSUER = "https://sts.windows.net/00000000-0000-0000-0000-000000000000/"
# What Azure Storage and Azure Batch say of an expired Entra ID token.
_EXPIRED_DETAIL = "Lifetime validation failed. The token is expired."


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of an emulator's throwaway CA and its 127.0.0.1 server certificate.

    Attributes:
        ca_path: The CA certificate: what clients must trust.
        cert_path: The server certificate (SAN ``IP:127.0.0.1``), signed by the CA.
        key_path: The server certificate's private key (unencrypted).
    """

    ca_path: Path
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        """An ``SSLContext`` for a server presenting the certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        """An ``SSLContext`` for a client trusting the CA only."""
        return ssl.create_default_context(cafile=str(self.ca_path))


def make_tls_files(folder: Path) -> TlsFiles:
    """Create a CA and a server certificate for 127.0.0.1 in ``folder``, valid for a day.

    Raises:
        ImportError: ``cryptography`` is missing (it comes with the ``azure`` extra).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    # A minute back: a client whose clock is a little behind still accepts it.
    not_before, not_after = now - dt.timedelta(minutes=1), now + dt.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloudexec emulator test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server-key.pem")
    files.ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(files.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    return files


def trust_in_process(files: TlsFiles) -> Callable[[], None]:
    """Make this process's Azure SDK clients trust the emulator's CA; return the undo.

    A process started later is told with ``SSL_CERT_FILE`` and
    ``REQUESTS_CA_BUNDLE`` (what a user behind a private CA sets before starting
    Python; the emulator's tasks get them). This process may have loaded its
    trust store already, so: ``REQUESTS_CA_BUNDLE`` is set here (requests reads it
    per request; azure-batch's sync pipeline uses requests), to a bundle of
    certifi's CAs plus the test CA so other hosts still verify; and the CA is
    added to aiohttp's default verifying context (adlfs's async blob clients),
    which aiohttp builds once at import.
    """
    bundle = files.ca_path.with_name("bundle.pem")
    try:
        import certifi

        public = Path(certifi.where()).read_bytes()
    except ImportError:
        public = b""
    bundle.write_bytes(public + b"\n" + files.ca_path.read_bytes())
    previous = os.environ.get("REQUESTS_CA_BUNDLE")
    os.environ["REQUESTS_CA_BUNDLE"] = str(bundle)
    try:
        from aiohttp import connector

        context = getattr(connector, "_SSL_CONTEXT_VERIFIED", None)
        if isinstance(context, ssl.SSLContext):
            # Trusting one more CA whose only certificate names 127.0.0.1 is harmless.
            context.load_verify_locations(cafile=str(files.ca_path))
    except ImportError:
        pass

    def undo() -> None:
        if os.environ.get("REQUESTS_CA_BUNDLE") == str(bundle):
            if previous is None:
                del os.environ["REQUESTS_CA_BUNDLE"]
            else:
                os.environ["REQUESTS_CA_BUNDLE"] = previous

    return undo


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mint(key: str, audience: str, expires_at: float) -> str:
    """An unsigned-in-effect JWT with the claims Azurite's basic OAuth check reads."""
    now = int(time.time())
    header = {"alg": "HS256", "typ": "JWT"}
    claims = {
        "aud": audience,
        "iss": _ISSUER,
        "iat": now,
        "nbf": now - 1,
        # Rounded up: Azurite checks exp itself, and must not refuse a token
        # before the emulator's own (sub-second) expiry does.
        "exp": math.ceil(expires_at),
        "uti": key,
        "oid": str(uuid.uuid4()),
    }
    body = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
    # Nobody verifies the signature (Azurite's basic level does not): any bytes do.
    return f"{body}.{_b64url(os.urandom(32))}"


def token_claims(authorization: str | None) -> dict[str, Any] | None:
    """The claims of an ``Authorization: Bearer <jwt>`` header; None if it is not one."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    parts = authorization[len("Bearer ") :].strip().split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def expired_token_detail(hooks: Hooks, authorization: str | None) -> str | None:
    """Why a request's bearer token must be refused as expired, or None to let it through.

    Tokens this emulator issued expire when ``hooks`` says so (and are counted
    under ``faults_injected["credentials:expired"]``); any other token by its
    ``exp`` claim.
    """
    claims = token_claims(authorization)
    if claims is None:
        return None
    key = claims.get("uti")
    if isinstance(key, str) and hooks.credentials_expired(key):
        return _EXPIRED_DETAIL
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or time.time() >= exp:
        return _EXPIRED_DETAIL
    return None


def storage_expired_answer(detail: str) -> tuple[int, dict[str, str], bytes]:
    """Azure Storage's answer to an expired bearer token: 401 ``InvalidAuthenticationInfo``.

    The ``WWW-Authenticate`` challenge names the tenant's authority and the
    storage resource, as the service's does (seen in Azure/azure-sdk-for-net#42859
    and Azure/AzureStor#119). Azurite itself still answers an expired token with
    the older 403 ``AuthenticationFailed``, which is why the emulator's blob proxy
    checks expiry first.
    """
    body = (
        '<?xml version="1.0" encoding="utf-8"?><Error><Code>InvalidAuthenticationInfo</Code>'
        "<Message>Server failed to authenticate the request. Please refer to the information in the "
        f"www-authenticate header.</Message><AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail></Error>"
    ).encode()
    headers = {
        "x-ms-error-code": "InvalidAuthenticationInfo",
        "WWW-Authenticate": (
            f"Bearer authorization_uri=https://login.microsoftonline.com/{_ISSUER.rstrip('/').rsplit('/', 1)[1]}"
            f"/oauth2/authorize resource_id={STORAGE_AUDIENCE}"
        ),
        "Content-Type": "application/xml",
    }
    return 401, headers, body


class EmulatorTokenCredential:
    """An azure-core ``TokenCredential`` whose tokens the emulator issues and expires.

    Like azure-identity's credentials it caches one token per resource and asks
    for a new one only when the cached one is about to expire; azure-identity's
    window (5 minutes of a 60-90 minute token) is scaled to the profile's
    ``credential_lifetime_s``: a new token once less than a third of its
    lifetime is left. Each token fetched counts in the emulator's
    ``credentials_issued``.

    Args:
        hooks: The emulator's hooks (they issue and expire the keys).
    """

    def __init__(self, hooks: Hooks) -> None:
        lifetime = hooks.profile.credential_lifetime_s
        if lifetime is None:
            raise RuntimeError(
                "token_credential() needs expiring credentials: start the emulator with "
                "realistic=RealisticProfile(credential_lifetime_s=...)"
            )
        self._hooks = hooks
        self._refresh_before_s = lifetime / 3
        self._lock = threading.Lock()
        self._tokens: dict[str, Any] = {}
        self.fetched: int = 0
        """How many tokens this credential fetched (each audience's first, then each refresh)."""

    def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        """A valid token for the resource of ``scopes[0]`` (``https://storage.azure.com/.default`` …).

        Raises:
            ValueError: No scope given.
        """
        from azure.core.credentials import AccessToken

        if not scopes:
            raise ValueError("get_token needs a scope, such as 'https://storage.azure.com/.default'")
        audience = scopes[0][: -len("/.default")] if scopes[0].endswith("/.default") else scopes[0]
        with self._lock:
            cached = self._tokens.get(audience)
            if cached is None or cached.expires_on - time.time() < self._refresh_before_s:
                issued = self._hooks.issue_credentials()
                token = _mint(issued.access_key_id, audience, issued.expires_at)
                # An int, as azure-core wants; rounded down so the client never
                # believes a token lives longer than the emulator does.
                cached = AccessToken(token, int(issued.expires_at))
                self._tokens[audience] = cached
                self.fetched += 1
            return cached

    def close(self) -> None:
        """Nothing to release (azure-core calls it when a client closes)."""

    def __enter__(self) -> EmulatorTokenCredential:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _IdentityHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without this the body waits for the
    # client's delayed ACK (40 ms on Linux), a stall no cloud endpoint has.
    disable_nagle_algorithm = True
    server: _IdentityServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        url = urlsplit(self.path)
        resource = (parse_qs(url.query).get("resource") or [""])[0]
        secret = self.headers.get("X-IDENTITY-HEADER") or ""
        if url.path != "/msi/token":
            status, payload = 404, {"statusCode": 404, "message": f"No such endpoint: {url.path}"}
        elif not hmac.compare_digest(secret, self.server.secret):
            status, payload = 401, {"statusCode": 401, "message": "The X-IDENTITY-HEADER is missing or wrong."}
        elif not resource:
            status, payload = 400, {"statusCode": 400, "message": "The 'resource' parameter is required."}
        else:
            issued = self.server.hooks.issue_credentials()
            audience = resource[: -len("/.default")] if resource.endswith("/.default") else resource
            status = 200
            payload = {
                "access_token": _mint(issued.access_key_id, audience, issued.expires_at),
                "expires_on": str(int(issued.expires_at)),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": self.server.client_id,
            }
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _IdentityServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hooks: Hooks) -> None:
        super().__init__(("127.0.0.1", 0), _IdentityHandler)
        self.hooks = hooks
        self.secret = secrets.token_urlsafe(24)
        self.client_id = str(uuid.uuid4())


class IdentityEndpoint(ServedInThread):
    """A managed-identity token endpoint for the emulator's tasks (App Service's protocol).

    azure-identity's ``ManagedIdentityCredential`` (and so
    ``DefaultAzureCredential``, and adlfs when given no key) reads
    ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` and fetches its tokens here,
    as a task on a real pool fetches its pool identity's tokens from the
    instance metadata service. Every token is one ``hooks.issue_credentials()``
    and expires with it.

    Args:
        hooks: The emulator's hooks (with ``credential_lifetime_s``).
    """

    def __init__(self, hooks: Hooks) -> None:
        self._identity = _IdentityServer(hooks)
        super().__init__(self._identity, "cloudexec-identity")

    def env(self) -> dict[str, str]:
        """The variables that point azure-identity at this endpoint."""
        return {
            "IDENTITY_ENDPOINT": f"http://127.0.0.1:{self._identity.server_address[1]}/msi/token",
            "IDENTITY_HEADER": self._identity.secret,
        }
