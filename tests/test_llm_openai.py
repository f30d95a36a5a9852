"""The openai backend against a real OpenAI-compatible HTTP server on 127.0.0.1 with injected faults."""

from __future__ import annotations

import json
import logging
import random

import pytest
from fakes.openai_server import (
    FakeOpenAIServer,
    delay,
    drop_connection,
    empty_choices,
    http_error,
    not_json,
    repeating_reply,
)

from selma_backend.errors import SelmaError
from selma_backend.llm.backends import CHAT_BACKENDS, ChatConfig, make_chat_backend
from selma_backend.llm.base import ChatMessage, LLMError
from selma_backend.llm.openai_backend import NO_KEY_PLACEHOLDER, OpenAIChatBackend

KEY = "sk-test-Sup3rSecretValue"
MSGS = [ChatMessage("system", "You write text-to-image prompts."), ChatMessage("user", "Write 3 new prompts.")]


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch):
    for name in ("SELMA_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server():
    with FakeOpenAIServer(models=["tiny-chat", "other-model"]) as srv:
        yield srv


def make(server, *, sleeps=None, **overrides):
    """A backend with tiny, recorded backoff so the suite stays fast."""
    kwargs = {"base_url": server.base_url, "model": "tiny-chat", "timeout_s": 0.3, "max_retries": 3,
              "backoff_base_s": 0.001, "backoff_max_s": 5.0, **overrides}
    return OpenAIChatBackend(ChatConfig(**kwargs), sleep=(sleeps.append if sleeps is not None else lambda s: None),
                             rng=random.Random(0))


def test_speaks_the_wire_format_and_returns_the_reply(server):
    with make_chat_backend(ChatConfig(base_url=server.base_url, model="tiny-chat", top_p=0.9)) as llm:
        text = llm.chat(MSGS, temperature=0.7, max_tokens=77, seed=42)
        assert llm.source == "openai:tiny-chat"
    lines = text.splitlines()
    assert [ln.split(".")[0] for ln in lines] == ["1", "2", "3"] and len(set(lines)) == 3
    (req,) = server.chat_requests
    body = req.json()
    assert body["model"] == "tiny-chat"
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in MSGS]
    assert (body["temperature"], body["max_tokens"], body["seed"], body["top_p"]) == (0.7, 77, 42, 0.9)
    assert req.headers["content-type"] == "application/json"


def test_seed_is_omitted_when_not_given(server):
    with make(server) as llm:
        llm.chat(MSGS, temperature=1.0, max_tokens=10)
    assert "seed" not in server.chat_requests[0].json()


RETRIABLE = {
    "429": http_error(429, retry_after=0),
    "500": http_error(500),
    "503": http_error(503),
    "timeout": delay(1.0),  # the client's timeout is 0.3 s
    "not-json": not_json(),
    "html-page": not_json(content_type="text/html"),
    "empty-choices": empty_choices(),
    "dropped-connection": drop_connection(),
}


@pytest.mark.parametrize("fault", RETRIABLE.values(), ids=RETRIABLE.keys())
def test_each_transient_fault_is_retried_and_nothing_is_lost(server, fault):
    server.set_reply("1. a red fox on a rooftop")
    server.push(fault)
    sleeps = []
    with make(server, sleeps=sleeps) as llm:
        assert llm.chat(MSGS, temperature=0.5, max_tokens=20, seed=3) == "1. a red fox on a rooftop"
        assert llm.attempts == 2
    assert len(sleeps) == 1 and server.faults_left == 0
    first, second = server.chat_requests
    assert first.body == second.body  # the retry sends the very same request: same messages, same seed


def test_all_faults_in_a_row_then_success_with_exponential_backoff(server):
    server.push(*RETRIABLE.values())
    sleeps = []
    llm = make(server, sleeps=sleeps, max_retries=len(RETRIABLE), backoff_base_s=0.1, backoff_max_s=1.0)
    assert llm.chat(MSGS, temperature=0.5, max_tokens=20).startswith("1. ")
    assert len(server.chat_requests) == len(RETRIABLE) + 1
    for i, s in enumerate(sleeps):  # equal jitter: between half and all of min(max, base * 2**i)
        cap = min(1.0, 0.1 * 2**i)
        assert cap / 2 <= s <= cap, (i, s)
    assert sleeps[-1] > sleeps[0] * 3  # it really grows


