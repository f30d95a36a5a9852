"""Where the LLM API key comes from, and that it never shows in reprs, configs or errors."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle

import pytest

from selma_backend.errors import SelmaError
from selma_backend.llm.backends import ChatConfig
from selma_backend.llm.secrets import KEY_FILE, Secret, find_api_key, redact, resolve_api_key

KEY = "sk-test-Sup3rSecretValue"


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch):
    for name in ("SELMA_LLM_API_KEY", "OPENAI_API_KEY", "GROQ_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def _write_key_file(user_dir, text, mode=0o600):
    path = user_dir / KEY_FILE
    path.parent.mkdir(parents=True)
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_selma_env_wins_over_openai_env_and_file(monkeypatch, tmp_path):
    _write_key_file(tmp_path, "from-file\n")
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai")
    monkeypatch.setenv("SELMA_LLM_API_KEY", "  from-selma \n")
    assert resolve_api_key(tmp_path) == "from-selma"
    assert find_api_key(tmp_path).origin == "env SELMA_LLM_API_KEY"


def test_openai_env_is_the_fallback_and_empty_values_count_as_unset(monkeypatch, tmp_path):
    monkeypatch.setenv("SELMA_LLM_API_KEY", "   ")
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai")
    assert resolve_api_key(tmp_path) == "from-openai"


def test_key_file_first_real_line(tmp_path):
    path = _write_key_file(tmp_path, "# my key for the vLLM box\n\n  from-file  \nignored\n")
    secret = find_api_key(tmp_path)
    assert secret.reveal() == "from-file"
    assert secret.origin == f"file {path}"


def test_no_key_anywhere_is_none(tmp_path):
    assert resolve_api_key(tmp_path) is None
    assert resolve_api_key(None) is None
    _write_key_file(tmp_path, "# only a comment\n")
    assert resolve_api_key(tmp_path) is None


def test_config_named_env_var_is_the_only_env_var_consulted(monkeypatch, tmp_path):
    monkeypatch.setenv("SELMA_LLM_API_KEY", "not-this-one")
    monkeypatch.setenv("GROQ_API_KEY", "groq-key")
    cfg = ChatConfig(model="m", api_key_env="GROQ_API_KEY")
    assert cfg.key_env_vars == ("GROQ_API_KEY",)
    assert resolve_api_key(tmp_path, cfg.key_env_vars) == "groq-key"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_world_readable_key_file_warns_without_showing_the_key(tmp_path, caplog):
    path = _write_key_file(tmp_path, KEY, mode=0o644)
    with caplog.at_level(logging.WARNING, logger="selma.llm"):
        assert resolve_api_key(tmp_path) == KEY
    assert "chmod 600" in caplog.text and str(path) in caplog.text
    assert KEY not in caplog.text
    caplog.clear()
    os.chmod(path, 0o600)
    with caplog.at_level(logging.WARNING, logger="selma.llm"):
        resolve_api_key(tmp_path)
    assert caplog.text == ""


def test_secret_hides_its_value():
    secret = Secret(KEY, "env SELMA_LLM_API_KEY")
    for shown in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"k": secret})):
        assert KEY not in shown
        assert "SELMA_LLM_API_KEY" in shown
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    assert secret.reveal() == KEY


def test_redact():
    assert redact(f"bad key {KEY}!", Secret(KEY, "x")) == "bad key <redacted>!"
    assert redact("nothing here", None) == "nothing here"


def test_config_never_holds_a_key_even_if_pasted_into_api_key_env():
    with pytest.raises(SelmaError) as err:
        ChatConfig(model="m", api_key_env=KEY)
    assert "api_key_env" in str(err.value) and "NAME of an environment variable" in str(err.value)
    assert KEY not in str(err.value)
    # Credentials inside the URL are refused without being repeated either.
    with pytest.raises(SelmaError) as err:
        ChatConfig(model="m", base_url=f"https://user:{KEY}@api.example.com/v1")
    assert "base_url" in str(err.value) and KEY not in str(err.value)
    assert all(KEY not in str(v) for v in dataclasses.asdict(ChatConfig(model="m")).values())
