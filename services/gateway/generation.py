"""One request's way through the mesh: encode -> route -> generate; the token stream is stream.py's.

`Generator.start` does everything that can still fail with a plain HTTP status (bad prompt, limits,
no worker, all workers full): it returns a `RunningRequest` (stream.py) only once a worker has
accepted the request, subscribed to its stream beforehand so that no token is missed.
"""

from __future__ import annotations

import asyncio

from tokenizers import Tokenizer

from kvmesh.libs import tracing
from kvmesh.libs.bus import Bus
from kvmesh.schemas.messages import (
    DetokenizeRequest,
    DetokenizeResult,
    EncodeReply,
    EncodeRequest,
    EncodeResult,
    GenerateRequest,
    Heartbeat,
    RouteRequest,
    SamplingOptions,
    Subjects,
)
from kvmesh.services.gateway.control import tokenizer_try_timeout
from kvmesh.services.gateway.dispatch import Dispatcher, Submission
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.flow import Arrival, FlowController, Slot
from kvmesh.services.gateway.flow_metrics import QUEUE_TIME
from kvmesh.services.gateway.params import (
    GenerationParams,
    Limits,
    PromptInput,
    Timeouts,
)
from kvmesh.services.gateway.stream import RunningRequest

__all__ = ["Generator", "RunningRequest"]

QUEUE_SPAN = "kvmesh.gateway.queue"  # a request's wait in flow control (only when it waited)


