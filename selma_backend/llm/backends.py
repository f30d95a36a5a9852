"""Stage 1's chat backends by name, and the one config that builds any of them.

    from selma_backend.llm.backends import ChatConfig, make_chat_backend

    cfg = ChatConfig(backend="openai", base_url="http://127.0.0.1:11434/v1", model="llama3.1:8b")
    with make_chat_backend(cfg, user_dir=comfy_user_dir) as llm:
        text = llm.chat(messages, temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=7)

``CHAT_BACKENDS`` maps a name to a factory ``(config, *, user_dir) -> ChatBackend``; the node's and
the CLI's choices are ``CHAT_BACKENDS.names()``. Factories import their heavy packages (``openai``,
``torch``/``transformers``) only when called, so importing this module is cheap.

``ChatConfig`` is data recorded in artefacts: it never holds an API key, only the *name* of the
environment variable to read it from (see ``selma_backend.llm.secrets``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import invalid
from ..registry import Registry
from .base import ChatBackend

#: Default endpoint: a local Ollama server's OpenAI-compatible API (no key needed).
#: Others: llama.cpp server ``http://127.0.0.1:8080/v1``, vLLM ``http://127.0.0.1:8000/v1``,
#: LM Studio ``http://127.0.0.1:1234/v1``, OpenAI ``https://api.openai.com/v1``.
DEFAULT_BASE_URL = "http://127.0.0.1:11434/v1"

DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" is accepted too
DTYPES = ("auto", "float32", "float16", "bfloat16")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

ChatBackendFactory = Callable[..., ChatBackend]
CHAT_BACKENDS: Registry[ChatBackendFactory] = Registry("backend")


@dataclass(frozen=True)
class ChatConfig:
    """How stage 1 talks to a chat model. Validated on construction; safe to record (no secrets)."""

    backend: str = "openai"
    # -- openai: any OpenAI-compatible server
    base_url: str = DEFAULT_BASE_URL
    model: str = ""  # the server's model name, e.g. "llama3.1:8b", "gpt-4o-mini"
    # -- sampling, used by the generation loop for every call
    temperature: float = 1.0
    top_p: float = 0.95
    max_tokens: int = 1024
    # -- openai: robustness
    timeout_s: float = 120.0
    max_retries: int = 4  # retries after the first attempt, on 429/5xx/timeouts/bad replies
    backoff_base_s: float = 1.0  # first wait; doubles each retry, with jitter
    backoff_max_s: float = 60.0  # longest wait; a Retry-After above it fails at once, saying so
    api_key_env: str = ""  # env var holding the key; "" = SELMA_LLM_API_KEY, then OPENAI_API_KEY
    # -- transformers: a local model folder
    model_path: str = ""
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False  # load .bin (pickle) weights when a folder has no .safetensors

    def __post_init__(self) -> None:
        if self.backend not in CHAT_BACKENDS:
            raise invalid("backend", self.backend, CHAT_BACKENDS.names())
        _check_range("temperature", self.temperature, 0.0, 2.0)
        _check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("max_tokens", self.max_tokens, 1, 1_000_000)
        _check_range("timeout_s", self.timeout_s, 0.0, 3600.0, low_open=True)
        _check_int("max_retries", self.max_retries, 0, 50)
        _check_range("backoff_base_s", self.backoff_base_s, 0.0, 600.0)
        _check_range("backoff_max_s", self.backoff_max_s, self.backoff_base_s, 3600.0)
        self._check_base_url()
        self._check_api_key_env()
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise invalid("device", self.device, [*DEVICES, "cuda:N"])
        if self.dtype not in DTYPES:
            raise invalid("dtype", self.dtype, DTYPES)
        if self.backend == "openai" and not str(self.model).strip():
            raise invalid(
                "model", self.model, "the name of a model the server serves",
                "e.g. 'llama3.1:8b' for Ollama (see `ollama list`) or 'gpt-4o-mini' for OpenAI",
            )
        if self.backend == "transformers" and not str(self.model_path).strip():
            raise invalid(
                "model_path", self.model_path, "a folder with config.json, a tokenizer and weights",
                "put the model under ComfyUI/models/LLM/<name>/ and choose it",
            )

    def _check_base_url(self) -> None:
        parts = urlsplit(str(self.base_url))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise invalid("base_url", self.base_url, "an http(s) URL such as " + DEFAULT_BASE_URL)
        if parts.username or parts.password:
            # Never echo it: user:password@ is a credential, and configs are recorded.
            raise invalid("base_url", "<URL with user:password@ hidden>", "a URL without credentials",
                          "give the key through SELMA_LLM_API_KEY instead")

    def _check_api_key_env(self) -> None:
        if self.api_key_env and not _ENV_NAME.match(str(self.api_key_env)):
            # Someone may have pasted the key itself here: do not repeat the value.
            raise invalid("api_key_env", "<hidden>", "the NAME of an environment variable, e.g. 'GROQ_API_KEY'",
                          "never the key itself; set the key in that variable before starting ComfyUI")

    @property
    def key_env_vars(self) -> tuple[str, ...]:
        """The environment variables consulted for the API key, in order."""
        from .secrets import DEFAULT_KEY_ENV_VARS

        return (self.api_key_env,) if self.api_key_env else DEFAULT_KEY_ENV_VARS

    def to_dict(self) -> dict[str, Any]:
        """Plain data for artefacts (``dataset.json``, prompts metadata)."""
        return asdict(self)


def make_chat_backend(config: ChatConfig, *, user_dir: Path | None = None) -> ChatBackend:
    """Build the backend ``config.backend`` names. ``user_dir``: ComfyUI's user directory (key file)."""
    return CHAT_BACKENDS.get(config.backend)(config, user_dir=user_dir)


@CHAT_BACKENDS.register("openai")
def _openai(config: ChatConfig, *, user_dir: Path | None = None) -> ChatBackend:
    from .openai_backend import OpenAIChatBackend

    return OpenAIChatBackend(config, user_dir=user_dir)


@CHAT_BACKENDS.register("transformers")
def _transformers(config: ChatConfig, *, user_dir: Path | None = None) -> ChatBackend:
    from .transformers_backend import TransformersChatBackend

    return TransformersChatBackend(config)


def _check_range(name: str, value: object, low: float, high: float, *, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (low < value if low_open else low <= value)
    if not ok or value > high:  # type: ignore[operator]
        raise invalid(name, value, f"a number {'>' if low_open else '>='} {low} and <= {high}")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise invalid(name, value, f"an integer from {low} to {high}")
