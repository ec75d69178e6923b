import msgspec
import pytest

from kvmesh.libs.bus import decode, encode
from kvmesh.schemas import export, messages
from kvmesh.schemas.messages import ErrorReply, Finished, StreamMessage, TokenChunk


def test_exported_json_schema_is_current():
    assert export.OUT.read_text() == export.render(), "stale: run python -m kvmesh.schemas.export"


def test_tagged_union_round_trip_and_versioned_tags():
    for msg in (
        TokenChunk(token_ids=[1, 2]),
        Finished(finish_reason="stop", num_prompt_tokens=3, num_output_tokens=2, num_cached_tokens=0),
        ErrorReply(code="internal", message="x"),
    ):
        assert decode(encode(msg), StreamMessage) == msg
    assert msgspec.msgpack.decode(encode(TokenChunk(token_ids=[]))) == {
        "type": "TokenChunk.v1",
        "token_ids": [],
    }


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00garbage",
        msgspec.msgpack.encode({"type": "TokenChunk.v2"}),
        msgspec.msgpack.encode({"type": "TokenChunk.v1", "token_ids": ["x"]}),
        msgspec.msgpack.encode({"type": "TokenChunk.v1", "token_ids": [], "extra": 1}),
    ],
)
def test_strict_decoding_rejects_malformed_and_foreign_versions(raw):
    with pytest.raises(msgspec.DecodeError):
        decode(raw, StreamMessage)


def test_every_message_is_in_the_export():
    assert set(messages.ALL_MESSAGES) <= set(export.TYPES)
