"""A scripted question writer and vision-language model behind ``FakeOpenAIServer`` (vision messages).

    fake = VisionFake(questions={"a red apple": [{"id": 1, "category": "entity", ...}]},
                      answer=lambda question, image: "yes" if dominant_colour(image) == "red" else "no")
    with FakeOpenAIServer(models=["tiny-vlm"], reply=fake) as srv: ...

A request whose system message asks for yes/no *questions* is a question request: the reply is the
JSON of ``questions[prompt]`` (``default_questions`` for others), or a scripted reply popped from
``question_replies`` first. Any other request must be a vision request in the OpenAI format -- a user
message whose ``content`` is a list with one ``text`` part and one ``image_url`` part holding a
``data:image/png;base64,...`` URL -- else the fake raises (the server answers 500). The PNG is decoded
with Pillow and handed to ``answer(question, image)``; every (question, image size, colour) asked is
recorded in ``asked``.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageStat

Answer = Callable[[str, Image.Image], str]


def dominant_colour(image: Image.Image) -> str:
    """"red" / "green" / "blue": the channel with the largest mean (ties go to the first)."""
    means = ImageStat.Stat(image.convert("RGB")).mean
    return ("red", "green", "blue")[means.index(max(means))]


class VisionFake:
    def __init__(self, questions: dict[str, list[dict[str, Any]]] | None = None, *, answer: Answer | None = None,
                 default_questions: list[dict[str, Any]] | None = None) -> None:
        self.questions = questions or {}
        self.default_questions = default_questions or [
            {"id": 1, "category": "entity", "question": "Is there an object?", "parents": []},
            {"id": 2, "category": "attribute", "question": "Is the object red?", "parents": [1]}]
        self.answer = answer or (lambda q, im: "Yes." if dominant_colour(im) in q.lower() or "object" in q else "No.")
        self.question_replies: list[str] = []  # scripted raw replies, used first (malformed ones, for retries)
        self.asked: list[tuple[str, tuple[int, int], str]] = []
        self.question_prompts: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> str:
        messages = request["messages"]
        if "questions" in str(messages[0].get("content", "")) and messages[0]["role"] == "system":
            prompt = str(messages[-1]["content"]).removeprefix("Prompt: ")
            with self._lock:
                self.question_prompts.append(prompt)
                if self.question_replies:
                    return self.question_replies.pop(0)
            return "Here you go:\n```json\n" + json.dumps({"questions": self.questions.get(prompt, self.default_questions)}) + "\n```"
        question, image = _vision_parts(messages)
        with self._lock:
            self.asked.append((question, image.size, dominant_colour(image)))
        return self.answer(question, image)


def _vision_parts(messages: list[dict[str, Any]]) -> tuple[str, Image.Image]:
    user = messages[-1]
    content = user.get("content")
    if user.get("role") != "user" or not isinstance(content, list):
        raise ValueError(f"not a vision message: {str(user)[:200]}")
    texts = [p["text"] for p in content if p.get("type") == "text"]
    urls = [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    if len(texts) != 1 or len(urls) != 1 or not urls[0].startswith("data:image/png;base64,"):
        raise ValueError(f"expected one text and one PNG data URL part, got {[p.get('type') for p in content]}")
    data = base64.b64decode(urls[0].split(",", 1)[1], validate=True)
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.format != "PNG":
        raise ValueError(f"the image is {image.format}, not PNG")
    return texts[0], image
