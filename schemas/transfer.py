"""Messages of prefill/decode disaggregation: remote prefill, block leases, NIXL agent metadata.

The KV bytes themselves never cross NATS: the decode worker pulls them with a NIXL READ straight
out of the prefill worker's registered KV cache. NATS carries only the control plane below.

Subjects (per prefill worker): `kvmesh.worker.<id>.prefill` (PrefillRequest -> PrefillResult),
`kvmesh.worker.<id>.release` (ReleaseBlocks, fire and forget) and `kvmesh.worker.<id>.nixl`
(NixlInfoRequest -> NixlInfo, once per peer, again after the peer restarts).
"""

from __future__ import annotations

from kvmesh.schemas.messages import ErrorReply, Message, _tag


class KVLayout(Message):
    """What must match for two workers' blocks to be interchangeable byte for byte."""

    model: str  # model folder name
    dtype: str  # torch dtype name of the cache
    block_size: int  # tokens per block
    block_shape: list[int]  # [layers, 2, kv_heads, block_size, head_dim]
    block_bytes: int  # bytes of one block (all layers): one NIXL descriptor


class NixlInfoRequest(Message, tag=_tag("NixlInfoRequest")):
    pass


class NixlInfo(Message, tag=_tag("NixlInfo")):
    """A worker's NIXL agent: metadata to connect, and where its KV cache lives."""

    agent_name: str  # unique per process start: a new name means the peer restarted
    metadata: bytes  # nixl_agent.get_agent_metadata()
    base_addr: int  # address of block 0 in the peer's registered KV cache
    num_blocks: int
    mem_type: str  # DRAM (host) or VRAM (GPU)
    device_id: int
    layout: KVLayout


class PrefillRequest(Message, tag=_tag("PrefillRequest")):
    """Compute the KV of these tokens (whole blocks only) and pin the blocks for a pull."""

    request_id: str
    token_ids: list[int]  # a multiple of the block size
    cache_salt: str | None = None  # the request's (GenerateRequest.cache_salt): hashed as it is there


class PrefillReply(Message, tag=_tag("PrefillReply")):
    """The prompt's blocks, in order, pinned on the prefill worker until released or the lease ends."""

    request_id: str
    agent_name: str  # the prefill worker's NIXL agent (NixlInfo.agent_name)
    block_ids: list[int]  # the prefill worker's block ids, one per block of token_ids
    lease_s: float  # the blocks are freed this long after the reply if nobody releases them
    num_cached_tokens: int  # tokens the prefill worker found in its own prefix cache
    prefill_s: float  # time from the request's arrival to its blocks being ready


class ReleaseBlocks(Message, tag=_tag("ReleaseBlocks")):
    request_id: str


PrefillResult = PrefillReply | ErrorReply
NixlInfoResult = NixlInfo | ErrorReply

ALL_TRANSFER_MESSAGES: tuple[type[Message], ...] = (
    NixlInfoRequest,
    NixlInfo,
    PrefillRequest,
    PrefillReply,
    ReleaseBlocks,
)
