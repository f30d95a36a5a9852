"""Where an LLM API key comes from, and how it stays out of everything SELMA writes.

A key is looked up, first hit wins:

1. the environment variable named by ``ChatConfig.api_key_env`` when one is set; otherwise
   ``SELMA_LLM_API_KEY``, then ``OPENAI_API_KEY`` (empty values count as unset);
2. the file ``<ComfyUI user dir>/selma/llm_api_key`` (``KEY_FILE``): the first line that is not
   blank and does not start with ``#``. On POSIX a file that group or others may read is still used,
   with a warning to ``chmod 600`` it.

No key is fine: a local server (Ollama, llama.cpp, vLLM, LM Studio) does not need one.

A key never enters a widget, a config, an artefact or a log line. It travels as a ``Secret``, whose
``repr``/``str`` show only where it came from; ``redact`` scrubs it out of text taken from elsewhere
(e.g. a server's error body) before that text goes into an error message.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger("selma.llm")

#: Environment variables consulted, in order, when the config names none.
DEFAULT_KEY_ENV_VARS: tuple[str, ...] = ("SELMA_LLM_API_KEY", "OPENAI_API_KEY")
#: The key file, relative to ComfyUI's user directory (``folder_paths.get_user_directory()``).
KEY_FILE = Path("selma") / "llm_api_key"
#: How an error message tells a person to provide a key.
KEY_HINT = (
    "set the environment variable SELMA_LLM_API_KEY (or OPENAI_API_KEY) before starting ComfyUI, "
    f"or write the key into <ComfyUI user dir>/{KEY_FILE.as_posix()} (chmod 600)"
)


class Secret:
    """An API key and where it came from. Printing it shows the origin, never the value.

    A plain class, not a dataclass, so ``dataclasses.asdict`` of a config can never pick it up.
    """

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str) -> None:
        self._value = value
        self.origin = origin  # e.g. "env SELMA_LLM_API_KEY" or "file /home/u/ComfyUI/user/selma/llm_api_key"

    def __repr__(self) -> str:
        return f"Secret(<hidden>, origin={self.origin!r})"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("an API key is not picklable; resolve it again where it is needed")

    def reveal(self) -> str:
        """The key itself, for the one place that must send it (the HTTP client)."""
        return self._value


def find_api_key(
    user_dir: Path | None,
    env_vars: tuple[str, ...] = DEFAULT_KEY_ENV_VARS,
    *,
    environ: Mapping[str, str] | None = None,
) -> Secret | None:
    """Look the key up in ``env_vars`` (in order), then in ``user_dir / KEY_FILE``; None if absent."""
    environ = os.environ if environ is None else environ
    for name in env_vars:
        value = environ.get(name, "").strip()
        if value:
            return Secret(value, f"env {name}")
    if user_dir is None:
        return None
    path = Path(user_dir) / KEY_FILE
    if not path.is_file():
        return None
    value = _first_key_line(path)
    if not value:
        return None
    _warn_if_readable_by_others(path)
    return Secret(value, f"file {path}")


def resolve_api_key(user_dir: Path | None, env_vars: tuple[str, ...] = DEFAULT_KEY_ENV_VARS) -> str | None:
    """The key's value (see the module docstring for the order), or None when none is configured."""
    secret = find_api_key(user_dir, env_vars)
    return None if secret is None else secret.reveal()


def redact(text: str, secret: Secret | str | None) -> str:
    """``text`` with every occurrence of the key replaced by ``<redacted>``."""
    value = secret.reveal() if isinstance(secret, Secret) else secret
    if not value:
        return text
    return text.replace(value, "<redacted>")


def _first_key_line(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return ""


def _warn_if_readable_by_others(path: Path) -> None:
    if os.name != "posix":
        return
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s can be read by other users (mode %s); run: chmod 600 %s", path, oct(mode & 0o777), path)
