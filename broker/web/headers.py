"""The response headers a hospital's security scan looks for, on every response of the HTTP server.

* ``Content-Security-Policy``: scripts, styles, images and connections from the broker's own origin
  only, no inline script or style, no plug-ins, no framing (``frame-ancestors 'none'``); the board's
  page loads everything from ``/static``.
* ``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
* ``Cache-Control: no-store`` on ``/api/*`` (patient data, the live stream included): nothing is kept
  in a browser's or a proxy's cache.
* ``Strict-Transport-Security`` on responses sent over TLS only (over plain HTTP a browser ignores it,
  and it must not suggest that the plain port is safe).

uvicorn sends no ``Server`` header (``server_header=False`` in :mod:`broker.web.server`). Pure ASGI:
only the start of the response is touched, so the live stream is not buffered.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
                           "frame-ancestors 'none'")
HSTS = "max-age=31536000"
_ALWAYS = ((b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
           (b"x-content-type-options", b"nosniff"),
           (b"referrer-policy", b"no-referrer"))
_SET_HERE = {name for name, _ in _ALWAYS} | {b"cache-control", b"strict-transport-security", b"server"}


class SecurityHeaders:
    """Sets the security headers on every HTTP response (replacing any the route set)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = list(_ALWAYS)
        patient_data = scope.get("path", "").startswith("/api/")
        if scope.get("scheme") == "https":
            extra.append((b"strict-transport-security", HSTS.encode()))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                dropped = _SET_HERE if patient_data else _SET_HERE - {b"cache-control"}
                kept = [(name, value) for name, value in headers if name.lower() not in dropped]
                if patient_data:
                    kept.append((b"cache-control", b"no-store"))
                message = {**message, "headers": kept + extra}
            await send(message)

        await self.app(scope, receive, send_with_headers)
