"""A real ComfyUI server (0.3.75, provisioned by scripts/dev.sh) for the tests.

Started with ``--cpu`` on 127.0.0.1 on a free port, with a temporary ``--base-directory``
(models, output, input, user, custom_nodes) and this pack linked into ``custom_nodes``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-SELMA"
DEFAULT_CACHE = Path(os.environ.get("SELMA_CACHE_DIR", Path.home() / ".cache" / "comfyui-selma"))

#: Start of a script run *inside* ComfyUI's folder in its own process (ComfyUI's top-level modules,
#: ``nodes``, ``server``, ``utils``…, must not enter pytest's interpreter): ComfyUI importable, CPU,
#: and every log message collected in ``messages``.
COMFY_PROLOGUE = r"""
import json, logging, os, sys
sys.path.insert(0, os.getcwd())
import comfy.options
comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]
messages = []
class Keep(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger().addHandler(Keep())
"""


def comfyui_source_dir() -> Path:
    """The ComfyUI that scripts/dev.sh provisioned (``SELMA_COMFYUI_DIR``); a test fails without it."""
    import pytest

    d = Path(os.environ.get("SELMA_COMFYUI_DIR", DEFAULT_CACHE / "comfyui-0.3.75"))
    if not (d / "main.py").is_file():
        pytest.fail(f"no ComfyUI at {d}: run the tests with `scripts/dev.sh test` (it provisions ComfyUI)")
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_dir(base: Path) -> Path:
    """Lay out a ComfyUI base directory with this pack linked into custom_nodes."""
    for sub in ("custom_nodes", "input", "output", "temp", "user",
                "models/checkpoints", "models/diffusers", "models/loras", "models/clip", "models/LLM", "models/vae"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


@dataclass
class ComfyServer:
    comfyui_dir: Path
    base_dir: Path
    front_end_root: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path = field(default=Path())
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> ComfyServer:
        self.port = self.port or free_port()
        self.log_path = self.base_dir / f"comfyui-{self.port}.log"
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch", "--preview-method", "none",
               "--database-url", "sqlite:///:memory:"]
        if self.front_end_root is not None:
            cmd += ["--front-end-root", str(self.front_end_root)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)
        for key in ("SELMA_LLM_API_KEY", "OPENAI_API_KEY"):  # only what a test gives explicitly
            env.pop(key, None)
        env.update(self.extra_env)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed by the process's end
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def log_tail(self, n: int = 120) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(lines[-n:])

    # -- HTTP ---------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: object | None = None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(req, timeout=timeout)

    def get_json(self, path: str, timeout: float = 30.0):
        with self.request("GET", path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: object, timeout: float = 30.0):
        """The JSON reply, or None for an empty one (``/interrupt`` answers 200 with no body)."""
        with self.request("POST", path, body, timeout=timeout) as r:
            data = r.read()
            return json.loads(data) if data.strip() else None

    def queue(self, graph: dict, extra_data: dict | None = None) -> str:
        """POST an API-format graph; return the prompt id, or raise with ComfyUI's validation errors."""
        body = {"prompt": graph, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            return self.post_json("/prompt", body)["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"/prompt refused the graph: {e.read().decode(errors='replace')}") from e

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished; raise with the error if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status", {})
                if status.get("status_str") == "error":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    raise AssertionError(f"prompt {prompt_id} failed: {json.dumps(msgs, indent=1)[:4000]}")
                if status.get("completed", True):
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout:.0f} s\n{self.log_tail(40)}")

    def run(self, graph: dict, timeout: float = 300.0, extra_data: dict | None = None) -> dict:
        return self.wait(self.queue(graph, extra_data), timeout)

    def listen(self):
        """A websocket for this client id (events of prompts this harness queues)."""
        import websocket

        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=120)


def collect_events(ws, prompt_id: str, on_event=None) -> list[dict]:
    """Read ``ws`` until ``prompt_id`` ends; return its JSON events (``on_event`` sees each first)."""
    out = []
    while True:
        msg = ws.recv()
        if isinstance(msg, bytes):
            continue
        event = json.loads(msg)
        if event.get("data", {}).get("prompt_id") not in (prompt_id, None):
            continue
        out.append(event)
        if on_event is not None:
            on_event(event)
        if event["type"] in ("execution_success", "execution_error", "execution_interrupted"):
            return out
