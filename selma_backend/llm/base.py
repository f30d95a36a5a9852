"""The one interface every chat backend implements.

A backend turns a list of chat messages into the assistant's reply text. Stage 1 builds the
in-context messages; the backend only talks to a model. Registered in ``CHAT_BACKENDS``
(``selma_backend.llm.backends``) by the names the CLI and the nodes offer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str
    #: Encoded PNG images shown with ``content`` (vision-language models; stage 6's question score).
    #: Only backends that can see images accept them; the others raise ``LLMError``.
    images: tuple[bytes, ...] = ()


class ChatBackend(Protocol):
    #: Recorded as the prompt's ``source`` (e.g. ``"openai:gpt-4o-mini"``). Never contains a secret.
    source: str

    def chat(self, messages: list[ChatMessage], *, temperature: float, max_tokens: int, seed: int | None = None) -> str:
        """Return the assistant's reply. Raises ``LLMError`` with a clear message when it cannot."""
        ...

    def close(self) -> None:
        """Release the model (GPU memory, connections). Safe to call twice."""
        ...


class LLMError(RuntimeError):
    """The model could not be reached or answered nonsense after all retries; the message says why."""
