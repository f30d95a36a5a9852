"""Any OpenAI-compatible chat endpoint (OpenAI, Ollama, vLLM, llama.cpp server, LM Studio).

The ``openai`` client does the wire format; its own retries are off (``max_retries=0``) and this
module retries instead, so that every attempt is counted and the final error says what happened:

* retried, with exponential backoff and jitter: 408, 409, 429 (``Retry-After`` honoured), 5xx,
  timeouts, connection errors, bodies that are not JSON, replies without ``choices``/content;
* not retried: 400/422 (the server's message), 401/403 (how to give a key), 404 (the model
  name is wrong: the models the server offers are listed when ``/models`` answers).

The API key (``selma_backend.llm.secrets``) is only handed to the client; ``repr``, ``source``,
error messages and log lines carry its origin at most, and server text is redacted before use.
"""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import openai

from .backends import ChatConfig
from .base import ChatMessage, LLMError
from .secrets import KEY_HINT, Secret, find_api_key, redact

log = logging.getLogger("selma.llm")

#: Sent when no key is configured: the client insists on one, local servers ignore it.
NO_KEY_PLACEHOLDER = "not-needed"
_RETRY_STATUS = {408, 409, 429}


@dataclass
class _Failure:
    """One failed attempt: why, whether to try again, and how long the server asked us to wait."""

    cause: str
    retry: bool
    retry_after_s: float | None = None
    exc: BaseException | None = None  # chained as the LLMError's __cause__ unless it shows the key