def test_retry_after_is_honoured(server):
    server.push(http_error(429, retry_after=2.5))
    sleeps = []
    make(server, sleeps=sleeps).chat(MSGS, temperature=0.5, max_tokens=20)
    assert sleeps == [2.5]


def test_retry_after_beyond_backoff_max_fails_at_once_and_says_why(server):
    server.push(http_error(429, retry_after=3600))
    with pytest.raises(LLMError) as err:
        make(server, backoff_max_s=60.0).chat(MSGS, temperature=0.5, max_tokens=20)
    msg = str(err.value)
    assert "3600" in msg and "Retry-After" in msg and "backoff_max_s" in msg
    assert len(server.chat_requests) == 1


def test_after_the_last_retry_a_clear_error_names_host_model_attempts_and_cause(server):
    server.push(*[http_error(500, message="CUDA out of memory")] * 4)
    with pytest.raises(LLMError) as err:
        make(server, max_retries=3).chat(MSGS, temperature=0.5, max_tokens=20)
    msg = str(err.value)
    host = server.base_url.split("//")[1].split("/")[0]
    assert f"to {host} " in msg and "/v1" not in msg  # the host only, not the whole URL
    assert "'tiny-chat'" in msg and "after 4 attempts" in msg and "HTTP 500: CUDA out of memory" in msg
    assert len(server.chat_requests) == 4
    assert err.value.__cause__ is not None  # the client's exception stays chained for tracebacks


def test_malformed_reply_until_the_end_is_reported_as_such(server):
    server.push(empty_choices(), empty_choices())
    with pytest.raises(LLMError, match=r"after 2 attempts.*empty 'choices'"):
        make(server, max_retries=1).chat(MSGS, temperature=0.5, max_tokens=20)


def test_401_is_not_retried_and_says_how_to_set_the_key(server):
    server.push(http_error(401))
    with pytest.raises(LLMError) as err:
        make(server).chat(MSGS, temperature=0.5, max_tokens=20)
    msg = str(err.value)
    assert "not retried" in msg and "401" in msg and "SELMA_LLM_API_KEY" in msg and "no key configured" in msg
    assert len(server.chat_requests) == 1


def test_404_wrong_model_lists_the_servers_models(server):
    with pytest.raises(LLMError) as err:
        make(server, model="tiny-chta").chat(MSGS, temperature=0.5, max_tokens=20)
    msg = str(err.value)
    assert "404" in msg and "'tiny-chta' is not on the server" in msg and "other-model, tiny-chat" in msg
    assert len(server.chat_requests) == 1


def test_400_is_not_retried_and_shows_the_servers_message(server):
    server.push(http_error(400, message="messages: too long for context"))
    with pytest.raises(LLMError, match="HTTP 400: messages: too long for context"):
        make(server).chat(MSGS, temperature=0.5, max_tokens=20)
    assert len(server.chat_requests) == 1


def test_switches_to_max_completion_tokens_when_the_server_asks(server):
    server.push(http_error(400, message="Unsupported parameter: 'max_tokens'. Use 'max_completion_tokens' instead."))
    llm = make(server)
    llm.chat(MSGS, temperature=0.5, max_tokens=20)
    llm.chat(MSGS, temperature=0.5, max_tokens=20)
    bodies = [r.json() for r in server.chat_requests]
    assert "max_tokens" in bodies[0]
    assert [b.get("max_completion_tokens") for b in bodies[1:]] == [20, 20] and "max_tokens" not in bodies[1]


