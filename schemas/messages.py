"""Every message between kvmesh services, as versioned msgspec structs (msgpack on the wire).

Subjects are `kvmesh.<service>.<verb>`; a worker's own subjects carry its id. Each struct is tagged
with its name and schema version, so a subject that carries several kinds decodes into a tagged
union, and a peer speaking another version fails loudly at decode time instead of misreading fields.
"""

from __future__ import annotations

import msgspec

SCHEMA_VERSION = 1


class Message(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True, gc=False, kw_only=True):
    """Base of every wire message."""


def _tag(name: str) -> str:
    return f"{name}.v{SCHEMA_VERSION}"


# --- errors --------------------------------------------------------------------------------------


class ErrorReply(Message, tag=_tag("ErrorReply")):
    """A typed failure, returned instead of a reply or sent on a token stream."""

    code: str  # invalid_request | prompt_too_long | no_workers | overloaded | internal | unavailable
    message: str
    field: str | None = None  # the offending request field, for invalid_request


# --- the KV contract -----------------------------------------------------------------------------


class KVContract(Message, tag=_tag("KVContract"), kw_only=True):
    """What makes two processes' block hashes comparable (libs/kv_contract.py derives it). Every
    worker publishes its own (heartbeat, KV-event stream header); the router, the tokenizer and the
    index hold workers to theirs, and the router refuses a worker whose contract differs."""

    version: int = 1  # of the rules below: bump when the hash function or the extra-key layout changes
    block_size: int  # tokens per block; only full blocks are hashed
    hash_seed: int  # xxh3-64 seed of every block hash (KVMESH_HASH_SEED)
    hash_namespace: str  # the model's name, an extra key of every block (kv_contract.hash_namespace)
    # How a request's cache_salt enters the hashes: "first_block": as an extra key of its first block
    # only (vLLM's rule), so a salted prompt shares no block with an unsalted or differently salted one.
    cache_salt_rule: str = "first_block"


# --- tokenizer: kvmesh.tokenizer.encode / kvmesh.tokenizer.detokenize ---------------------------------


