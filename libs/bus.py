"""The message bus: typed msgspec messages over NATS (nats-py).

- request/reply with typed replies; queue groups so replicas of a service share the work;
- strict decoding: a malformed message is logged and dropped (requests get an ErrorReply), a handler
  that raises answers ErrorReply(code="internal"): nothing on the wire can crash a service;
- W3C trace context travels in NATS headers (OpenTelemetry's propagator; a no-op until a tracer
  provider is configured); inside a request's trace, requests get a CLIENT span and handlers a SERVER
  span (libs/tracing.py); every request's latency lands in kvmesh:nats_request_seconds{subject};
- reconnects forever with backoff; for RECONNECT_SETTLE_S after a reconnect, "no responders" is
  retried within the request's timeout (the other clients are still re-subscribing after a server
  restart: the service is not gone); `close()` drains subscriptions so in-flight handlers finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from kvmesh.libs import tracing
from kvmesh.libs.credentials import NatsAuth
from kvmesh.libs.metrics import NATS_REQUEST_SECONDS, subject_label
from kvmesh.schemas.messages import ErrorReply, Message

log = logging.getLogger(__name__)
T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, typ: type[T]) -> T:
    dec = _decoders.get(typ)
    if dec is None:
        dec = _decoders[typ] = msgspec.msgpack.Decoder(typ)
    return dec.decode(data)


class BusError(RuntimeError):
    """A request could not be completed over the bus."""


class BusTimeout(BusError):
    pass


class NoResponders(BusError):
    """Nobody subscribes to the subject (the service is down or not started yet)."""


def _headers() -> dict[str, str] | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def context_of(msg: Msg) -> otel_context.Context:
    """The trace context a message carried (for the handler to parent its spans on)."""
    return propagate.extract(msg.headers or {})


Handler = Callable[[Any, Msg], Awaitable[Message | None]]


# Right after a reconnect (a restarted server, a network blip) the other clients are still
# reconnecting and re-subscribing: for this long "no responders" means "not back yet", not "gone",
# and requests retry it (within their own timeout).
RECONNECT_SETTLE_S = 2.0


class Bus:
    def __init__(self, nc: nats.NATS, name: str) -> None:
        self.nc = nc
        self.name = name
        self._subs: list[Subscription] = []
        self.reconnected_at = -RECONNECT_SETTLE_S  # monotonic time of the last reconnect

    @classmethod
    async def connect(
        cls,
        url: str,
        name: str,
        *,
        auth: NatsAuth | None = None,
        connect_timeout: float = 5.0,
    ) -> Bus:
        """Connect and keep reconnecting forever. `auth`: user/password, token, credentials file and
        TLS (default: from KVMESH_NATS_* in the environment, see libs/credentials.py). Credentials the
        server refuses on the first connection raise BusError at once (nats-py would retry forever), and
        so does a server certificate that fails TLS verification (the BusError's __cause__ is the
        ssl.SSLCertVerificationError): no retry can make an untrusted server trusted."""
        auth = NatsAuth.from_env() if auth is None else auth
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_disconnect() -> None:
            log.info("%s: disconnected from NATS", name)

        async def on_reconnect() -> None:
            bus.reconnected_at = time.monotonic()  # `bus` exists by then: reconnects follow connect()
            log.info("%s: reconnected to NATS", name)

        async def on_error(exc: Exception) -> None:
            log.warning("%s: NATS error: %r", name, exc)
            refusal = "authorization violation" in str(exc).lower()
            if (refusal or isinstance(exc, ssl.SSLCertVerificationError)) and not refused.done():
                refused.set_result(exc)

        connecting = asyncio.ensure_future(
            nats.connect(
                servers=url.split(","),
                name=name,
                connect_timeout=connect_timeout,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
                **auth.connect_options(),
            )
        )
        await asyncio.wait({connecting, refused}, return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(BaseException):
                await connecting
            exc = refused.result()
            if isinstance(exc, ssl.SSLCertVerificationError):
                what = f"{name}: the NATS server's TLS certificate failed verification: {exc.verify_message}"
                raise BusError(what) from exc
            raise BusError(f"{name}: NATS refused the credentials: {exc}")
        bus = cls(connecting.result(), name)
        return bus

    # -- client side ----------------------------------------------------------------------------
    async def publish(self, subject: str, msg: Message, *, traced: bool = True) -> None:
        """`traced=False` for per-token traffic: no trace headers to encode and parse per chunk."""
        await self.nc.publish(subject, encode(msg), headers=_headers() if traced else None)

    async def request(self, subject: str, msg: Message, reply_type: type[T], timeout: float = 5.0) -> T:
        label = subject_label(subject)
        span = tracing.client_span(label, subject)
        token = otel_context.attach(trace.set_span_in_context(span)) if span is not None else None
        start = time.perf_counter()
        error: str | None = None
        try:
            reply = await self._request(subject, encode(msg), timeout)
        except NoRespondersError:
            error = f"no service answers on {subject}"
            raise NoResponders(error) from None
        except NatsTimeoutError:
            error = f"{subject}: no reply within {timeout:.1f} s"
            raise BusTimeout(error) from None
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            NATS_REQUEST_SECONDS.labels(label).observe(time.perf_counter() - start)
            if span is not None:
                otel_context.detach(token)
                tracing.end_span(span, error)
        try:
            return decode(reply.data, reply_type)
        except msgspec.DecodeError as exc:
            raise BusError(f"{subject}: malformed reply: {exc}") from None

    async def _request(self, subject: str, data: bytes, timeout: float) -> Msg:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return await self.nc.request(subject, data, timeout=timeout, headers=_headers())
            except NoRespondersError:
                now = time.monotonic()
                if now - self.reconnected_at > RECONNECT_SETTLE_S or deadline - now < 0.2:
                    raise
            await asyncio.sleep(0.1)
            timeout = deadline - time.monotonic()

    # -- server side ----------------------------------------------------------------------------
    async def serve(
        self, subject: str, request_type: Any, handler: Handler, queue: str | None = None
    ) -> Subscription:
        """Answer requests on `subject` with handler(decoded, raw) -> reply. Replicas sharing `queue`
        split the requests. A message that is not a valid `request_type` is dropped (and answered
        with ErrorReply if it expects a reply)."""
        label = subject_label(subject)

        async def cb(raw: Msg) -> None:
            try:
                req = decode(raw.data, request_type)
            except msgspec.DecodeError as exc:
                log.warning("%s: dropped malformed message on %s: %s", self.name, raw.subject, exc)
                await self._reply(
                    raw, ErrorReply(code="invalid_request", message=f"malformed message: {exc}")
                )
                return
            ctx = context_of(raw)
            span = tracing.server_span(label, raw.subject, ctx)
            if span is not None:
                ctx = trace.set_span_in_context(span, ctx)
            token = otel_context.attach(ctx)
            error: str | None = None
            try:
                reply = await handler(req, raw)
            except Exception as exc:
                log.exception("%s: handler for %s failed", self.name, raw.subject)
                reply = ErrorReply(code="internal", message=f"{type(exc).__name__}: {exc}")
            finally:
                otel_context.detach(token)
            if span is not None:
                if isinstance(reply, ErrorReply):
                    span.set_attribute(tracing.ERROR_CODE, reply.code)
                    error = f"{reply.code}: {reply.message}"
                tracing.end_span(span, error)
            if reply is not None:
                await self._reply(raw, reply)

        sub = await self.nc.subscribe(subject, queue=queue or "", cb=cb)
        self._subs.append(sub)
        await self.nc.flush()  # the server knows the subscription before serve() returns
        return sub

    async def _reply(self, raw: Msg, reply: Message) -> None:
        if raw.reply:
            try:
                await self.nc.publish(raw.reply, encode(reply))
            except Exception as exc:  # the requester is gone or NATS is reconnecting: nothing to do
                log.debug("%s: reply on %s failed: %r", self.name, raw.subject, exc)

    async def listen(self, subject: str, msg_type: Any, queue_size: int = 0) -> AsyncIterator[Any]:
        """Decoded messages published on `subject`, in order, until the consumer stops iterating.
        Malformed messages are logged and skipped."""
        q: asyncio.Queue[Msg] = asyncio.Queue(queue_size)
        sub = await self.nc.subscribe(subject, cb=q.put)
        await self.nc.flush()
        try:
            while True:
                raw = await q.get()
                try:
                    yield decode(raw.data, msg_type)
                except msgspec.DecodeError as exc:
                    log.warning("%s: dropped malformed message on %s: %s", self.name, subject, exc)
        finally:
            await _quiet_unsubscribe(sub)

    async def subscribe_queue(
        self, subject: str, confirm: bool = True
    ) -> tuple[Subscription, asyncio.Queue[Msg]]:
        """A raw subscription feeding a queue (for token streams the caller decodes itself).

        `confirm` waits for the server to have it (a PING round trip). Not needed when what will be
        published there answers a message this connection sends afterwards: a NATS server handles one
        connection's commands in order, so it registers the SUB before it routes that message."""
        q: asyncio.Queue[Msg] = asyncio.Queue()
        sub = await self.nc.subscribe(subject, cb=q.put)
        if confirm:
            await self.nc.flush()
        return sub, q

    async def close(self) -> None:
        """Drain: stop taking new messages, let in-flight handlers finish, then disconnect."""
        if self.nc.is_closed:
            return
        try:
            await self.nc.drain()
        except Exception as exc:
            log.debug("%s: drain failed: %r", self.name, exc)
            await self.nc.close()


async def _quiet_unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # connection already closed
        log.debug("unsubscribe failed: %r", exc)
