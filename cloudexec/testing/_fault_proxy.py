"""A small HTTP reverse proxy that puts the emulator's storage faults in front of a store.

Azurite cannot be told to fail, so in a realistic Azure emulator every blob
request (the client's and the tasks') goes through this proxy::

    azure-storage-blob / adlfs --> FaultProxy (127.0.0.1:<port>) --> Azurite
                                     | hooks.draw_fault("storage")
                                     v
                                   503 ServerBusy / 500 InternalError / TCP reset

Answers are read whole from the store and sent with a Content-Length, so a
fault never leaves half a body behind; a reset drops the connection before the
request reaches the store.

With ``tls`` the proxy speaks HTTPS on both sides and refuses expired bearer
tokens with Azure Storage's own 401 (``InvalidAuthenticationInfo``, a
``WWW-Authenticate`` challenge) before the request reaches the store.
"""

from __future__ import annotations

import http.client
import ssl
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from cloudexec.testing._azure_auth import TlsFiles, expired_token_detail, storage_expired_answer
from cloudexec.testing._hooks import Hooks, ServedInThread, reset_socket

__all__ = ["FaultProxy"]

# Hop-by-hop headers (RFC 9110 section 7.6.1) are not forwarded.
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}

_STORAGE_FAULTS = {
    # Azure Storage's own throttling answer (Storage error codes reference).
    "throttle": (503, "ServerBusy", "The server is currently unable to receive requests. Please retry your request."),
    "error": (500, "InternalError", "The server encountered an internal error. Please retry the request."),
}


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body are two writes: without this the body waits for the
    # client's delayed ACK (40 ms on Linux), a stall no cloud endpoint has.
    disable_nagle_algorithm = True
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if self.server.tls is not None:
            detail = expired_token_detail(self.server.hooks, self.headers.get("Authorization"))
            if detail is not None:
                self._answer(*storage_expired_answer(detail))
                return
        fault = self.server.hooks.draw_fault("storage")
        if fault is not None and fault.kind in ("reset", "lost"):
            if fault.kind == "lost":
                self._exchange(body, length)  # the store acts on it; the answer is lost
            reset_socket(self.connection)
            self.close_connection = True
            return
        if fault is not None:
            status, code, message = _STORAGE_FAULTS[fault.kind]
            data = (
                '<?xml version="1.0" encoding="utf-8"?>'
                f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
            ).encode()
            self._answer(status, {"x-ms-error-code": code, "Content-Type": "application/xml"}, data)
            return
        answer, data = self._exchange(body, length)
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        if self.command == "HEAD":
            self.send_header("Content-Length", answer.getheader("Content-Length") or "0")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
        """Send an error answer of the proxy's own."""
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _exchange(self, body: bytes, length: int) -> tuple[http.client.HTTPResponse, bytes]:
        """Send this request to the store; its answer and body, read whole."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream: http.client.HTTPConnection
        if self.server.client_context is not None:
            upstream = http.client.HTTPSConnection(
                "127.0.0.1", self.server.upstream_port, timeout=60, context=self.server.client_context
            )
        else:
            upstream = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body if body or length else None, headers=headers)
            answer = upstream.getresponse()
            return answer, answer.read()
        finally:
            upstream.close()


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hooks: Hooks, upstream_port: int, tls: TlsFiles | None) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.hooks = hooks
        self.upstream_port = upstream_port
        self.tls = tls
        self.server_context = None if tls is None else tls.server_context()
        self.client_context = None if tls is None else tls.client_context()

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.server_context is not None:
            # The handshake runs here, on the connection's own thread, so a slow
            # or broken client never holds up accepting the next one.
            try:
                wrapped = self.server_context.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
            try:
                super().finish_request(wrapped, client_address)
            finally:
                wrapped.close()
            return
        super().finish_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Dropped client connections are routine here (and some are our own resets).
        pass


class FaultProxy(ServedInThread):
    """Forwards HTTP on a free 127.0.0.1 port to ``upstream_port``, applying storage faults.

    Args:
        hooks: The emulator's hooks (fault rates and counts for ``"storage"``).
        upstream_port: Port of the real store on 127.0.0.1.
        tls: Serve HTTPS with this certificate, reach the store over HTTPS, and
            refuse expired bearer tokens. None: plain HTTP both ways.
    """

    def __init__(self, hooks: Hooks, upstream_port: int, tls: TlsFiles | None = None) -> None:
        proxy = _ProxyServer(hooks, upstream_port, tls)
        super().__init__(proxy, "cloudexec-fault-proxy")
        self.port: int = proxy.server_address[1]
