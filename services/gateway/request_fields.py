"""The one rule for request fields the gateway does not honour: none is ignored silently.

A field of a request body is one of:
- honoured: declared on its request model (openai_protocol.py);
- known, not honoured: a field of OpenAI's or vLLM's API listed in NOT_HONOURED below. Accepted when it
  asks for nothing (null, or its listed no-op value, such as `"echo": false`), else a 400 naming it
  (code `unsupported_field`);
- unknown: any other name (a misspelling, another vendor's extension). Accepted when null, else a 400
  naming it (code `unknown_field`, with OpenAI's own message for it).
A client that relied on a field therefore learns at once that it was not applied. Fields that change
nothing a client can observe even at OpenAI without other fields (`metadata`, which only tags stored
completions; `safety_identifier`; `prompt_cache_key`, a cache hint where routing follows cached
prefixes anyway) are listed as ANY_VALUE: accepted whatever their value.
"""

from __future__ import annotations

from typing import Any

from kvmesh.services.gateway.errors import GatewayError

ANY_VALUE = object()

# name -> the values that ask for nothing (null always does). Fields a request model declares never
# reach this table, so a field that becomes honoured simply gets declared there.
NOT_HONOURED: dict[str, tuple[Any, ...]] = {
    # OpenAI chat / completions
    "audio": (),
    "modalities": (["text"],),
    "prediction": (),
    "web_search_options": (),
    "store": (False,),
    "metadata": (ANY_VALUE,),
    "safety_identifier": (ANY_VALUE,),
    "prompt_cache_key": (ANY_VALUE,),
    "service_tier": ("auto", "default"),
    "verbosity": ("medium",),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
    # chat's fields on /v1/completions, and reasoning
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (),
    "functions": ([],),
    "function_call": ("none",),
    "reasoning_effort": (),
    "include_reasoning": (True,),
    "chat_template_kwargs": ({},),
    "guided_decoding_backend": (),
    "guided_whitespace_pattern": (),
    "structural_tag": (),
    # the Responses API's (responses_api.py)
    "text": ({"format": {"type": "text"}},),
    "reasoning": (),
    "include": ([],),
    "truncation": ("disabled",),
    "background": (False,),
    "conversation": (),
    "prompt": (),
    "max_tool_calls": (),
    "top_logprobs": (0,),
    "stream_options": (),
    "context_management": (),
    "prompt_cache_retention": (),
    # vLLM's extensions
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (),
    "prompt_logprobs": (),
    "allowed_token_ids": (),
    "bad_words": ([],),
    "continue_final_message": (False,),
    "add_special_tokens": (False,),
    "documents": (),
    "chat_template": (),
    "mm_processor_kwargs": (),
    "request_id": (),
    "logits_processors": (),
    "return_tokens_as_token_ids": (False,),
    "return_token_ids": (False,),
    "kv_transfer_params": (),
    "vllm_xargs": (),
    "prompt_embeds": (),
}


def refuse_unhonoured(extra: dict[str, Any] | None) -> None:
    """Apply the rule to a body's undeclared fields (pydantic's `model_extra`): a 400 naming the first
    unknown field that asks for something, else the first such known one; the message lists them all."""
    asking = [name for name, value in (extra or {}).items() if _asks_for_something(name, value)]
    unknown = [name for name in asking if name not in NOT_HONOURED]
    if unknown:
        message = f"Unrecognized request argument supplied: {', '.join(unknown)}"
        raise GatewayError.invalid(message, unknown[0], "unknown_field")
    if asking:
        message = f"Not supported by this server: {', '.join(asking)} (leave out, or null)"
        raise GatewayError.invalid(message, asking[0], "unsupported_field")


def _asks_for_something(name: str, value: Any) -> bool:
    if value is None:
        return False
    no_ops = NOT_HONOURED.get(name, ())
    return ANY_VALUE not in no_ops and not any(_same(value, v) for v in no_ops)


def _same(value: Any, no_op: Any) -> bool:
    """Equal and of the same JSON kind (1 == True in Python, but `"store": 0` is not `false`)."""
    return isinstance(value, bool) == isinstance(no_op, bool) and value == no_op
