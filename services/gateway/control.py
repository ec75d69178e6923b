"""Requests to the tokenizer and router: short tries, hedged onto every replica, within one budget.

Replicas of the tokenizer and of the router share their subjects through a NATS queue group, and the
server hands each request to one member at random. A killed replica leaves the group at once (its
connection closes with it), but a hung one (stopped, or stuck in a blocking call) keeps its
subscription and swallows its share of the requests without a word. Retrying on the queue subject
alone leaves the outcome to chance: with two replicas, one hung, each try lands on the hung one again
with probability 1/2, so three tries still fail one request in eight.

So only the first try goes to the queue subject. A try with no answer within the per-try timeout is
followed by a try on `Subjects.every_replica(subject)`, which every replica also serves without a queue
group: it reaches each live replica and the first answer wins. Earlier tries stay pending (a slow
replica's late answer is as good as any), so the per-try timeout only decides when to hedge, never
when to give up: that is the overall budget (`--bus-timeout`). Replicas that do not serve the
every-replica subject (no responders there) get the queue subject again.

An error answer (`ErrorReply`) while other tries are still pending is held back in case one of them
answers properly: a replica that has just woken up from a stop can answer from a stale view (a router
whose heartbeats are still queued behind the request finds no live worker).

Only idempotent requests come through here: encode, detokenize and route. A route answered by several
replicas adds its tokens to the `assigned_tokens` of the chosen worker in each of them (and a hung
replica that wakes up routes its backlog too): in each router that is gone with the worker's next
heartbeat (1 s by default), which replaces the whole entry. A brief bias in load scoring, not a leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import msgspec

from kvmesh.libs.bus import Bus, BusTimeout, NoResponders
from kvmesh.schemas.messages import ErrorReply, Subjects

log = logging.getLogger(__name__)

# A tokenizer try's timeout grows with the text to encode: a chat template and encode of 1 MiB (the
# default body limit, ~310k tokens) took 0.9-1.6 s on the project's 2-core machine at load 1.5, a
# context-length (8k token) prompt 8 ms; 4 s per MiB is a 2.5-4x margin for a loaded machine.
TOKENIZER_TRY_S_PER_MIB = 4.0
_CHARS_PER_TOKEN_ID = 4  # a token id to detokenize stands for about this much text


def tokenizer_try_timeout(base: float, chars: int = 0, token_ids: int = 0) -> float:
    """The per-try timeout of a tokenizer request over `chars` characters of text and `token_ids` ids."""
    size = chars + _CHARS_PER_TOKEN_ID * token_ids
    return base + TOKENIZER_TRY_S_PER_MIB * size / (1 << 20)


class ControlTimeout(Exception):
    """No try got an answer within the budget."""

    def __init__(self, subject: str, tries: int, try_timeout: float, budget: float) -> None:
        how = (
            f" to {tries} tries {try_timeout:.2g} s apart, the later ones to every replica,"
            if tries > 1
            else ""
        )
        super().__init__(f"{subject}: no answer{how} within {budget:g} s")


class ControlClient:
    """One per gateway process, shared by all requests."""

    def __init__(self, bus: Bus, budget: float, tries: int) -> None:
        self.bus = bus
        self.budget = budget  # seconds for all tries of one call together
        self.tries = max(1, tries)

    async def request(self, subject: str, msg: msgspec.Struct, reply_type: Any, try_timeout: float) -> Any:
        """The first answer of any try. Raises ControlTimeout when none came within the budget,
        else the last try's failure (NoResponders: no replica serves the subject; NATS unreachable;
        a malformed reply)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.budget
        every_replica: str | None = Subjects.every_replica(subject)
        pending: dict[asyncio.Future, str] = {}  # a try in flight -> the subject it went to
        held: ErrorReply | None = None  # a queue try's error answer, while hedged tries may do better
        failure: BaseException | None = None
        sent = 0
        next_try = deadline
        try:
            while True:
                now = loop.time()
                if not pending and (held is not None or sent == self.tries):
                    break
                if now >= deadline:
                    break
                if not pending or (sent < self.tries and now >= next_try):
                    # the first try, a hedge after try_timeout, or the next one at once after a failure
                    target = subject if sent == 0 or every_replica is None else every_replica
                    if sent:
                        log.info("%s: no answer after %d tries; trying %s", subject, sent, target)
                    pending[
                        asyncio.ensure_future(self.bus.request(target, msg, reply_type, deadline - now))
                    ] = target
                    sent += 1
                    next_try = now + try_timeout
                wake = min(next_try, deadline) if sent < self.tries else deadline
                done, _ = await asyncio.wait(
                    pending, timeout=max(0.0, wake - now), return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    target = pending.pop(task)
                    exc = task.exception()
                    if exc is None:
                        reply = task.result()
                        if isinstance(reply, ErrorReply) and target == subject and pending:
                            held = reply
                            continue
                        return reply
                    failure = exc
                    if isinstance(exc, NoResponders) and target == every_replica:
                        every_replica = None  # replicas without the every-replica subject: the queue again
        finally:
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(BaseException):
                    await task
        if held is not None:
            return held
        if failure is None or isinstance(failure, BusTimeout):
            raise ControlTimeout(subject, sent, try_timeout, self.budget)
        raise failure