class ToolCall(Message):
    """A function call an assistant message made (OpenAI's `tool_calls[]`), as the chat template gets it."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it; the tokenizer parses it for the template


class ChatMessage(Message):
    role: str
    content: str
    tool_calls: list[ToolCall] = []  # an assistant turn's calls
    tool_call_id: str | None = None  # a `tool` message: the call it answers
    name: str | None = None  # a `tool` message: the function's name (some templates print it)


class EncodeRequest(Message, tag=_tag("EncodeRequest")):
    request_id: str
    messages: list[ChatMessage] | None = None  # chat: rendered with the model's template
    prompt: str | None = None  # plain text
    token_ids: list[int] | None = None  # already tokenized: only hashed
    add_generation_prompt: bool = True
    cache_salt: str | None = None  # per-tenant prefix-cache isolation (KVContract.cache_salt_rule)
    # Chat only. `tools`: OpenAI's `tools` list as JSON text, handed to the chat template (a template
    # that has no tools section gets them as a system message: services/tokenizer/tool_prompt.py).
    tools: str | None = None
    chat_template_kwargs: str | None = None  # a JSON object: extra variables for the chat template


class EncodeReply(Message, tag=_tag("EncodeReply")):
    token_ids: list[int]
    block_hashes: list[int]  # chained hashes of the full blocks (see libs/engine/block_hash.py)
    block_size: int


class DetokenizeRequest(Message, tag=_tag("DetokenizeRequest")):
    token_ids: list[int]


class DetokenizeReply(Message, tag=_tag("DetokenizeReply")):
    text: str


# --- router: kvmesh.router.route -------------------------------------------------------------------


class RouteRequest(Message, tag=_tag("RouteRequest")):
    request_id: str
    num_tokens: int
    max_tokens: int
    block_hashes: list[int] = []
    block_size: int = 0  # of block_hashes (EncodeReply.block_size); 0: not said
    session_id: str | None = None  # affinity key (OpenAI `user` or a header)
    exclude: list[str] = []  # workers not to pick (already failed for this request)


class RouteReply(Message, tag=_tag("RouteReply")):
    worker_id: str
    reason: str  # why this worker: load | prefix | session | only
    score: float = 0.0
    prefill_worker_id: str | None = None  # set when the prompt is prefilled remotely (disaggregated)
    prefill_reason: str | None = None  # remote | short | prefill_busy | no_prefill_workers | cached


class RouterHealthRequest(Message, tag=_tag("RouterHealthRequest")):
    pass


class RouterHealth(Message, tag=_tag("RouterHealth")):
    workers: list[str]  # live workers
    kv_index_ok: bool  # False: the last overlap query failed and routing is by load only
    decisions: dict[str, int]  # routing decisions by reason (prefix | session | load | only)
    hit_tokens: int  # prompt tokens cached on the chosen workers
    available_hit_tokens: int  # prompt tokens cached on the best-holding workers


# --- workers: kvmesh.worker.<id>.generate / .abort / .stats, kvmesh.worker.heartbeat ---------------------


class GuidedSpec(Message, tag=_tag("GuidedSpec")):
    """Guided decoding: the grammar the output must follow, compiled on the worker (xgrammar; a cache
    of compiled grammars keyed by kind + value) and enforced as a token mask (libs/engine/guided.py)."""

    kind: str  # json_schema | json_object | regex | choice | grammar
    value: str = ""  # the JSON schema (JSON text) | - | the regex | a JSON list of strings | EBNF
    field: str = "response_format"  # the request field it came from: errors name it


class SamplingOptions(Message):
    """The engine-side sampling knobs (stop strings stay at the gateway, which detokenizes)."""

    max_tokens: int
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None
    # vLLM's penalties: frequency / presence over the output (resumed tokens included), repetition over
    # prompt and output; 0, 0 and 1 are off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = {}  # token id -> added to its logit
    min_p: float = 0.0  # 0: off
    # A migrated request: the last `resumed_tokens` prompt tokens are its own earlier output (max_tokens
    # and min_tokens count what is left); a seeded sampler skips the draws those tokens used.
    resumed_tokens: int = 0
    # The output follows this grammar; a migrated request's grammar state is advanced over the
    # resumed tokens first.
    guided: GuidedSpec | None = None


class GenerateRequest(Message, tag=_tag("GenerateRequest")):
    request_id: str
    token_ids: list[int]
    sampling: SamplingOptions
    stream_subject: str  # where the worker publishes this request's TokenChunks and Finished
    # disaggregated: this prefill worker computes the prompt's full blocks, the receiver pulls them
    prefill_worker_id: str | None = None
    # The continuation of a request the mesh had admitted, moving from a worker that lost it: taken
    # even beyond the waiting bound (refusing it would lose an admitted request; bounded by the
    # admitted requests of the lost worker).
    migrated: bool = False
    cache_salt: str | None = None  # per-tenant prefix-cache isolation: hashed as the tokenizer did
    # The worker's scheduling order, lower first (libs/engine/scheduler.py): the request's priority
    # band, then how many requests its tenant had in flight at the gateway when it was dispatched
    # (a tenant with little in flight goes ahead of another tenant's burst).
    priority: int = 0
    tenant_inflight: int = 0


class GenerateAccepted(Message, tag=_tag("GenerateAccepted")):
    worker_id: str


class AbortRequest(Message, tag=_tag("AbortRequest")):
    request_id: str


class StatsRequest(Message, tag=_tag("StatsRequest")):
    check_integrity: bool = False  # also run the block pool's invariant check (O(blocks))


class WorkerStats(Message, tag=_tag("WorkerStats")):
    worker_id: str
    role: str  # aggregated | prefill | decode
    model: str
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    kv_usage: float
    outstanding_tokens: int  # prompt tokens still to prefill + output tokens still to decode
    max_running: int = 0  # the engine's running batch bound (max_num_seqs); 0: not reported
    max_waiting: int = 0  # accepted requests it queues beyond that before answering `overloaded`; 0: none
    num_preemptions: int = 0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    num_leased_blocks: int = 0  # prefill role: blocks pinned for decode workers to pull
    remote_prefills: int = 0  # decode role: requests whose prompt blocks were pulled over NIXL
    local_prefill_fallbacks: int = 0  # ... that fell back to prefilling here after a failure
    kv_blocks_pulled: int = 0
    kv_bytes_pulled: int = 0
    integrity_error: str | None = None  # set only when asked (StatsRequest.check_integrity)
    kv_contract: KVContract | None = None  # how its block hashes are made; None: not published


class Heartbeat(Message, tag=_tag("Heartbeat")):
    stats: WorkerStats
    ts: float  # sender's wall clock, seconds
    interval_s: float  # the sender beats this often; receivers expire it after a few misses


# --- token streams: kvmesh.stream.<request_id> ----------------------------------------------------------


class TokenLogprobs(Message):
    logprob: float
    top_ids: list[int]
    top_logprobs: list[float]


class TokenChunk(Message, tag=_tag("TokenChunk")):
    token_ids: list[int]
    # output position of token_ids[0]: the reader detects a lost or repeated chunk by it
    first_index: int = 0
    logprobs: list[TokenLogprobs] | None = None


class Finished(Message, tag=_tag("Finished")):
    finish_reason: str  # stop | length | abort
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int


# --- request liveness: kvmesh.worker.<id>.status ---------------------------------------------------------


class RequestStatusQuery(Message, tag=_tag("RequestStatusQuery")):
    """Asked by the gateway when a request's stream has gone silent: is it still yours?"""

    request_id: str


