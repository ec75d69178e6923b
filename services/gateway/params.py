"""What the protocol layer hands to the generation layer, and what comes back: plain typed values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvmesh.schemas.messages import ChatMessage, GuidedSpec, TokenLogprobs


@dataclass(frozen=True, slots=True)
class PromptInput:
    """Exactly one of messages (chat), text or token_ids."""

    messages: list[ChatMessage] | None = None
    text: str | None = None
    token_ids: list[int] | None = None
    add_generation_prompt: bool = True
    tools: str | None = None  # chat: the tools for the template, JSON text (tools.py)
    chat_template_kwargs: str | None = None  # chat: a JSON object of extra template variables


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """How a chat request with tools asks for calls and how they are read back (tools.py)."""

    mode: str  # auto | required | named (none needs no plan)
    template_tools: str  # the tools as JSON text, for the chat template
    forced: str | None = None  # named: the function
    guided: GuidedSpec | None = None  # required / named: the grammar of the output


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """The request's sampling and output options, validated by the protocol layer."""

    max_tokens: int | None  # None: the rest of the context
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; n >= 0: the sampled token's and the top n
    stop: tuple[str, ...] = ()
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    session_id: str | None = None  # routing affinity (OpenAI `user`)
    priority: int = 0  # flow control's band (vLLM's `priority`: lower goes first)
    tenant: str = ""  # flow control's fairness key: the `user` field, else the X-Tenant-Id header
    cache_salt: str | None = None  # prefix-cache isolation: the `cache_salt` field, else X-Cache-Salt
    prompt_param: str = "prompt"  # the request field that held the prompt, for error messages
    guided: GuidedSpec | None = None  # the grammar the output must follow (structured.py, tools.py)
    tools: ToolPlan | None = None  # chat with tools: how calls are asked for and parsed (tools.py)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; see GatewayConfig for what each bounds."""

    bus: float = 10.0  # one NATS request to a worker; all tries of a tokenizer or router request
    token: float = 120.0  # silence between two tokens
    request: float = 600.0  # arrival to the last token
    first_token: float = 120.0  # arrival to the first token
    liveness: float = 1.0  # stream silence before the worker is asked whether it still holds the request
    probe: float = 2.0  # how long that question may take
    tokenizer_try: float = 1.0  # a tokenizer try unanswered this long is hedged (plus 4 s per MiB of text)
    router_try: float = 1.0  # the same for the router
    control_tries: int = 3  # tries per tokenizer or router request, the first one included


@dataclass(frozen=True, slots=True)
class Limits:
    """Request size limits (0: none beyond the model's context)."""

    max_prompt_tokens: int = 0
    max_tokens_cap: int = 0  # the largest max_tokens, and the default when it is left out
    max_migrations: int = 3  # moves to another worker per request


class Usage(NamedTuple):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class OutputLogprob(NamedTuple):
    token_id: int
    text_offset: int  # characters of completion text before this token's own text
    lp: TokenLogprobs


class GenerationOutput(NamedTuple):
    text: str  # new text ("" allowed only on the final output)
    logprobs: list[OutputLogprob] | None = None
    finish_reason: str | None = None  # set on the final output only
    usage: Usage | None = None  # set on the final output only
