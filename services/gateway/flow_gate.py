"""A generation request the queue has no place for is refused before anything is read of it.

Flow control's bound (flow.py, `FlowController.refusal`) depends only on the gateway's own counts, not
on the request: so when the queue is full, a POST to a generation route gets its 429 (OpenAI's error
shape, Retry-After from the measured drain rate) as soon as its head is parsed, without reading or
validating its body. Under a burst of hundreds of simultaneous requests the refusals then cost
microseconds each instead of waiting their turn with the body parsing of every other request in the
event loop. A request that passes the gate is still counted by `arrive()` (it may be refused there, a
moment later, as before). Pure ASGI.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from kvmesh.services.gateway.flow import FlowController
from kvmesh.services.gateway.security import send_error


class FlowGate:
    def __init__(self, app: ASGIApp, flow: FlowController, paths: frozenset[str]) -> None:
        self.app = app
        self.flow = flow
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.paths:
            error = self.flow.refusal()
            if error is not None:
                await send_error(send, error, error.headers())
                return
        await self.app(scope, receive, send)
