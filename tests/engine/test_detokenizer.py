import pytest
from transformers import AutoTokenizer

from kvmesh.libs.detokenizer import IncrementalDetokenizer, StopStringMatcher, backend_tokenizer


@pytest.fixture(scope="module")
def tok(default_model_path):
    return backend_tokenizer(AutoTokenizer.from_pretrained(default_model_path))


@pytest.mark.parametrize("text", ["héllo wörld ✓", "emoji 🦀🔥 and 中文字符 mixed", "plain ascii text"])
def test_incremental_text_equals_full_decode(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.step(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces), "never emit half a character"


def test_multibyte_character_split_across_tokens(tok):
    ids = tok.encode("🦀", add_special_tokens=False).ids
    assert len(ids) > 1, "the byte-level tokenizer splits this emoji"
    detok = IncrementalDetokenizer(tok)
    assert [detok.step(t) for t in ids][:-1] == [""] * (len(ids) - 1)


def test_stop_string_spanning_deltas_is_cut_and_never_emitted():
    m = StopStringMatcher(["STOP here"])
    emitted = ""
    for delta in ["Hello ", "wor", "ld ST", "OP h", "ere and more"]:
        match = m.feed(delta)
        emitted += match.emit
        if match.stopped:
            break
    assert match.stopped and emitted == "Hello world "


def test_holdback_is_released_when_no_stop_comes():
    m = StopStringMatcher(["abc"])
    assert m.feed("xxab").emit == "xx"  # "ab" may still become "abc"
    assert m.feed("d").emit == "abd"  # it did not: released with the new text
    assert m.feed("ab").emit == ""
    assert m.flush() == "ab"  # the request ended: nothing is lost


def test_include_stop_string():
    m = StopStringMatcher(["END"], include_stop_str_in_output=True)
    assert m.feed("the END of it") == ("the END", True)