class Generator:
    """Starts requests on the mesh. One per gateway process; shared by all requests."""

    def __init__(
        self,
        bus: Bus,
        tokenizer: Tokenizer,
        max_model_len: int,
        timeouts: Timeouts,
        limits: Limits | None = None,
        flow: FlowController | None = None,
        model_name: str = "",
    ) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.timeouts = timeouts
        self.limits = limits or Limits()
        self.dispatcher = Dispatcher(bus, timeouts)
        self.flow = flow or FlowController()
        self.model_name = model_name
        self._beats: asyncio.Future | None = None

    async def watch_workers(self) -> None:
        """Feed flow control the workers' heartbeats (idempotent; the gateway calls it at startup, and
        the first request does if nobody did)."""
        if self._beats is None:

            async def on_beat(hb: Heartbeat, _raw: object) -> None:
                self.flow.observe(hb.stats, hb.interval_s)

            self._beats = asyncio.ensure_future(self.bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, on_beat))
        await asyncio.shield(self._beats)

    async def _room(self, params: GenerationParams, front: bool, deadline: float) -> Slot:
        """A flow-control slot: at once, or after waiting in the queue (a span of the request's trace)."""
        if not front and (slot := self.flow.try_admit(params.priority, params.tenant)) is not None:
            QUEUE_TIME.labels(self.model_name).observe(0.0)
            return slot
        attributes = {"kvmesh.priority": params.priority, "kvmesh.tenant": params.tenant}
        with tracing.tracer.start_as_current_span(QUEUE_SPAN, attributes=attributes) as span:
            ttl = deadline - asyncio.get_running_loop().time()
            slot = await self.flow.wait(params.priority, params.tenant, front=front, ttl_s=ttl)
            span.set_attribute("kvmesh.queue_wait_s", slot.waited_s)
        QUEUE_TIME.labels(self.model_name).observe(slot.waited_s)
        return slot

    async def _dispatch(self, submission: Submission, params: GenerationParams, arrival: float):
        """Dispatch within flow control: a request the workers have no room for waits for a slot; one
        a worker refuses as full (another gateway filled it) goes back to the head of its place."""
        deadline = arrival + self.flow.config.queue_ttl_s
        front = False
        while True:
            slot = await self._room(params, front, deadline)
            # the worker's scheduling order: the band, then this tenant's load (the fewer, the sooner)
            submission.generate.priority = params.priority
            submission.generate.tenant_inflight = slot.tenant_inflight
            try:
                return await self.dispatcher.dispatch(submission), slot
            except GatewayError as exc:
                slot.release()
                no_queue = not self.flow.config.max_queue  # set up for early 429s
                if exc.code != "overloaded" or no_queue or asyncio.get_running_loop().time() >= deadline:
                    raise
                self.flow.backoff()
                front = True
            except BaseException:
                slot.release()
                raise

    async def encode(
        self, request_id: str, prompt: PromptInput, cache_salt: str | None = None
    ) -> EncodeReply:
        req = EncodeRequest(
            request_id=request_id,
            messages=prompt.messages,
            prompt=prompt.text,
            token_ids=prompt.token_ids,
            add_generation_prompt=prompt.add_generation_prompt,
            cache_salt=cache_salt,
            tools=prompt.tools,
            chat_template_kwargs=prompt.chat_template_kwargs,
        )
        chars = len(prompt.text or "") + sum(len(m.content) for m in prompt.messages or ())
        try_timeout = tokenizer_try_timeout(self.timeouts.tokenizer_try, chars, len(prompt.token_ids or ()))
        return await self.dispatcher.ask(
            "tokenizer", Subjects.TOKENIZER_ENCODE, req, EncodeResult, try_timeout
        )

    async def detokenize(self, token_ids: list[int]) -> str:
        req = DetokenizeRequest(token_ids=token_ids)
        try_timeout = tokenizer_try_timeout(self.timeouts.tokenizer_try, token_ids=len(token_ids))
        reply = await self.dispatcher.ask(
            "tokenizer", Subjects.TOKENIZER_DETOKENIZE, req, DetokenizeResult, try_timeout
        )
        return reply.text

    async def start(self, request_id: str, prompt: PromptInput, params: GenerationParams) -> RunningRequest:
        arrival = asyncio.get_running_loop().time()
        # A request the queue has no place for is refused now, before its prompt is even tokenized.
        on_the_way = self.flow.arrive()
        try:
            return await self._start(request_id, prompt, params, arrival, on_the_way)
        finally:
            on_the_way.done()

    async def _start(
        self,
        request_id: str,
        prompt: PromptInput,
        params: GenerationParams,
        arrival: float,
        on_the_way: Arrival,
    ) -> RunningRequest:
        cap = self.limits.max_tokens_cap
        if cap and params.max_tokens is not None and params.max_tokens > cap:
            raise GatewayError.invalid(
                f"max_tokens must be at most {cap}, got {params.max_tokens}", "max_tokens"
            )
        encoded = await self.encode(request_id, prompt, params.cache_salt)
        num_prompt = len(encoded.token_ids)
        if self.limits.max_prompt_tokens and num_prompt > self.limits.max_prompt_tokens:
            raise GatewayError.invalid(
                f"The prompt has {num_prompt} tokens; this server accepts at most "
                f"{self.limits.max_prompt_tokens}.",
                params.prompt_param,
                "prompt_too_long",
            )
        max_tokens = self._max_tokens(num_prompt, params)
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            min_tokens=params.min_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=dict(params.logit_bias or {}),
            seed=params.seed,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
            guided=params.guided,
        )
        route_req = RouteRequest(
            request_id=request_id,
            num_tokens=num_prompt,
            max_tokens=max_tokens,
            block_hashes=encoded.block_hashes,
            block_size=encoded.block_size,
            session_id=params.session_id,
        )
        gen_req = GenerateRequest(
            request_id=request_id,
            token_ids=encoded.token_ids,
            sampling=sampling,
            stream_subject=Subjects.stream(request_id),
            cache_salt=params.cache_salt,
        )
        submission = Submission(route_req, gen_req)
        await self.watch_workers()
        on_the_way.done()  # from here it counts as waiting (or dispatched)
        attempt, slot = await self._dispatch(submission, params, arrival)
        # The request's timeouts count from here: its wait in the queue has a bound of its own (the
        # TTL), and a burst's last requests must not reach a worker with their first-token time spent.
        dispatched = asyncio.get_running_loop().time()
        running = RunningRequest(
            self.dispatcher,
            self.tokenizer,
            params,
            self.timeouts,
            submission,
            attempt,
            arrival=dispatched,
            max_migrations=self.limits.max_migrations,
        )
        running.on_close = slot.release  # the slot is the workers' room: back when the request ends
        return running

    def _max_tokens(self, num_prompt: int, params: GenerationParams) -> int:
        """The completion budget: as asked, or the rest of the context (at most the cap); 400 if it
        does not fit."""
        limit = self.max_model_len
        wanted = params.max_tokens
        if wanted is None and num_prompt >= limit:
            asked = f"{num_prompt} tokens in the prompt alone"
        elif wanted is not None and num_prompt + wanted > limit:
            asked = f"{num_prompt + wanted} tokens ({num_prompt} in the prompt, {wanted} for the completion)"
        else:
            max_tokens = wanted if wanted is not None else limit - num_prompt
            if wanted is None and self.limits.max_tokens_cap:
                max_tokens = min(max_tokens, self.limits.max_tokens_cap)
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