def test_key_goes_in_the_header_and_nowhere_else(monkeypatch, caplog):
    monkeypatch.setenv("SELMA_LLM_API_KEY", KEY)
    with FakeOpenAIServer(api_key=KEY) as srv, caplog.at_level(logging.DEBUG):
        srv.push(http_error(500), http_error(429, retry_after=0))
        llm = make(srv)
        llm.chat(MSGS, temperature=0.5, max_tokens=20)
        srv.push(*[http_error(503)] * 4)
        with pytest.raises(LLMError) as exhausted:
            llm.chat(MSGS, temperature=0.5, max_tokens=20)
        srv.push(http_error(401, message=f"key {KEY} was revoked"))  # a server that echoes the key
        with pytest.raises(LLMError) as rejected:
            llm.chat(MSGS, temperature=0.5, max_tokens=20)
        with pytest.raises(LLMError) as missing:
            make(srv, model="nope").chat(MSGS, temperature=0.5, max_tokens=20)
        shown = [repr(llm), llm.source, json.dumps(llm.config.to_dict()), caplog.text]
        for err in (exhausted.value, rejected.value, missing.value):
            e: BaseException | None = err
            while e is not None:  # the message and every chained cause
                shown.append(str(e))
                e = e.__cause__
        requests = srv.requests
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in requests)
    assert not [r for r in requests if KEY.encode() in r.body or KEY in r.path]
    assert not [r for r in requests if any(KEY in v for k, v in r.headers.items() if k != "authorization")]
    assert [s for s in shown if KEY in s] == []
    assert "<redacted>" in str(rejected.value) and "env SELMA_LLM_API_KEY" in str(rejected.value)
    assert "env SELMA_LLM_API_KEY" in repr(llm)


def test_key_from_the_user_dir_file(tmp_path):
    (tmp_path / "selma").mkdir()
    (tmp_path / "selma" / "llm_api_key").write_text(KEY + "\n")
    (tmp_path / "selma" / "llm_api_key").chmod(0o600)
    with FakeOpenAIServer(api_key=KEY) as srv:
        cfg = ChatConfig(base_url=srv.base_url, model="tiny-chat")
        with make_chat_backend(cfg, user_dir=tmp_path) as llm:
            assert llm.chat(MSGS, temperature=0.5, max_tokens=20)
        assert srv.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_a_local_server_without_a_key_works(server):
    with make(server) as llm:
        llm.chat(MSGS, temperature=0.5, max_tokens=20)
    assert server.requests[0].headers["authorization"] == f"Bearer {NO_KEY_PLACEHOLDER}"


def test_close_is_idempotent_and_final(server):
    llm = make(server)
    llm.close()
    llm.close()
    with pytest.raises(LLMError, match="closed"):
        llm.chat(MSGS, temperature=0.5, max_tokens=20)


def test_unreachable_server_is_retried_then_reported():
    with FakeOpenAIServer() as srv:
        url = srv.base_url
    with pytest.raises(LLMError, match=r"after 2 attempts; last cause: connection failed"):
        OpenAIChatBackend(ChatConfig(base_url=url, model="m", max_retries=1, backoff_base_s=0.001),
                          sleep=lambda s: None).chat(MSGS, temperature=0.5, max_tokens=20)


def test_list_models(server):
    assert make(server).list_models() == ["other-model", "tiny-chat"]


def test_a_model_that_repeats_itself_is_returned_as_is(server):
    # Ending a loop on a repetitive model is the generation loop's job (its request budget).
    server.set_reply(repeating_reply("1. a red apple"))
    llm = make(server)
    assert {llm.chat(MSGS, temperature=1.0, max_tokens=20, seed=s) for s in range(3)} == {"1. a red apple"}


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("backend", "gpt", "'openai', 'transformers'"),
        ("temperature", 3.0, "<= 2.0"),
        ("top_p", 0.0, "> 0.0"),
        ("max_tokens", 0, "an integer from 1"),
        ("timeout_s", 0, "> 0.0"),
        ("max_retries", -1, "an integer from 0"),
        ("base_url", "localhost:11434", "an http(s) URL"),
        ("device", "tpu", "'cuda:N'"),
        ("dtype", "fp8", "'bfloat16'"),
        ("model", "", "a model the server serves"),
    ],
)
def test_config_validation_names_field_value_and_allowed(field, value, allowed):
    kwargs = {"model": "m", field: value}
    with pytest.raises(SelmaError) as err:
        ChatConfig(**kwargs)
    msg = str(err.value)
    assert msg.startswith(f"{field}: got {value!r}; allowed:") and allowed in msg


def test_registry_and_cross_field_rules():
    assert {"openai", "transformers"} <= set(CHAT_BACKENDS.names())
    with pytest.raises(SelmaError, match="model_path"):
        ChatConfig(backend="transformers")
    assert ChatConfig(backend="transformers", model_path="/models/LLM/x").model == ""
    with pytest.raises(SelmaError, match="backoff_max_s"):
        ChatConfig(model="m", backoff_base_s=10, backoff_max_s=1)
