"""Who may use the HTTP process: the bearer token, its check, and the security headers.

Apart from :mod:`dicomnode.http.app` (the endpoints) because access control is one concern that
every path shares: :class:`Guard` wraps the whole application, and ``POST /api/retry`` checks the
token again itself (Bearer only). The token travels in the ``Authorization`` header, never in a
cookie, so another site cannot make a browser send it (CSRF); with ``http.token_file`` set, every
path but ``/healthz`` needs it, as ``Bearer`` or as the password of HTTP Basic (what a browser can
send for pages).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from pathlib import Path

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dicomnode.errors import ConfigurationError

logger = logging.getLogger("dicomnode.http.app")  # the HTTP process's lines keep one logger name

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def read_token(path: Path | None) -> str | None:
    """The bearer token from ``http.token_file`` (None when not configured)."""
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError("http.token_file", f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(token) < 16:
        raise ConfigurationError("http.token_file", f"{path} must hold a token of at least 16 characters")
    return token


def presented_token(request: Request, *, allow_basic: bool) -> str | None:
    """The token in the Authorization header: ``Bearer T`` or (pages only) Basic with password T."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if allow_basic and scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def token_valid(token: str | None, expected: str | None) -> bool:
    """Whether a token was presented and equals the configured one (compared in constant time)."""
    return token is not None and expected is not None and hmac.compare_digest(token, expected)


class Guard:
    """Token check (when configured) and the security headers on every response.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware costs a task group and a stream per
    request, which a client polling at 10 Hz would take from reception's CPUs.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    if name not in headers:
                        headers[name] = value
            await send(message)

        request = Request(scope)
        needs_token = self.token is not None and scope["path"] != "/healthz"
        if needs_token and not token_valid(
            presented_token(request, allow_basic=request.method == "GET"), self.token
        ):
            logger.info("HTTP %s %s refused: no valid token", request.method, scope["path"])
            refusal = JSONResponse(
                {"error": "a bearer token is required (http.token_file)"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="dicomnode", Basic realm="dicomnode"'},
            )
            await refusal(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)
