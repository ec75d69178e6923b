"""A running request's token stream: text deltas, stop strings, timeouts, aborts and migration.

`RunningRequest.outputs()` turns the stream into text deltas (incremental detokenization, stop
strings) and ends with one output carrying the finish reason and usage. Every abort goes through
`RunningRequest.close()`: stop string, timeout, client gone.

Request migration: when the worker loses a request the stream carries on from another worker. The
worker is asked whether it still holds the request (dispatch.py, `Dispatcher.holds`) whenever the
stream has been silent for `Timeouts.liveness`; "no responders" (its process died: NATS drops its
subscriptions with its connection), "not running" (restarted) or no answer within `Timeouts.probe`
means lost. So is a gap in the chunk positions (messages lost on the way), an unrequested `abort`
finish (a worker drained with requests still running) and an engine error on the stream. The request
is then re-submitted, with the worker left out, as prompt + every token received so far (`resume`):
the new worker re-prefills that and continues with the budget left (max_tokens, min_tokens) and, for a
seeded request, the seed's draws advanced past the tokens already made. The client's stream only
notices a pause: detokenizer, stop-string matcher and token count live here and carry on. With greedy
decoding the text equals that of an uninterrupted run. Detection takes `liveness` (+ `probe` for a hung
worker): 1 s (3 s) by default.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import msgspec
from tokenizers import Tokenizer

from kvmesh.libs.bus import decode
from kvmesh.libs.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kvmesh.schemas.messages import ErrorReply, Finished, StreamMessage, TokenChunk
from kvmesh.services.gateway.dispatch import Attempt, Dispatcher, Submission, unsubscribe
from kvmesh.services.gateway.errors import GatewayError, error_from_reply
from kvmesh.services.gateway.params import GenerationOutput, GenerationParams, OutputLogprob, Timeouts, Usage

log = logging.getLogger(__name__)

# After a stop string we abort the worker and wait this long at most for its final record, which
# carries the cached-token count; the text is already out by then.
ABORT_GRACE_S = 0.5


def resume(original: Submission, output_ids: list[int], exclude: list[str], n: int) -> Submission | None:
    """The `n`-th continuation of a request after `output_ids` came from workers now in `exclude`:
    prompt + those tokens, the budget that is left, its own stream subject. None if nothing is left."""
    route, gen = original
    done = len(output_ids)
    s = gen.sampling
    remaining = s.max_tokens - done
    if remaining <= 0:
        return None
    sampling = msgspec.structs.replace(
        s,
        max_tokens=remaining,
        min_tokens=max(0, s.min_tokens - done),
        resumed_tokens=s.resumed_tokens + done,
    )
    token_ids = [*gen.token_ids, *output_ids]
    subject = f"{gen.stream_subject}.m{n}"
    gen = msgspec.structs.replace(
        gen, token_ids=token_ids, sampling=sampling, stream_subject=subject, migrated=True
    )
    excluded = [*route.exclude, *(w for w in exclude if w not in route.exclude)]
    route = msgspec.structs.replace(route, num_tokens=len(token_ids), max_tokens=remaining, exclude=excluded)
    return Submission(route, gen)


class RunningRequest:
    """A request a worker has accepted: its token stream, read once, moved on if the worker loses it,
    and its abort."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        tokenizer: Tokenizer,
        params: GenerationParams,
        timeouts: Timeouts,
        submission: Submission,  # as first sent: continuations are derived from it
        attempt: Attempt,  # the worker that accepted it
        *,
        arrival: float,  # loop time the request left the gateway's queue: the timeouts count from it
        max_migrations: int = 3,
    ) -> None:
        self.request_id = submission.generate.request_id
        self.worker_id = attempt.worker_id
        self.num_prompt_tokens = len(submission.generate.token_ids)
        self.migrations = 0
        self._dispatcher = dispatcher
        self._submission = submission
        self._attempt = attempt
        self._timeouts = timeouts
        self._max_migrations = max_migrations
        self._deadline = arrival + timeouts.request
        self._first_token_deadline = arrival + timeouts.first_token
        self._last_message = asyncio.get_running_loop().time()
        self._detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        # Stop strings count from the min_tokens-th token on (as in vLLM): the matcher starts there.
        self._matcher: StopStringMatcher | None = None
        if params.stop and not params.min_tokens:
            self._matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self._want_logprobs = params.logprobs is not None
        self._pending_logprobs: list[OutputLogprob] | None = None  # of tokens that had no text yet
        self._output_ids: list[int] = []  # every token received: what a continuation re-prefills
        self._num_output = 0
        self._offset = 0  # tokens received before the current worker took over
        self._excluded: list[str] = []  # workers that lost this request
        self._text_len = 0  # characters detokenized so far (before stop-string cuts): text_offset
        self._done = False  # the worker has finished, or has been told to abort
        self._closed = False
        self.on_tokens: Callable[[int], None] | None = None  # telemetry: a chunk of n tokens arrived
        self.on_close: Callable[[], None] | None = None  # run once by close(): the flow-control slot

    async def outputs(self) -> AsyncIterator[GenerationOutput]:
        """Text deltas (never empty) and then exactly one final output; raises GatewayError."""
        while True:
            msg = await self._next()
            if type(msg) is TokenChunk:
                if self.on_tokens is not None:
                    self.on_tokens(len(msg.token_ids))
                text, logprobs, stopped = self._consume(msg)
                if stopped:
                    finished = await self._abort_and_wait()
                    yield GenerationOutput(text, logprobs, "stop", self._usage(finished, stopped=True))
                    return
                if text:
                    yield GenerationOutput(text, logprobs)
                elif logprobs:
                    self._pending_logprobs = logprobs  # no text yet: they ride on the next delta
            else:  # Finished
                self._done = True
                tail = self._matcher.flush() if self._matcher is not None else ""
                usage = self._usage(msg, stopped=False)
                yield GenerationOutput(tail, self._take_pending(None), msg.finish_reason, usage)
                return

    def _take_pending(self, logprobs: list[OutputLogprob] | None) -> list[OutputLogprob] | None:
        pending = self._pending_logprobs
        if pending is None:
            return logprobs
        self._pending_logprobs = None
        return pending + logprobs if logprobs else pending

    def _consume(self, chunk: TokenChunk) -> tuple[str, list[OutputLogprob] | None, bool]:
        """Detokenize one chunk: (text safe to emit, its tokens' logprobs, stop string hit)."""
        step = self._detok.step
        self._output_ids.extend(chunk.token_ids)
        if not self._stops and not self._want_logprobs:
            self._num_output += len(chunk.token_ids)
            return "".join([step(t) for t in chunk.token_ids]), None, False
        parts: list[str] = []
        logprobs: list[OutputLogprob] | None = [] if self._want_logprobs else None
        chunk_lps = chunk.logprobs
        stopped = False
        for i, token_id in enumerate(chunk.token_ids):
            self._num_output += 1
            piece = step(token_id)
            if logprobs is not None and chunk_lps is not None and i < len(chunk_lps):
                logprobs.append(OutputLogprob(token_id, self._text_len, chunk_lps[i]))
            self._text_len += len(piece)
            matcher = self._matcher
            if matcher is None:
                if not self._stops or self._num_output < self._min_tokens:
                    parts.append(piece)
                    continue
                matcher = self._matcher = StopStringMatcher(self._stops, self._include_stop)
            match = matcher.feed(piece)
            parts.append(match.emit)
            if match.stopped:
                stopped = True
                break
        if logprobs is not None:
            logprobs = self._take_pending(logprobs)
        return "".join(parts), logprobs, stopped

    async def _next(self) -> TokenChunk | Finished:
        """The next chunk in order, or the final record; moves the request when its worker lost it."""
        loop = asyncio.get_running_loop()
        while True:
            queue = self._attempt.queue
            if not queue.empty():  # the common case under load: no timer at all
                raw = queue.get_nowait()
            else:
                try:
                    async with asyncio.timeout(self._quiet_budget(loop.time())):
                        raw = await queue.get()
                except TimeoutError:
                    finished = await self._on_silence()
                    if finished is not None:
                        return finished
                    continue
            self._last_message = loop.time()
            try:
                msg = decode(raw.data, StreamMessage)
            except msgspec.DecodeError as exc:
                log.warning("%s: dropped a malformed stream message: %s", self.request_id, exc)
                continue
            kind = type(msg)
            if kind is TokenChunk:
                if msg.first_index + self._offset == self._num_output:
                    return msg
                lost = f"its stream skipped from token {self._num_output} to {msg.first_index + self._offset}"
            elif kind is Finished:
                if msg.finish_reason != "abort" or self._done:
                    return msg
                lost = "it aborted the request itself"  # e.g. a drain that ran out of time
            elif msg.code == "internal":
                lost = f"its engine failed: {msg.message}"
            else:
                self._done = True
                raise error_from_reply(msg, f"worker {self.worker_id}")
            finished = await self._migrate(lost)
            if finished is not None:
                return finished

    def _quiet_budget(self, now: float) -> float:
        """How long to wait for the next message before something must be checked."""
        if self._num_output == 0:
            limit = self._first_token_deadline
        else:
            limit = self._last_message + self._timeouts.token
        return max(0.0, min(self._timeouts.liveness, self._deadline - now, limit - now))

    async def _on_silence(self) -> Finished | None:
        """The stream has been quiet: fail on a timeout, carry on if the worker still holds the
        request, else move it."""
        t = self._timeouts
        now = asyncio.get_running_loop().time()
        if now >= self._deadline:
            await self.close()
            raise GatewayError.timeout(
                f"the request exceeded the gateway's time limit ({t.request:g} s)", "request_timeout"
            )
        if self._num_output == 0 and now >= self._first_token_deadline:
            await self.close()
            raise GatewayError.timeout(f"no token within {t.first_token:g} s", "first_token_timeout")
        if self._num_output and now - self._last_message >= t.token:
            await self.close()
            raise GatewayError.timeout(
                f"worker {self.worker_id} sent no token for {t.token:g} s", "token_timeout"
            )
        if await self._dispatcher.holds(self.worker_id, self.request_id):
            return None
        if not self._attempt.queue.empty():  # its last messages arrived while we asked
            return None
        return await self._migrate("it no longer holds the request")

    async def _migrate(self, why: str) -> Finished | None:
        """Continue on another worker. Returns the final record when nothing was left to generate."""
        old = self._attempt
        await self._dispatcher.release(old.worker_id, old.sub, self.request_id)
        if self.migrations >= self._max_migrations:
            self._done = self._closed = True
            raise GatewayError.unavailable(
                f"worker {old.worker_id} lost the request ({why}) after {self.migrations} moves",
                "worker_lost",
            )
        self.migrations += 1
        self._excluded.append(old.worker_id)
        log.warning(
            "%s: worker %s lost it (%s) after %d tokens; moving it (move %d)",
            self.request_id,
            old.worker_id,
            why,
            self._num_output,
            self.migrations,
        )
        submission = resume(self._submission, self._output_ids, self._excluded, self.migrations)
        if submission is None:  # every token arrived, only the final record was lost
            self._done = self._closed = True
            n = self._num_output - self._offset  # _usage adds the offset back
            return Finished(
                finish_reason="length",
                num_prompt_tokens=self.num_prompt_tokens,
                num_output_tokens=n,
                num_cached_tokens=0,
            )
        try:
            self._attempt = await self._dispatcher.dispatch(submission)
        except BaseException:
            self._done = self._closed = True  # nothing is running anywhere
            raise
        self.worker_id = self._attempt.worker_id
        self._offset = self._num_output
        self._last_message = asyncio.get_running_loop().time()
        return None

    async def _abort_and_wait(self) -> Finished | None:
        """Abort the worker (a stop string hit) and wait briefly for its final record."""
        self._done = True
        await self._dispatcher.release(self.worker_id, None, self.request_id)
        queue = self._attempt.queue
        try:
            async with asyncio.timeout(ABORT_GRACE_S):
                while True:
                    msg = decode((await queue.get()).data, StreamMessage)
                    if type(msg) is Finished:
                        return msg
                    if type(msg) is ErrorReply:
                        return None
        except (TimeoutError, msgspec.DecodeError):
            return None

    def _usage(self, finished: Finished | None, stopped: bool) -> Usage:
        if finished is None:  # the worker's final record did not come in time after an abort
            return Usage(self.num_prompt_tokens, self._num_output, 0)
        # After a stop string the worker may have produced more than we used: bill what we used.
        used = self._num_output if stopped else self._offset + finished.num_output_tokens
        # A continuation's prompt holds earlier output too: count only the request's own prompt.
        return Usage(self.num_prompt_tokens, used, min(finished.num_cached_tokens, self.num_prompt_tokens))

    async def collect(self) -> tuple[str, list[OutputLogprob] | None, str, Usage]:
        """The whole completion: (text, logprobs, finish reason, usage)."""
        texts: list[str] = []
        logprobs: list[OutputLogprob] | None = [] if self._want_logprobs else None
        async for out in self.outputs():
            texts.append(out.text)
            if logprobs is not None and out.logprobs:
                logprobs.extend(out.logprobs)
            if out.finish_reason is not None:
                assert out.usage is not None
                return "".join(texts), logprobs, out.finish_reason, out.usage
        raise GatewayError.internal("the token stream ended without a final record")

    async def close(self) -> None:
        """Idempotent: abort the worker unless it has finished, drop the subscription, give the
        flow-control slot back."""
        if self._closed:
            return
        self._closed = True
        if self.on_close is not None:
            self.on_close()
        if not self._done:
            self._done = True
            await self._dispatcher.release(self.worker_id, self._attempt.sub, self.request_id)
        elif self._attempt.sub is not None:
            await unsubscribe(self._attempt.sub)
