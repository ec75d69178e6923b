"""OpenAI request bodies (pydantic) and their translation into the mesh's prompt and parameters.

Field checks that pydantic can state (ranges, types) live on the fields, so FastAPI reports them with
the field's name; checks across fields raise GatewayError from `prompt_and_params()`. A field a body
does not declare is never ignored silently: request_fields.py holds the rule (a 400 naming it unless it
asks for nothing); `null` means "the default" everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvmesh.schemas.messages import ChatMessage, ToolCall
from kvmesh.services.gateway.errors import GatewayError
from kvmesh.services.gateway.params import GenerationParams, PromptInput
from kvmesh.services.gateway.request_fields import refuse_unhonoured
from kvmesh.services.gateway.structured import GuidedFields
from kvmesh.services.gateway.tools import ToolCallIn, ToolFields

MAX_LOGPROBS = 20  # the engine's limit (libs/engine/sampling_params.py)
# Integers go onto the wire as msgpack (64 bits at most): bound them here, so that an absurd value is
# a 400 naming its field rather than a failure further down.
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
INT64 = 2**63


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant: the calls it made
    tool_call_id: str | None = None  # tool: the call this answers
    name: str | None = None

    def to_wire(self) -> ChatMessage:
        content = self.content
        if content is None:  # an assistant turn that only called tools
            content = ""
        elif not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        role = "system" if self.role == "developer" else self.role
        calls = [
            ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in self.tool_calls or ()
        ]
        return ChatMessage(
            role=role, content=content, tool_calls=calls, tool_call_id=self.tool_call_id, name=self.name
        )


class StreamOptions(_Body):
    include_usage: bool | None = None


class _SamplingBody(GuidedFields, _Body):  # GuidedFields: response_format, guided_* (structured.py)
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI's, then vLLM's extras)."""

    model_config = ConfigDict(extra="allow")  # undeclared fields: request_fields.refuse_unhonoured
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    n: int | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = None  # keys: "<token id>"
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, lt=2**31)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2**31)
    min_tokens: int | None = Field(None, ge=0, lt=INT64)
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    priority: int | None = Field(None, ge=-(2**31), lt=2**31)  # flow control: lower goes first (vLLM)
    # vLLM's: the tenant's prefix-cache namespace; salted prompts share blocks only with the same salt
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int | None, logprobs: int | None, prompt_param: str) -> GenerationParams:
        if self.stream_options is not None and not self.stream:
            raise GatewayError.invalid("stream_options is only allowed with stream=true", "stream_options")
        refuse_unhonoured(self.model_extra)
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return GenerationParams(
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logit_bias=self.logit_bias or None,
            seed=self.seed,
            ignore_eos=bool(self.ignore_eos),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            logprobs=logprobs,
            stop=tuple(s for s in stop if s),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=self.skip_special_tokens is not False,
            session_id=self.user,
            priority=self.priority or 0,
            tenant=self.user or "",
            cache_salt=self.cache_salt,
            prompt_param=prompt_param,
            guided=self.guided_spec(),
        )


class ChatCompletionRequest(_SamplingBody, ToolFields):  # ToolFields: tools, tool_choice (tools.py)
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool | None = None  # vLLM
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM: extra variables for the chat template

    def prompt_and_params(self) -> tuple[PromptInput, GenerationParams]:
        if self.top_logprobs and not self.logprobs:
            raise GatewayError.invalid("top_logprobs needs logprobs=true", "top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        params = self._params(max_tokens, logprobs, "messages")
        plan = self.tool_plan()
        if plan is not None:
            if plan.guided is not None and params.guided is not None:
                message = f"tool_choice {plan.mode} and {params.guided.field} both constrain the output"
                raise GatewayError.invalid(message, "tool_choice")
            params = dataclasses.replace(params, tools=plan, guided=plan.guided or params.guided)
        prompt = PromptInput(
            messages=[m.to_wire() for m in self.messages],
            add_generation_prompt=self.add_generation_prompt is not False,
            tools=plan.template_tools if plan is not None else None,
            chat_template_kwargs=json.dumps(self.chat_template_kwargs) if self.chat_template_kwargs else None,
        )
        return prompt, params


class CompletionRequest(_SamplingBody):
    # One prompt: text, or token ids; a list holding exactly one of those is accepted too.
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    suffix: str | None = None

    def prompt_and_params(self) -> tuple[PromptInput, GenerationParams]:
        if self.echo and self.logprobs is not None:
            message = "echo with logprobs is not supported (it needs the prompt's logprobs)"
            raise GatewayError.invalid(message, "echo")
        if self.suffix:
            raise GatewayError.invalid("suffix is not supported", "suffix")
        return self._prompt(), self._params(self.max_tokens, self.logprobs, "prompt")

    def echo_text(self, decode: Callable[[list[int]], str]) -> str:
        """What `echo` puts before the completion: the prompt as text ("" without echo)."""
        if not self.echo:
            return ""
        prompt = self._prompt()
        return prompt.text if prompt.text is not None else decode(prompt.token_ids or [])

    def _prompt(self) -> PromptInput:
        p = self.prompt
        if isinstance(p, str):
            return PromptInput(text=p)
        if p and not isinstance(p[0], int):  # a list of prompts
            if len(p) != 1:
                raise GatewayError.invalid(
                    f"only one prompt per request is supported, got {len(p)}", "prompt", "unsupported"
                )
            p = p[0]
            if isinstance(p, str):
                return PromptInput(text=p)
        return PromptInput(token_ids=list(p))


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model_config = ConfigDict(extra="allow")  # undeclared fields: request_fields.refuse_unhonoured
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_generation_prompt: bool | None = None

    def prompt_input(self) -> PromptInput:
        refuse_unhonoured(self.model_extra)
        if (self.prompt is None) == (self.messages is None):
            raise GatewayError.invalid("give exactly one of prompt and messages", "prompt")
        if self.messages is not None:
            return PromptInput(
                messages=[m.to_wire() for m in self.messages],
                add_generation_prompt=self.add_generation_prompt is not False,
            )
        return PromptInput(text=self.prompt)


class DetokenizeRequest(_Body):
    model_config = ConfigDict(extra="allow")  # undeclared fields: request_fields.refuse_unhonoured

    model: str | None = None
    tokens: list[TokenId]
