"""Structured output: the request fields that constrain the output, turned into one grammar spec.

Sources (at most one per request; two are a 400 naming the second):
- OpenAI's `response_format`: `text` (free), `json_object` (any JSON object), `json_schema` (the
  schema; `strict` or not, the schema is enforced);
- vLLM's guided extras, old names `guided_json` / `guided_regex` / `guided_choice` /
  `guided_grammar` (EBNF) and the current `structured_outputs` {json, regex, choice, grammar,
  json_object};
- `tool_choice` `required` or a named function (tools.py builds that schema).
The spec travels to the worker (`SamplingOptions.guided`), which compiles it (cached by spec) and
masks the sampler's logits with it (libs/engine/guided.py). A schema or regex the compiler refuses is
a 400 naming the field it came from.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from kvmesh.schemas.messages import GuidedSpec
from kvmesh.services.gateway.errors import GatewayError


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class JsonSchemaFormat(_Part):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Part):
    """vLLM's `structured_outputs` (its newer name for the guided_* fields)."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class GuidedFields(BaseModel):
    """The guided-decoding fields of a body (both endpoints declare them)."""

    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputs | None = None

    def guided_spec(self) -> GuidedSpec | None:
        specs = [s for s in self._specs() if s is not None]
        if len(specs) > 1:
            raise GatewayError.invalid(
                f"{specs[0].field} and {specs[1].field} both constrain the output: give one", specs[1].field
            )
        return specs[0] if specs else None

    def _specs(self) -> list[GuidedSpec | None]:
        out: list[GuidedSpec | None] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            out.append(GuidedSpec(kind="json_object", field="response_format"))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise GatewayError.invalid(
                    "response_format.json_schema.schema is required", "response_format"
                )
            out.append(schema_spec(rf.json_schema.schema_, "response_format"))
        extras = (("json", self.guided_json), ("regex", self.guided_regex))
        extras += (("choice", self.guided_choice), ("grammar", self.guided_grammar))
        out += [_spec(kind, value, f"guided_{kind}") for kind, value in extras if value is not None]
        so = self.structured_outputs
        if so is not None:
            given = [
                (kind, value)
                for kind, value in (
                    ("json", so.json_),
                    ("regex", so.regex),
                    ("choice", so.choice),
                    ("grammar", so.grammar),
                    ("json_object", so.json_object or None),
                )
                if value is not None
            ]
            if len(given) > 1:
                message = (
                    "structured_outputs: give one of json, regex, choice, grammar, json_object: "
                    f"{[kind for kind, _ in given]}"
                )
                raise GatewayError.invalid(message, "structured_outputs")
            out += [_spec(kind, value, "structured_outputs") for kind, value in given]
        return out


def schema_spec(schema: dict[str, Any] | str | bool, field: str) -> GuidedSpec:
    """A JSON schema (an object, or its JSON text) as a spec; its text is canonical (sorted keys would
    reorder properties, which fixes the output's key order: the text keeps the client's order)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise GatewayError.invalid(f"{field}: the schema is not valid JSON ({exc})", field) from None
    if not isinstance(schema, dict | bool):
        raise GatewayError.invalid(f"{field}: a JSON schema must be an object", field)
    return GuidedSpec(kind="json_schema", value=json.dumps(schema, separators=(",", ":")), field=field)


def choice_spec(choices: list[str], field: str) -> GuidedSpec:
    if not choices:
        raise GatewayError.invalid(f"{field} must list at least one choice", field)
    return GuidedSpec(kind="choice", value=json.dumps(choices), field=field)


def _spec(kind: str, value: Any, field: str) -> GuidedSpec:
    """vLLM's guided extras and structured_outputs name the same kinds: json (a schema), regex,
    choice (a list), grammar (EBNF), json_object (any object)."""
    if kind == "json":
        return schema_spec(value, field)
    if kind == "choice":
        return choice_spec(value, field)
    if kind == "json_object":
        return GuidedSpec(kind="json_object", field=field)
    return GuidedSpec(kind=kind, value=value, field=field)