class RequestStatusReply(Message, tag=_tag("RequestStatusReply")):
    # False: never had it, or has finished it (a restarted worker, a lost Finished): the asker moves it
    running: bool


StreamMessage = TokenChunk | Finished | ErrorReply
EncodeResult = EncodeReply | ErrorReply
DetokenizeResult = DetokenizeReply | ErrorReply
RouteResult = RouteReply | ErrorReply
GenerateResult = GenerateAccepted | ErrorReply
WorkerRequest = GenerateRequest | AbortRequest | StatsRequest


class Subjects:
    """NATS subjects, in one place."""

    TOKENIZER_ENCODE = "kvmesh.tokenizer.encode"
    TOKENIZER_DETOKENIZE = "kvmesh.tokenizer.detokenize"
    ROUTER_ROUTE = "kvmesh.router.route"
    ROUTER_HEALTH = "kvmesh.router.health"
    WORKER_HEARTBEAT = "kvmesh.worker.heartbeat"
    KV_EVENTS = "kvmesh.kv.events"  # .<worker_id>
    KV_INDEX_OVERLAP = "kvmesh.kv_index.overlap"

    @staticmethod
    def worker(worker_id: str, verb: str) -> str:
        return f"kvmesh.worker.{worker_id}.{verb}"

    @staticmethod
    def every_replica(subject: str) -> str:
        """`kvmesh.<service>.<verb>` -> `kvmesh.<service>.all.<verb>`: the same requests, served by
        every replica of a queue-group service outside the group, so that one request reaches each
        live replica (the gateway's hedged tries around a hung replica, services/gateway/control.py)."""
        service, verb = subject.rsplit(".", 1)
        return f"{service}.all.{verb}"

    @staticmethod
    def stream(request_id: str) -> str:
        return f"kvmesh.stream.{request_id}"


# --- kv-index: kvmesh.kv_index.overlap ------------------------------------------------------------------


class OverlapRequest(Message, tag=_tag("OverlapRequest")):
    block_hashes: list[int]  # a prompt's chained block hashes, in order (EncodeReply.block_hashes)


class OverlapReply(Message, tag=_tag("OverlapReply")):
    # worker id -> how many leading blocks of the prompt it holds (workers holding none are absent)
    overlap: dict[str, int]


OverlapResult = OverlapReply | ErrorReply

ALL_MESSAGES: tuple[type[Message], ...] = (
    ErrorReply,
    GuidedSpec,
    KVContract,
    EncodeRequest,
    EncodeReply,
    DetokenizeRequest,
    DetokenizeReply,
    RouteRequest,
    RouteReply,
    GenerateRequest,
    GenerateAccepted,
    AbortRequest,
    StatsRequest,
    WorkerStats,
    Heartbeat,
    TokenChunk,
    Finished,
    OverlapRequest,
    OverlapReply,
    RouterHealthRequest,
    RouterHealth,
    RequestStatusQuery,
    RequestStatusReply,
)
