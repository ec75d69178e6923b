"""Checks that run before a request reaches its handler (pure ASGI: nothing touches streamed chunks).

- `ApiKeyAuth`: `Authorization: Bearer <key>` against any of the configured keys, else 401 in OpenAI's
  error shape. Comparisons are constant-time (hmac.compare_digest over SHA-256 digests, so not even a
  key's length leaks) and every key is compared, so the time does not tell which one matched. /health,
  /ready and /metrics stay open for probes and scrapers. Keys and the Authorization header are never logged.
- `BodyLimit`: a body over `max_bytes` is refused with 413 without being read past the limit (a
  declared Content-Length over it is refused before reading anything).
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvmesh.services.gateway.errors import GatewayError

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})
DRAIN_FACTOR = 4  # an oversized body is read (and dropped) up to this many times the limit


async def send_error(send: Send, error: GatewayError, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    for name, value in (headers or {}).items():
        raw_headers.append((name.lower().encode(), value.encode()))
    await send({"type": "http.response.start", "status": error.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def _digest(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self._digests = [_digest(k.encode()) for k in api_keys]

    def authorized(self, authorization: bytes | None) -> bool:
        if authorization is None:
            return False
        scheme, _, token = authorization.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        offered = _digest(token.strip())
        ok = False
        for digest in self._digests:  # no early exit
            ok |= hmac.compare_digest(offered, digest)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._digests or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        if self.authorized(authorization):
            await self.app(scope, receive, send)
            return
        await send_error(send, GatewayError.unauthorized(), {"WWW-Authenticate": "Bearer"})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.max_bytes:
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, GatewayError.too_large(self.max_bytes), {"Connection": "close"})
            return
        # Read the body here (at most max_bytes of it), then hand it on in one message; later
        # receive() calls go to the server, so the app still hears about a disconnect.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(receive, send, message)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                message, whole = whole, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, receive: Receive, send: Send, message: Message) -> None:
        """413 for a body that grew past the limit. The rest is read and dropped first (up to a few
        times the limit, memory stays flat): a client still sending would miss an early answer."""
        size = 0
        while message.get("more_body", False) and size < DRAIN_FACTOR * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
        await send_error(send, GatewayError.too_large(self.max_bytes), {"Connection": "close"})
