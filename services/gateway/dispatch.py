"""Getting a request onto a worker, and asking a worker whether it still holds one.

`Dispatcher.dispatch` routes, subscribes to the stream subject, then submits. A worker that is gone
(no responders), silent (no reply in time) or full (`overloaded`) is aborted, left out and the router
asked again, up to DISPATCH_ATTEMPTS workers. While a worker has not yet accepted, its status subject
is checked every `Timeouts.liveness`: one that died holding the request is not waited for until the
bus timeout. Every submission streams on a subject of its own
(`<stream subject>.<n>` after the first), so nothing a former worker still sends can reach the request.
When every worker tried was full the client gets 429 with Retry-After; when none was left, 503.

Tokenizer and router requests go through `Dispatcher.ask` (control.py: short tries, hedged onto every
replica, within the bus timeout), so a hung replica costs a request one try timeout, not a failure.

`Dispatcher.holds` is the liveness probe of request migration (generation.py): a killed worker's NATS
connection closes with its process, so the server answers "no responders" at once; a restarted worker
(same id, empty engine) answers "not running"; a hung one does not answer within `Timeouts.probe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, NamedTuple

import msgspec
from nats.aio.subscription import Subscription

from kvmesh.libs.bus import Bus, BusError, BusTimeout, NoResponders
from kvmesh.schemas.messages import (
    AbortRequest,
    ErrorReply,
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    RequestStatusQuery,
    RequestStatusReply,
    RouteRequest,
    RouteResult,
    Subjects,
)
from kvmesh.services.gateway.control import ControlClient, ControlTimeout
from kvmesh.services.gateway.errors import RETRY_AFTER_S, GatewayError, error_from_reply
from kvmesh.services.gateway.params import Timeouts

log = logging.getLogger(__name__)

DISPATCH_ATTEMPTS = 3  # workers tried per dispatch before giving up (429 or 503)


class Submission(NamedTuple):
    """What the router and a worker are asked for one request (or for its continuation)."""

    route: RouteRequest
    generate: GenerateRequest


class Attempt(NamedTuple):
    """A worker that accepted the request, and the stream it answers on."""

    worker_id: str
    sub: Subscription | None  # None: the caller feeds the queue itself (tests)
    queue: asyncio.Queue  # raw NATS messages of the stream subject


class Dispatcher:
    """One per gateway process, shared by all requests."""

    def __init__(self, bus: Bus, timeouts: Timeouts) -> None:
        self.bus = bus
        self.timeouts = timeouts
        self.control = ControlClient(bus, timeouts.bus, timeouts.control_tries)

    async def dispatch(self, submission: Submission) -> Attempt:
        """Route and submit; raises GatewayError when no worker takes the request."""
        route_req, gen_req = submission
        base_subject = gen_req.stream_subject
        overloaded: list[str] = []
        failure = ""
        for n in range(DISPATCH_ATTEMPTS):
            route = await self.ask(
                "router",
                Subjects.ROUTER_ROUTE,
                route_req,
                RouteResult,
                self.timeouts.router_try,
                no_workers_ok=True,
            )
            if isinstance(route, ErrorReply):  # no_workers: every live worker is excluded already
                break
            worker_id = route.worker_id
            # disaggregated: the router also named a prefill worker for the prompt's blocks
            gen_req = msgspec.structs.replace(gen_req, prefill_worker_id=route.prefill_worker_id)
            if n:
                gen_req = msgspec.structs.replace(gen_req, stream_subject=f"{base_subject}.{n}")
            # unconfirmed: the worker streams only once it has our generate request, sent after the SUB
            sub, queue = await self.bus.subscribe_queue(gen_req.stream_subject, confirm=False)
            try:
                reply = await self._submit(worker_id, gen_req)
            except (NoResponders, BusTimeout) as exc:
                # A worker that timed out may have accepted after all: abort it there.
                await self.release(worker_id, sub, gen_req.request_id)
                failure = str(exc)
            except BaseException as exc:  # also cancellation: the client left while we dispatched
                await self.release(worker_id, sub, gen_req.request_id)
                if isinstance(exc, Exception):
                    raise self.bus_failure(f"worker {worker_id}", exc) from None
                raise
            else:
                if isinstance(reply, GenerateAccepted):
                    return Attempt(worker_id, sub, queue)
                await unsubscribe(sub)
                if reply.code != "overloaded":
                    raise error_from_reply(reply, f"worker {worker_id}")
                overloaded.append(worker_id)
                failure = reply.message
            log.warning(
                "%s: worker %s did not take it (%s); routing again", gen_req.request_id, worker_id, failure
            )
            route_req = msgspec.structs.replace(route_req, exclude=[*route_req.exclude, worker_id])
        if overloaded:
            raise GatewayError.overloaded(
                f"every worker tried is at capacity ({', '.join(overloaded)}); retry later", RETRY_AFTER_S
            )
        raise GatewayError.unavailable(
            f"no worker took the request{': ' + failure if failure else ''}", "no_workers", RETRY_AFTER_S
        )

    async def _submit(self, worker_id: str, gen_req: GenerateRequest) -> GenerateAccepted | ErrorReply:
        """`generate`, waiting up to the bus timeout for the acceptance (the engine takes requests
        between two steps, which can be slow under load), but not for a worker that has died after
        receiving it: while waiting, its status subject is checked every `liveness` seconds."""
        subject = Subjects.worker(worker_id, "generate")
        reply = asyncio.ensure_future(self.bus.request(subject, gen_req, GenerateResult, self.timeouts.bus))
        try:
            while True:
                done, _ = await asyncio.wait({reply}, timeout=self.timeouts.liveness)
                if done:
                    return reply.result()
                if await self._gone(worker_id):
                    raise NoResponders(f"worker {worker_id} died before accepting the request")
        finally:
            if not reply.done():
                reply.cancel()
                with contextlib.suppress(BaseException):
                    await reply

    async def _gone(self, worker_id: str) -> bool:
        """True only when nobody listens on the worker's subjects any more."""
        query = RequestStatusQuery(request_id="")
        subject = Subjects.worker(worker_id, "status")
        try:
            await self.bus.request(subject, query, RequestStatusReply | ErrorReply, self.timeouts.probe)
        except NoResponders:
            return True
        except Exception:
            return False
        return False

    async def holds(self, worker_id: str, request_id: str) -> bool:
        """False when the worker is gone, has lost the request or does not answer in time."""
        query = RequestStatusQuery(request_id=request_id)
        subject = Subjects.worker(worker_id, "status")
        try:
            reply = await self.bus.request(
                subject, query, RequestStatusReply | ErrorReply, self.timeouts.probe
            )
        except (NoResponders, BusTimeout):
            return False
        except Exception as exc:  # NATS itself unreachable: a move would fail the same way; wait
            log.debug("%s: probing worker %s failed: %r", request_id, worker_id, exc)
            return True
        return not isinstance(reply, RequestStatusReply) or reply.running

    async def release(self, worker_id: str, sub: Subscription | None, request_id: str) -> None:
        """Drop the stream subscription and abort the request on the worker (harmless if it is gone)."""
        if sub is not None:
            await unsubscribe(sub)
        await publish_abort(self.bus, worker_id, request_id)

    async def ask(
        self,
        service: str,
        subject: str,
        msg: msgspec.Struct,
        reply_type: Any,
        try_timeout: float,
        no_workers_ok: bool = False,
    ) -> Any:
        """A tokenizer or router request (idempotent: tried again, and hedged onto every replica, when
        a try is not answered within `try_timeout`; control.py) whose ErrorReply or failure becomes a
        GatewayError (a router's `no_workers` is returned instead when `no_workers_ok`)."""
        try:
            reply = await self.control.request(subject, msg, reply_type, try_timeout)
        except ControlTimeout as exc:
            raise GatewayError.unavailable(
                f"the {service} service did not answer: {exc}", "service_timeout", RETRY_AFTER_S
            ) from None
        except Exception as exc:
            raise self.bus_failure(service, exc) from None
        if isinstance(reply, ErrorReply) and not (no_workers_ok and reply.code == "no_workers"):
            raise error_from_reply(reply, service)
        return reply

    def bus_failure(self, service: str, exc: Exception) -> GatewayError:
        if isinstance(exc, NoResponders | BusTimeout):
            return GatewayError.unavailable(f"the {service} service is unavailable: {exc}", "unavailable", 1)
        if isinstance(exc, BusError):
            return GatewayError.internal(f"{service}: {exc}")
        # nats-py's own errors (connection closed, reconnecting, ...) escape Bus.request
        if not self.bus.nc.is_connected:
            return GatewayError.unavailable("the message bus (NATS) is unreachable", "unavailable", 1)
        return GatewayError.internal(f"{service}: {type(exc).__name__}: {exc}")


async def publish_abort(bus: Bus, worker_id: str, request_id: str) -> None:
    try:
        await bus.publish(Subjects.worker(worker_id, "abort"), AbortRequest(request_id=request_id))
    except Exception as exc:  # NATS down: the worker's own timeouts must reclaim the request
        log.warning("%s: abort to worker %s failed: %r", request_id, worker_id, exc)


async def unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # the connection is closed already
        log.debug("unsubscribe failed: %r", exc)
