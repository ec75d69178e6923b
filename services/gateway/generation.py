"""One request's way through the mesh: encode -> route -> generate -> read the token stream.

`Generator.start` does everything that can still fail with a plain HTTP status (bad prompt, no
worker): it returns a `RunningRequest` only once a worker has accepted the request, subscribed to its
stream beforehand so that no token is missed. `RunningRequest.outputs()` turns the stream into text
deltas (incremental detokenization, stop strings) and ends with one output carrying the finish reason
and usage. Every abort goes through `RunningRequest.close()`: stop string, timeout, client gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import msgspec
from nats.aio.subscription import Subscription
from tokenizers import Tokenizer

from kvmesh.libs.bus import Bus, BusError, BusTimeout, NoResponders, decode
from kvmesh.libs.detokenizer import IncrementalDetokenizer, StopStringMatcher
from kvmesh.schemas.messages import (
    AbortRequest,
    DetokenizeRequest,
    DetokenizeResult,
    EncodeReply,
    EncodeRequest,
    EncodeResult,
    ErrorReply,
    Finished,
    GenerateAccepted,
    GenerateRequest,
    GenerateResult,
    RouteRequest,
    RouteResult,
    SamplingOptions,
    StreamMessage,
    Subjects,
    TokenChunk,
)
from kvmesh.services.gateway.errors import GatewayError, error_from_reply
from kvmesh.services.gateway.params import (
    GenerationOutput,
    GenerationParams,
    OutputLogprob,
    PromptInput,
    Timeouts,
    Usage,
)

log = logging.getLogger(__name__)

# After a stop string we abort the worker and wait this long at most for its final record, which
# carries the cached-token count; the text is already out by then.
ABORT_GRACE_S = 0.5


class Generator:
    """Starts requests on the mesh. One per gateway process; shared by all requests."""

    def __init__(self, bus: Bus, tokenizer: Tokenizer, max_model_len: int, timeouts: Timeouts) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.timeouts = timeouts

    async def encode(self, request_id: str, prompt: PromptInput) -> EncodeReply:
        req = EncodeRequest(
            request_id=request_id,
            messages=prompt.messages,
            prompt=prompt.text,
            token_ids=prompt.token_ids,
            add_generation_prompt=prompt.add_generation_prompt,
        )
        return await self._ask("tokenizer", Subjects.TOKENIZER_ENCODE, req, EncodeResult)

    async def detokenize(self, token_ids: list[int]) -> str:
        req = DetokenizeRequest(token_ids=token_ids)
        reply = await self._ask("tokenizer", Subjects.TOKENIZER_DETOKENIZE, req, DetokenizeResult)
        return reply.text

    async def start(self, request_id: str, prompt: PromptInput, params: GenerationParams) -> RunningRequest:
        deadline = asyncio.get_running_loop().time() + self.timeouts.request
        encoded = await self.encode(request_id, prompt)
        num_prompt = len(encoded.token_ids)
        max_tokens = self._max_tokens(num_prompt, params)
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            min_tokens=params.min_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            seed=params.seed,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
        )
        route_req = RouteRequest(
            request_id=request_id,
            num_tokens=num_prompt,
            max_tokens=max_tokens,
            block_hashes=encoded.block_hashes,
            session_id=params.session_id,
        )
        gen_req = GenerateRequest(
            request_id=request_id,
            token_ids=encoded.token_ids,
            sampling=sampling,
            stream_subject=Subjects.stream(request_id),
        )
        worker_id, sub, queue = await self._dispatch(route_req, gen_req)
        return RunningRequest(
            self.bus,
            self.tokenizer,
            params,
            self.timeouts,
            request_id=request_id,
            worker_id=worker_id,
            sub=sub,
            queue=queue,
            num_prompt_tokens=num_prompt,
            deadline=deadline,
        )

    def _max_tokens(self, num_prompt: int, params: GenerationParams) -> int:
        """The completion budget: as asked, or the rest of the context; 400 if it does not fit."""
        limit = self.max_model_len
        wanted = params.max_tokens
        if wanted is None and num_prompt >= limit:
            asked = f"{num_prompt} tokens in the prompt alone"
        elif wanted is not None and num_prompt + wanted > limit:
            asked = f"{num_prompt + wanted} tokens ({num_prompt} in the prompt, {wanted} for the completion)"
        else:
            max_tokens = wanted if wanted is not None else limit - num_prompt
            if params.min_tokens > max_tokens:
                message = f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({max_tokens})"
                raise GatewayError.invalid(message, "min_tokens")
            return max_tokens
        raise GatewayError.invalid(
            f"This model's maximum context length is {limit} tokens. However, you requested {asked}. "
            f"Please reduce the length of the {params.prompt_param} or of max_tokens.",
            params.prompt_param,
            "context_length_exceeded",
        )

    async def _dispatch(
        self, route_req: RouteRequest, gen_req: GenerateRequest
    ) -> tuple[str, Subscription, asyncio.Queue]:
        """Route, subscribe to the stream, hand the request to the worker; if that worker is gone,
        route once more without it. Returns (worker id, subscription, queue of raw stream messages)."""
        route = await self._ask("router", Subjects.ROUTER_ROUTE, route_req, RouteResult)
        for attempt in (1, 2):
            worker_id = route.worker_id
            sub, queue = await self.bus.subscribe_queue(gen_req.stream_subject)
            try:
                reply = await self.bus.request(
                    Subjects.worker(worker_id, "generate"), gen_req, GenerateResult, self.timeouts.bus
                )
            except (NoResponders, BusTimeout) as exc:
                failure: BusError = exc
            except BaseException as exc:  # also cancellation: the client left while we dispatched
                await self._release(sub, worker_id, gen_req.request_id)
                if isinstance(exc, Exception):
                    raise self._bus_failure(f"worker {worker_id}", exc) from None
                raise
            else:
                if isinstance(reply, GenerateAccepted):
                    return worker_id, sub, queue
                await _unsubscribe(sub)
                raise error_from_reply(reply, f"worker {worker_id}")
            # A worker that timed out may still have accepted: abort it there, and give the retry its
            # own stream subject so that nothing the first worker sent can reach this request.
            await self._release(sub, worker_id, gen_req.request_id)
            if attempt == 2:
                raise GatewayError.unavailable(f"no worker took the request: {failure}")
            log.warning("%s: worker %s failed (%s); routing again", gen_req.request_id, worker_id, failure)
            retry_route = msgspec.structs.replace(route_req, exclude=[*route_req.exclude, worker_id])
            route = await self._ask("router", Subjects.ROUTER_ROUTE, retry_route, RouteResult)
            gen_req = msgspec.structs.replace(gen_req, stream_subject=gen_req.stream_subject + ".retry")
        raise AssertionError("unreachable")

    async def _release(self, sub: Subscription, worker_id: str, request_id: str) -> None:
        await _unsubscribe(sub)
        await _publish_abort(self.bus, worker_id, request_id)

    async def _ask(self, service: str, subject: str, msg: msgspec.Struct, reply_type):
        """A control-plane request whose ErrorReply or failure becomes a GatewayError."""
        try:
            reply = await self.bus.request(subject, msg, reply_type, self.timeouts.bus)
        except Exception as exc:
            raise self._bus_failure(service, exc) from None
        if isinstance(reply, ErrorReply):
            raise error_from_reply(reply, service)
        return reply

    def _bus_failure(self, service: str, exc: Exception) -> GatewayError:
        if isinstance(exc, NoResponders | BusTimeout):
            return GatewayError.unavailable(f"the {service} service is unavailable: {exc}")
        if isinstance(exc, BusError):
            return GatewayError.internal(f"{service}: {exc}")
        # nats-py's own errors (connection closed, reconnecting, ...) escape Bus.request
        if not self.bus.nc.is_connected:
            return GatewayError.unavailable("the message bus (NATS) is unreachable")
        return GatewayError.internal(f"{service}: {type(exc).__name__}: {exc}")


class RunningRequest:
    """A request a worker has accepted: its token stream, read once, and its abort."""

    def __init__(
        self,
        bus: Bus,
        tokenizer: Tokenizer,
        params: GenerationParams,
        timeouts: Timeouts,
        *,
        request_id: str,
        worker_id: str,
        sub: Subscription | None,  # None: the caller owns the queue's feed (tests)
        queue: asyncio.Queue,  # raw NATS messages of the request's stream subject
        num_prompt_tokens: int,
        deadline: float,  # loop time by which the request must have finished
    ) -> None:
        self.request_id = request_id
        self.worker_id = worker_id
        self.num_prompt_tokens = num_prompt_tokens
        self._bus = bus
        self._sub = sub
        self._queue = queue
        self._deadline = deadline
        self._token_timeout = timeouts.token
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
        self._num_output = 0
        self._text_len = 0  # characters detokenized so far (before stop-string cuts): text_offset
        self._done = False  # the worker has finished, or has been told to abort
        self._closed = False
        self.on_tokens: Callable[[int], None] | None = None  # telemetry: a chunk of n tokens arrived

    async def outputs(self) -> AsyncIterator[GenerationOutput]:
        """Text deltas (never empty) and then exactly one final output; raises GatewayError."""
        while True:
            msg = await self._next()
            kind = type(msg)
            if kind is TokenChunk:
                if msg.first_index != self._num_output:  # core NATS dropped or repeated a chunk
                    await self.close()
                    raise GatewayError.internal(
                        f"worker {self.worker_id}'s stream skipped from token {self._num_output} "
                        f"to {msg.first_index}"
                    )
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
            elif kind is Finished:
                self._done = True
                tail = self._matcher.flush() if self._matcher is not None else ""
                usage = self._usage(msg, stopped=False)
                yield GenerationOutput(tail, self._take_pending(None), msg.finish_reason, usage)
                return
            elif kind is ErrorReply:
                self._done = True
                raise error_from_reply(msg, f"worker {self.worker_id}")

    def _take_pending(self, logprobs: list[OutputLogprob] | None) -> list[OutputLogprob] | None:
        pending = self._pending_logprobs
        if pending is None:
            return logprobs
        self._pending_logprobs = None
        return pending + logprobs if logprobs else pending

    def _consume(self, chunk: TokenChunk) -> tuple[str, list[OutputLogprob] | None, bool]:
        """Detokenize one chunk: (text safe to emit, its tokens' logprobs, stop string hit)."""
        step = self._detok.step
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

    async def _next(self) -> TokenChunk | Finished | ErrorReply:
        queue = self._queue
        while True:
            if not queue.empty():  # the common case under load: no timer at all
                raw = queue.get_nowait()
            else:
                now = asyncio.get_running_loop().time()
                wait = min(self._token_timeout, self._deadline - now)
                try:
                    async with asyncio.timeout(wait):
                        raw = await queue.get()
                except TimeoutError:
                    await self.close()
                    if self._deadline - now <= self._token_timeout:
                        raise GatewayError.timeout("the request exceeded the gateway's time limit") from None
                    raise GatewayError.timeout(
                        f"worker {self.worker_id} sent no token for {self._token_timeout:.0f} s"
                    ) from None
            try:
                return decode(raw.data, StreamMessage)
            except msgspec.DecodeError as exc:
                log.warning("%s: dropped a malformed stream message: %s", self.request_id, exc)

    async def _abort_and_wait(self) -> Finished | None:
        """Abort the worker (a stop string hit) and wait briefly for its final record."""
        self._done = True
        await _publish_abort(self._bus, self.worker_id, self.request_id)
        try:
            async with asyncio.timeout(ABORT_GRACE_S):
                while True:
                    msg = decode((await self._queue.get()).data, StreamMessage)
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
        used = self._num_output if stopped else finished.num_output_tokens
        return Usage(finished.num_prompt_tokens, used, finished.num_cached_tokens)

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
        """Idempotent: abort the worker unless it has finished, and drop the subscription."""
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._done = True
            await _publish_abort(self._bus, self.worker_id, self.request_id)
        if self._sub is not None:
            await _unsubscribe(self._sub)


async def _publish_abort(bus: Bus, worker_id: str, request_id: str) -> None:
    try:
        await bus.publish(Subjects.worker(worker_id, "abort"), AbortRequest(request_id=request_id))
    except Exception as exc:  # NATS down: the worker's own timeouts must reclaim the request
        log.warning("%s: abort to worker %s failed: %r", request_id, worker_id, exc)


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception as exc:  # the connection is closed already
        log.debug("unsubscribe failed: %r", exc)
