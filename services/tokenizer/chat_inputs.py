"""What a chat template is given: messages with their tool calls, `tools`, `chat_template_kwargs`.

Templates written for tool calling (Qwen, Llama 3.1+, Hermes, Mistral ...) get OpenAI's shapes as
vLLM gives them: `tools` as the OpenAI list, assistant `tool_calls` with their arguments parsed into
objects (templates render them with `tojson`), `tool` messages with their `tool_call_id`. A template
with no tools section at all (the default SmolLM2's) would drop them silently, so for such a template
the tools go into the system message in the Hermes format (the `hermes` parser's, the gateway's
default) and an assistant's earlier calls into its content as `<tool_call>` blocks.
"""

from __future__ import annotations

import json
from typing import Any

from kvmesh.schemas.messages import ChatMessage, EncodeRequest

# apply_chat_template's own arguments: chat_template_kwargs may not override them
RESERVED = frozenset(
    {"conversation", "messages", "tools", "documents", "add_generation_prompt", "tokenize", "return_dict"}
)

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
    "about what values to plug into functions. Here are the available tools: <tools>{tools}</tools>\n"
    "For each function call return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags as follows:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-dict>}}\n</tool_call>'
)


class TemplateInputError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def template_inputs(req: EncodeRequest, template: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(conversation, extra keyword arguments of apply_chat_template) for a chat EncodeRequest."""
    kwargs: dict[str, Any] = {}
    if req.chat_template_kwargs:
        extra = json.loads(req.chat_template_kwargs)
        if not isinstance(extra, dict):
            raise TemplateInputError("chat_template_kwargs", "must be an object")
        clash = sorted(RESERVED & extra.keys())
        if clash:
            raise TemplateInputError("chat_template_kwargs", f"may not set {', '.join(clash)}")
        kwargs.update(extra)
    tools = json.loads(req.tools) if req.tools else None
    native = template is not None and "tools" in template and "tool_call" in template
    if native:
        if tools:
            kwargs["tools"] = tools
        return [_native_message(m) for m in req.messages or ()], kwargs
    conversation = [_plain_message(m) for m in req.messages or ()]
    if tools:
        system = HERMES_SYSTEM.format(tools=json.dumps(tools, ensure_ascii=False))
        if conversation and conversation[0]["role"] == "system":
            conversation[0] = {"role": "system", "content": conversation[0]["content"] + "\n\n" + system}
        else:
            conversation.insert(0, {"role": "system", "content": system})
    return conversation, kwargs


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON: the template gets the text as it was sent


def _native_message(m: ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": _arguments(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        message["name"] = m.name
    return message


def _plain_message(m: ChatMessage) -> dict[str, Any]:
    """A template without tool support: calls become Hermes blocks in the content."""
    content = m.content
    for c in m.tool_calls:
        call = json.dumps({"name": c.name, "arguments": _arguments(c.arguments)}, ensure_ascii=False)
        content += ("\n" if content else "") + f"<tool_call>\n{call}\n</tool_call>"
    return {"role": m.role, "content": content}
