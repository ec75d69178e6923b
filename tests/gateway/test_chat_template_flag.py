"""The tokenizer service's `--chat-template` (vLLM's flag): a template file, or the template itself,
replaces the model's own for every chat request; `kvmesh up` passes it to the tokenizer."""

from __future__ import annotations

import pytest

from kvmesh.libs import cli
from kvmesh.schemas.messages import ChatMessage, EncodeReply, EncodeRequest
from kvmesh.services.tokenizer.service import TokenizerConfig, TokenizerService, load_chat_template

TEMPLATE = (
    "{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}"
)
MESSAGES = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")]


def _render(service: TokenizerService) -> str:
    reply = service.encode(EncodeRequest(request_id="r", messages=MESSAGES, add_generation_prompt=True))
    assert isinstance(reply, EncodeReply), reply
    return service.fast.decode(reply.token_ids, skip_special_tokens=False)


@pytest.mark.parametrize("given", ["file", "inline"])
def test_an_overriding_template_is_the_one_used(default_model_path, tmp_path, given):
    path = tmp_path / "template.jinja"
    path.write_text(TEMPLATE)
    value = str(path) if given == "file" else TEMPLATE
    config = TokenizerConfig("nats://unused", str(default_model_path), chat_template=value)
    assert (
        _render(TokenizerService(config, default_model_path)) == "[SYSTEM] Be brief.\n[USER] Hi\n[ASSISTANT]"
    )


def test_without_the_flag_the_models_template_is_used(default_model_path):
    config = TokenizerConfig("nats://unused", str(default_model_path))
    assert _render(TokenizerService(config, default_model_path)).startswith("<|im_start|>system\nBe brief.")


def test_a_missing_file_is_an_error_at_start(tmp_path, capsys):
    with pytest.raises(ValueError, match="no such file"):
        load_chat_template(str(tmp_path / "nope.jinja"))
    assert cli.main(["up", "--port", "0", "--chat-template", str(tmp_path / "nope.jinja")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_kvmesh_up_passes_it_to_the_tokenizer(monkeypatch, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(TEMPLATE)
    seen = {}

    class FakeMesh:
        def __init__(self, config):
            seen["config"] = config
            raise SystemExit(0)

    monkeypatch.setattr("kvmesh.libs.launcher.Mesh", FakeMesh)
    monkeypatch.setattr("kvmesh.libs.engine.model_store.resolve_model", lambda name: tmp_path)
    with pytest.raises(SystemExit):
        cli.main(["up", "--port", "0", "--chat-template", str(path), "--reasoning-parser", "qwen3"])
    assert seen["config"].tokenizer_args == ["--chat-template", str(path.resolve())]
    assert seen["config"].gateway_args == ["--reasoning-parser", "qwen3"]