class OpenAIChatBackend:
    """``ChatBackend`` over the ``openai`` client. ``sleep``/``rng`` are injectable for tests."""

    def __init__(
        self,
        config: ChatConfig,
        *,
        user_dir: Path | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.source = f"openai:{config.model}"
        self.host = urlsplit(config.base_url).netloc  # host[:port]; URLs with credentials are refused
        self._secret: Secret | None = find_api_key(user_dir, config.key_env_vars)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._token_param = "max_tokens"
        self.attempts = 0  # HTTP attempts made so far (all calls), for progress and tests
        self._client: openai.OpenAI | None = openai.OpenAI(
            base_url=config.base_url,
            api_key=self._secret.reveal() if self._secret else NO_KEY_PLACEHOLDER,
            timeout=config.timeout_s,
            max_retries=0,
        )

    def __repr__(self) -> str:
        key = self._secret.origin if self._secret else "none"
        return f"OpenAIChatBackend(model={self.config.model!r}, host={self.host!r}, key_from={key!r})"

    # -- ChatBackend
    def chat(self, messages: list[ChatMessage], *, temperature: float, max_tokens: int, seed: int | None = None) -> str:
        """Return the reply's text; after ``config.max_retries`` retries raise ``LLMError``."""
        client = self._require_open()
        payload: dict[str, object] = {
            "model": self.config.model,
            "messages": [wire_message(m) for m in messages],
            "temperature": temperature,
            "top_p": self.config.top_p,
        }
        if seed is not None:
            payload["seed"] = seed
        tries = self.config.max_retries + 1
        failure = _Failure("no attempt made", retry=False)
        for attempt in range(tries):
            self.attempts += 1
            try:
                reply = client.chat.completions.create(**payload, **{self._token_param: max_tokens})
            except openai.BadRequestError as e:
                if self._token_param == "max_tokens" and "max_completion_tokens" in str(e):
                    # Newer OpenAI models refuse max_tokens; switch once, and this try does not count.
                    self._token_param = "max_completion_tokens"
                    self.attempts -= 1
                    return self.chat(messages, temperature=temperature, max_tokens=max_tokens, seed=seed)
                failure = self._classify(e)
            except Exception as e:  # noqa: BLE001 - classified below; unknown kinds re-raised
                failure = self._classify(e)
            else:
                text, failure = _reply_text(reply)
                if text is not None:
                    return text
            if not failure.retry:
                raise self._error(failure, attempt + 1, final=True)
            if attempt + 1 < tries:
                self._wait(attempt, failure)
        raise self._error(failure, tries, final=False)

    def close(self) -> None:
        """Close the HTTP connections. Safe to call twice."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> OpenAIChatBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- extras for the node and the CLI
    def list_models(self) -> list[str]:
        """The model names the server offers (``GET /models``); raises ``LLMError`` if it cannot say."""
        client = self._require_open()
        try:
            return sorted(m.id for m in client.models.list())
        except Exception as e:  # noqa: BLE001
            raise LLMError(self._redact(f"{self.host}: could not list models: {type(e).__name__}: {e}")) from None

    # -- internals
    def _require_open(self) -> openai.OpenAI:
        if self._client is None:
            raise LLMError(f"{self.source}: the backend was closed; create a new one")
        return self._client

    def _classify(self, e: Exception) -> _Failure:
        failure = self._describe(e)
        failure.exc = e
        return failure

    def _describe(self, e: Exception) -> _Failure:
        if isinstance(e, openai.APITimeoutError):
            return _Failure(f"timed out after {self.config.timeout_s:g} s", retry=True)
        if isinstance(e, openai.APIConnectionError):
            return _Failure(f"connection failed ({_root_cause(e)})", retry=True)
        if isinstance(e, openai.APIStatusError):
            return self._classify_status(e)
        if isinstance(e, (openai.APIResponseValidationError, ValueError)):  # JSONDecodeError is a ValueError
            return _Failure(f"the reply was not valid JSON ({type(e).__name__})", retry=True)
        raise e

    def _classify_status(self, e: openai.APIStatusError) -> _Failure:
        status = e.status_code
        said = _server_message(e)
        if status in (401, 403):
            origin = self._secret.origin if self._secret else "no key configured"
            return _Failure(f"HTTP {status}, the server refused the API key ({origin}): {said}. To fix: {KEY_HINT}",
                            retry=False)
        if status == 404:
            return _Failure(f"HTTP 404: {said}. {self._model_hint()}", retry=False)
        if status in _RETRY_STATUS or status >= 500:
            return _Failure(f"HTTP {status}: {said}", retry=True, retry_after_s=_retry_after(e.response))
        return _Failure(f"HTTP {status}: {said}", retry=False)

    def _model_hint(self) -> str:
        try:
            names = self.list_models()
        except LLMError:
            return f"Check the model name and that base_url ends with the API root (e.g. {self.host}/v1)"
        if self.config.model in names:
            return f"The server has model {self.config.model!r}: check that base_url is the API root (often ends in /v1)"
        shown = ", ".join(names[:30]) + (" …" if len(names) > 30 else "")
        return f"Model {self.config.model!r} is not on the server; it offers: {shown or '(none)'}"

    def _wait(self, attempt: int, failure: _Failure) -> None:
        cfg = self.config
        if failure.retry_after_s is not None and failure.retry_after_s > cfg.backoff_max_s:
            failure.cause += (f"; the server asks to wait {failure.retry_after_s:g} s (Retry-After), longer than "
                              f"backoff_max_s={cfg.backoff_max_s:g}. Wait and resume, or raise backoff_max_s")
            raise self._error(failure, attempt + 1, final=True)
        delay = min(cfg.backoff_max_s, cfg.backoff_base_s * 2**attempt)
        delay = delay / 2 + self._rng.random() * delay / 2  # "equal jitter": spread clients, keep a floor
        delay = max(delay, failure.retry_after_s or 0.0)
        log.info("%s at %s: %s; retry %d/%d in %.2f s", self.source, self.host, failure.cause,
                 attempt + 1, cfg.max_retries, delay)
        self._sleep(delay)

    def _error(self, failure: _Failure, attempts: int, *, final: bool) -> LLMError:
        what = "failed, not retried" if final else f"failed after {attempts} attempts"
        msg = (f"LLM request to {self.host} (model {self.config.model!r}) {what}"
               f"{f' (attempt {attempts})' if final and attempts > 1 else ''}; last cause: {failure.cause}")
        err = LLMError(self._redact(msg))
        if failure.exc is not None and self._redact(str(failure.exc)) == str(failure.exc):
            err.__cause__ = failure.exc  # chained only when the server's text did not echo the key
        err.__suppress_context__ = True
        return err

    def _redact(self, text: str) -> str:
        return redact(text, self._secret)


def wire_message(m: ChatMessage) -> dict[str, object]:
    """One message in the OpenAI wire format; with images, the vision form: a text part, then one
    ``image_url`` part per image as a ``data:image/png;base64,...`` URL (what OpenAI, vLLM, Ollama and
    llama.cpp servers accept)."""
    if not m.images:
        return {"role": m.role, "content": m.content}
    parts: list[dict[str, object]] = [{"type": "text", "text": m.content}]
    for png in m.images:
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return {"role": m.role, "content": parts}


def _reply_text(reply: object) -> tuple[str | None, _Failure]:
    """The assistant text of a parsed reply, or why there is none (always worth a retry)."""
    choices = getattr(reply, "choices", None)
    if isinstance(reply, str) or choices is None:
        said = getattr(reply, "error", None)
        said = f": server said {str(said)[:300]}" if said else " (not JSON, or no 'choices')"
        return None, _Failure(f"the reply was not a chat completion{said}", retry=True)
    if not choices:
        return None, _Failure("the reply had an empty 'choices' list", retry=True)
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str):
        return None, _Failure("the reply's first choice had no text content", retry=True)
    return content, _Failure("", retry=False)


def _server_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:500].rstrip(". ")
    return (e.response.text or e.message or "")[:500].rstrip(". ")


def _retry_after(response: object) -> float | None:
    """Seconds from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), else None."""
    headers = getattr(response, "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if not value:
            return None
        try:
            return max(0.0, float(value))
        except ValueError:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def _root_cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return type(e).__name__
