"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests, with scriptable faults.

API (import as ``from fakes.openai_server import ...``; ``tests/`` is on ``sys.path`` under pytest)::

    with FakeOpenAIServer(models=["tiny-chat"]) as srv:   # reply= a str or fn(request) -> str
        srv.base_url                      # "http://127.0.0.1:<free port>/v1"
        srv.push(http_error(429, retry_after=0), http_error(500), delay(2.0),
                 not_json(), empty_choices(), drop_connection())
        ...                               # each chat request consumes one queued fault; none left = a real reply
        srv.requests                      # every request: RecordedRequest(method, path, headers, body)
        srv.chat_requests                 # only POST /v1/chat/completions, in order
        srv.faults_left                   # how many queued faults were not used yet

Endpoints, in the OpenAI wire format: ``POST /v1/chat/completions`` (non-streaming) answers
``{"id", "object": "chat.completion", "created", "model", "choices": [{"index", "message":
{"role": "assistant", "content"}, "finish_reason"}], "usage": {...}}``; an unknown model gets 404
``{"error": {"message", "type", "param", "code": "model_not_found"}}``; ``GET /v1/models`` answers
``{"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}``.
With ``api_key="..."`` a request without ``Authorization: Bearer <that key>`` gets 401.

``reply`` is a string or ``reply(request_json) -> str``; by default ``make_prompt_list_reply()``,
which writes a numbered list of distinct prompts (how many: the first "<N> prompts" / "<N> new
prompts" in the last user message, else 5), varying with the request's ``seed`` and the server's
call count, so a prompt-generation loop can run against it; ``repeating_reply(text)`` always says the same thing (for loops that must give up).
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Reply = str | Callable[[dict[str, Any]], str]


@dataclass(frozen=True)
class Fault:
    """What to do instead of (or before) answering one chat request."""

    kind: str  # "status" | "delay" | "not_json" | "empty_choices" | "drop" | "error_200"
    status: int = 200
    retry_after: str | None = None
    seconds: float = 0.0
    body: str | None = None


def http_error(status: int, *, retry_after: float | str | None = None, message: str | None = None) -> Fault:
    """Answer with an OpenAI-style error object and this status (e.g. 429, 500, 503, 401, 400)."""
    msg = message or {401: "Incorrect API key provided.", 429: "Rate limit reached."}.get(status, f"error {status}")
    body = json.dumps({"error": {"message": msg, "type": "server_error", "param": None, "code": None}})
    ra = None if retry_after is None else str(retry_after)
    return Fault("status", status=status, retry_after=ra, body=body)


def delay(seconds: float) -> Fault:
    """Wait ``seconds`` before answering normally (longer than the client's timeout = a timeout)."""
    return Fault("delay", seconds=seconds)


def not_json(text: str = "<html><body>502 Bad Gateway</body></html>", content_type: str = "application/json") -> Fault:
    """Status 200 with a body that is not JSON (a proxy's page under a JSON content type by default)."""
    return Fault("not_json", body=f"{content_type}\n{text}")


def empty_choices() -> Fault:
    """A well-formed completion whose ``choices`` is ``[]``."""
    return Fault("empty_choices")


def drop_connection() -> Fault:
    """Close the socket without answering (the client sees a connection error)."""
    return Fault("drop")


def make_prompt_list_reply() -> Callable[[dict[str, Any]], str]:
    """A fresh ``prompt_list_reply`` with its own call counter (each server gets one by default)."""
    counter = itertools.count()
    return lambda request: prompt_list_reply(request, call=next(counter))


def prompt_list_reply(request: dict[str, Any], call: int = 0) -> str:
    """A numbered list of distinct, plausible text-to-image prompts (see the module docstring).

    Deterministic in (the request's ``seed``, ``call``); a server passes its chat-call index as ``call``.
    """
    user = next((m.get("content", "") for m in reversed(request.get("messages", [])) if m.get("role") == "user"), "")
    match = re.search(r"(\d+)\s+(?:\w+\s+)?prompts", str(user))
    n = int(match.group(1)) if match else 5
    base = (int(request.get("seed") or 0) * 7919 + call * 104729) % 1_000_003
    lines = []
    for i in range(n):
        k = base + i * 31
        lines.append(f"{i + 1}. {_pick(_COLOURS, k)} {_pick(_SUBJECTS, k // 3)} {_pick(_ACTIONS, k // 7)} "
                     f"{_pick(_PLACES, k // 11)}, {_pick(_STYLES, k // 13)}, scene {k}")
    return "\n".join(lines)


def repeating_reply(text: str = "1. a red apple on a table") -> Callable[[dict[str, Any]], str]:
    """A reply function that always answers ``text``."""
    return lambda _request: text


_COLOURS = ["a red", "a blue", "a golden", "a silver", "a green", "a violet", "an orange", "a white", "a black"]
_SUBJECTS = ["fox", "robot", "lighthouse keeper", "teapot", "dragon", "bicycle", "violinist", "owl", "sailboat",
             "astronaut", "cat", "tram", "tortoise"]
_ACTIONS = ["resting", "dancing", "reading a map", "juggling lanterns", "standing", "flying", "painting"]
_PLACES = ["on a rooftop", "in a misty forest", "beside a frozen lake", "inside a greenhouse", "at a night market",
           "under a bridge", "in a desert canyon"]
_STYLES = ["watercolour", "35mm photo", "ink drawing", "oil painting", "isometric render", "pastel sketch"]


def _pick(words: list[str], k: int) -> str:
    return words[k % len(words)]


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass
class _State:
    models: list[str]
    reply: Reply
    api_key: str | None
    faults: deque[Fault] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


class FakeOpenAIServer:
    """See the module docstring. A context manager; ``start()``/``stop()`` also work."""

    def __init__(self, *, models: list[str] | tuple[str, ...] = ("tiny-chat",), reply: Reply | None = None,
                 api_key: str | None = None) -> None:
        self._state = _State(list(models), reply if reply is not None else make_prompt_list_reply(), api_key)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> FakeOpenAIServer:
        handler = type("Handler", (_Handler,), {"state": self._state})
        self._httpd = _Server(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._state.stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting and inspection
    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def push(self, *faults: Fault) -> None:
        with self._state.lock:
            self._state.faults.extend(faults)

    @property
    def faults_left(self) -> int:
        return len(self._state.faults)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._state.lock:
            return list(self._state.requests)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == "POST" and r.path.endswith("/chat/completions")]

    def set_reply(self, reply: Reply) -> None:
        self._state.reply = reply


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that timed out and left: expected here, not worth a traceback


class _Handler(BaseHTTPRequestHandler):
    state: _State
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._record(b"")
        if not self._authorised():
            return
        if self.path.rstrip("/") == "/v1/models":
            data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "selma-tests"}
                    for m in self.state.models]
            self._send_json(200, {"object": "list", "data": data})
        else:
            self._send_json(404, _error_obj(f"Unknown path {self.path}", "not_found"))

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self._record(body)
        if not self._authorised():
            return
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, _error_obj(f"Unknown path {self.path}", "not_found"))
            return
        with self.state.lock:
            fault = self.state.faults.popleft() if self.state.faults else None
        try:
            request = json.loads(body)
        except ValueError:
            self._send_json(400, _error_obj("We could not parse the JSON body of your request.", None))
            return
        if fault is not None and self._apply(fault, request):
            return
        if request.get("model") not in self.state.models:
            msg = f"The model `{request.get('model')}` does not exist or you do not have access to it."
            self._send_json(404, _error_obj(msg, "model_not_found"))
            return
        reply = self.state.reply
        try:
            content = reply if isinstance(reply, str) else reply(request)
        except Exception as e:  # noqa: BLE001 - a reply function refusing the request: the client sees a 500
            self._send_json(500, _error_obj(f"the fake could not answer: {type(e).__name__}: {e}", None))
            return
        self._send_json(200, _completion(request, content))

    # -- helpers
    def _apply(self, fault: Fault, request: dict[str, Any]) -> bool:
        """Act out ``fault``; True when the request is answered (or dropped) already."""
        if fault.kind == "status":
            headers = {"retry-after": fault.retry_after} if fault.retry_after is not None else {}
            self._send(fault.status, "application/json", (fault.body or "{}").encode(), headers)
        elif fault.kind == "delay":
            self.state.stopping.wait(fault.seconds)
            return False
        elif fault.kind == "not_json":
            content_type, _, text = (fault.body or "").partition("\n")
            self._send(200, content_type, text.encode())
        elif fault.kind == "empty_choices":
            payload = _completion(request, "")
            payload["choices"] = []
            self._send_json(200, payload)
        elif fault.kind == "drop":
            self.close_connection = True
            self.connection.close()
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")
        return True

    def _record(self, body: bytes) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.state.lock:
            self.state.requests.append(RecordedRequest(self.command, self.path, headers, body))

    def _authorised(self) -> bool:
        if self.state.api_key is None or self.headers.get("authorization") == f"Bearer {self.state.api_key}":
            return True
        self._send_json(401, _error_obj("Incorrect API key provided.", "invalid_api_key"))
        return False

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(payload).encode())

    def _send(self, status: int, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True  # the client gave up (timeout); nothing to answer


def _completion(request: dict[str, Any], content: str) -> dict[str, Any]:
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
    words = len(content.split())
    return {
        "id": f"chatcmpl-{time.time_ns():x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model"),
        "system_fingerprint": "fp_selma_fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_words, "completion_tokens": words, "total_tokens": prompt_words + words},
    }


def _error_obj(message: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
