"""Tokenizer service: chat templates, text <-> token ids, and the prompt's block hashes.

The hashes are the workers' KV contract's (libs/kv_contract.py): this model's namespace, the hash
seed, and the workers' block size, heard in their heartbeats (unless pinned by `--block-size`), with
a request's cache salt as an extra key of its first block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace

from kvmesh.libs import tracing
from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, salted_extra_keys
from kvmesh.libs.kv_contract import ContractGate, hash_namespace
from kvmesh.schemas.messages import (
    DetokenizeReply,
    DetokenizeRequest,
    EncodeReply,
    EncodeRequest,
    ErrorReply,
    Heartbeat,
    Subjects,
)
from kvmesh.services.tokenizer.chat_inputs import TemplateInputError, template_inputs

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    nats_url: str
    model: str
    block_size: int = 0  # 0: the workers' (their heartbeats' KV contract), the default until heard
    hash_seed: int | None = None  # None: KVMESH_HASH_SEED or the built-in default
    # At start, wait this long at most for a worker's heartbeat (its block size) before answering
    # encode requests: hashes in another block size would be wasted on the router.
    contract_wait_s: float = 2.0
    # --chat-template (vLLM's flag): a Jinja template file, or the template itself, that replaces the
    # model's own (tokenizer_config.json's) for every chat request; None: the model's
    chat_template: str | None = None


def load_chat_template(value: str) -> str:
    """`--chat-template`'s value -> the template: a file's text, or the value itself when it is a
    template (holds `{{` or `{%`) rather than a path."""
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: no such file: {value}")


class TokenizerService:
    def __init__(self, config: TokenizerConfig, model_path: Path) -> None:
        from transformers import AutoTokenizer

        from kvmesh.libs.detokenizer import backend_tokenizer

        self.config = config
        self.hf = AutoTokenizer.from_pretrained(model_path)
        if config.chat_template is not None:
            self.hf.chat_template = load_chat_template(config.chat_template)
            log.info("chat template from --chat-template, not the model's")
        self.fast = backend_tokenizer(self.hf)
        self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
        self._adopted = asyncio.Event()
        self.gate = ContractGate(
            hash_namespace(config.model), config.hash_seed, config.block_size, lambda _c: self._adopted.set()
        )
        self.extra_keys = encode_extra_keys(hash_namespace(config.model))

    def encode(self, req: EncodeRequest) -> EncodeReply | ErrorReply:
        given = sum(x is not None for x in (req.messages, req.prompt, req.token_ids))
        if given != 1:
            return ErrorReply(
                code="invalid_request", message="give exactly one of messages, prompt, token_ids"
            )
        if req.messages is not None:
            if not req.messages:
                return ErrorReply(code="invalid_request", message="messages is empty", field="messages")
            try:
                conversation, template_kwargs = template_inputs(req, self.hf.chat_template)
                text = self.hf.apply_chat_template(
                    conversation,
                    add_generation_prompt=req.add_generation_prompt,
                    tokenize=False,
                    **template_kwargs,  # tools, chat_template_kwargs (chat_inputs.py)
                )
            except TemplateInputError as exc:
                return ErrorReply(code="invalid_request", message=str(exc), field=exc.field)
            except Exception as exc:  # template errors are the caller's input problem
                return ErrorReply(code="invalid_request", message=f"chat template: {exc}", field="messages")
            ids = self.fast.encode(text, add_special_tokens=False).ids
        elif req.prompt is not None:
            ids = self.fast.encode(req.prompt, add_special_tokens=False).ids
        else:
            ids = req.token_ids
            if not all(0 <= t < self.vocab_size for t in ids):
                return ErrorReply(
                    code="invalid_request",
                    message=f"token ids must be in [0, {self.vocab_size})",
                    field="prompt",
                )
        if not ids:
            return ErrorReply(code="invalid_request", message="the prompt is empty", field="prompt")
        first = salted_extra_keys(self.extra_keys, req.cache_salt)
        bs = self.gate.block_size
        hashes = hash_blocks(ids, bs, self.extra_keys, self.gate.seed, None, first)
        return EncodeReply(token_ids=ids, block_hashes=hashes, block_size=bs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeReply | ErrorReply:
        if not all(0 <= t < self.vocab_size for t in req.token_ids):
            return ErrorReply(code="invalid_request", message="unknown token id", field="tokens")
        return DetokenizeReply(text=self.fast.decode(req.token_ids, skip_special_tokens=False))

    async def attach(self, bus: Bus) -> None:
        async def on_encode(req: EncodeRequest, _raw) -> EncodeReply | ErrorReply:
            reply = self.encode(req)
            span = trace.get_current_span()  # the bus's SERVER span, when the request is traced
            if span.is_recording() and isinstance(reply, EncodeReply):
                span.set_attributes(
                    {
                        tracing.REQUEST_ID: req.request_id,
                        tracing.PROMPT_TOKENS: len(reply.token_ids),
                        "kvmesh.tokenizer.num_blocks": len(reply.block_hashes),
                        "kvmesh.tokenizer.chat": req.messages is not None,
                    }
                )
            return reply

        async def on_detokenize(req: DetokenizeRequest, _raw) -> DetokenizeReply | ErrorReply:
            return self.detokenize(req)

        async def on_beat(hb: Heartbeat, _raw) -> None:
            self.gate.check(hb.stats.kv_contract)  # adopts the first worker's block size

        await bus.serve(Subjects.WORKER_HEARTBEAT, Heartbeat, on_beat)
        if self.gate.contract is None and self.config.contract_wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._adopted.wait(), self.config.contract_wait_s)
            if self.gate.contract is None:
                log.warning(
                    "no worker heard in %.1f s: hashing in blocks of %d until one is",
                    self.config.contract_wait_s,
                    self.gate.block_size,
                )

        for subject, request_type, handler in (
            (Subjects.TOKENIZER_ENCODE, EncodeRequest, on_encode),
            (Subjects.TOKENIZER_DETOKENIZE, DetokenizeRequest, on_detokenize),
        ):
            await bus.serve(subject, request_type, handler, queue="tokenizer")
            # outside the queue group: the gateway's hedged try when a replica does not answer
            await bus.serve(Subjects.every_replica(subject), request_type, handler)
