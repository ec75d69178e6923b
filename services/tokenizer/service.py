"""Tokenizer service: chat templates, text <-> token ids, and the prompt's block hashes."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from opentelemetry import trace

from kvmesh.libs import tracing
from kvmesh.libs.bus import Bus
from kvmesh.libs.engine.block_hash import encode_extra_keys, hash_blocks, hash_seed
from kvmesh.schemas.messages import (
    DetokenizeReply,
    DetokenizeRequest,
    EncodeReply,
    EncodeRequest,
    ErrorReply,
    Subjects,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TokenizerConfig:
    nats_url: str
    model: str
    block_size: int = 16
    hash_seed: int | None = None


class TokenizerService:
    def __init__(self, config: TokenizerConfig, model_path: Path) -> None:
        from transformers import AutoTokenizer

        from kvmesh.libs.detokenizer import backend_tokenizer

        self.config = config
        self.hf = AutoTokenizer.from_pretrained(model_path)
        self.fast = backend_tokenizer(self.hf)
        self.vocab_size = self.fast.get_vocab_size(with_added_tokens=True)
        self.model_name = model_path.name  # the engine namespaces its block hashes the same way
        self.seed = hash_seed(config.hash_seed)

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
                text = self.hf.apply_chat_template(
                    [{"role": m.role, "content": m.content} for m in req.messages],
                    add_generation_prompt=req.add_generation_prompt,
                    tokenize=False,
                )
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
        extra = encode_extra_keys(self.model_name, cache_salt=req.cache_salt)
        hashes = hash_blocks(ids, self.config.block_size, extra, self.seed)
        return EncodeReply(token_ids=ids, block_hashes=hashes, block_size=self.config.block_size)

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

        for subject, request_type, handler in (
            (Subjects.TOKENIZER_ENCODE, EncodeRequest, on_encode),
            (Subjects.TOKENIZER_DETOKENIZE, DetokenizeRequest, on_detokenize),
        ):
            await bus.serve(subject, request_type, handler, queue="tokenizer")
            # outside the queue group: the gateway's hedged try when a replica does not answer
            await bus.serve(Subjects.every_replica(subject), request_type, handler)
