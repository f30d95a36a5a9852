"""The DSG-style question score against an OpenAI-compatible server on 127.0.0.1 that speaks vision messages.

Images are solid colours made here; the fake vision model decodes each PNG it is sent and answers
from its pixels, so a score can be computed by hand: which questions pass, which are skipped because
a parent failed, and the per-category shares.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from fakes.openai_server import FakeOpenAIServer
from fakes.vision import VisionFake, dominant_colour
from PIL import Image

from selma_backend.errors import SelmaError
from selma_backend.eval.config import EvalConfig
from selma_backend.eval.dsg import (
    Question,
    answer_messages,
    dsg_scores,
    generate_questions,
    parse_answer,
    parse_questions,
    propagate,
    score_image,
)
from selma_backend.llm.backends import make_chat_backend
from selma_backend.llm.base import ChatMessage
from selma_backend.llm.openai_backend import wire_message

PROMPT = "a red apple next to a blue cup"
QUESTIONS = [
    {"id": 1, "category": "entity", "question": "Is there an apple?", "parents": []},
    {"id": 2, "category": "entity", "question": "Is there a cup?", "parents": []},
    {"id": 3, "category": "attribute", "question": "Is the apple red?", "parents": [1]},
    {"id": 4, "category": "attribute", "question": "Is the cup blue?", "parents": [2]},
    {"id": 5, "category": "relation", "question": "Is the apple next to the cup?", "parents": [1, 2]},
    {"id": 6, "category": "count", "question": "Is there exactly one apple?", "parents": [1]},
]
#: What the fake "sees": a red image shows an apple but no cup; a blue one everything; a green one nothing clear.
ANSWERS = {"red": {"Is there a cup?": "No."}, "green": {"Is there an apple?": "Maybe, it is hard to tell."}}


def _answer(question: str, image: Image.Image) -> str:
    return ANSWERS.get(dominant_colour(image), {}).get(question, "Yes")


def _png(colour: str, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _no_ambient_keys(monkeypatch):
    for name in ("SELMA_LLM_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake():
    return VisionFake({PROMPT: QUESTIONS}, answer=_answer)


@pytest.fixture
def server(fake):
    with FakeOpenAIServer(models=["tiny-vlm"], reply=fake, api_key="sk-eval-Secret123") as srv:
        yield srv


@pytest.fixture
def vlm(server, monkeypatch):
    monkeypatch.setenv("SELMA_VQA_KEY", "sk-eval-Secret123")
    cfg = EvalConfig(vqa_url=server.base_url, vqa_model="tiny-vlm", vqa_key_env="SELMA_VQA_KEY", vqa_max_retries=0)
    with make_chat_backend(cfg.chat_config("answer")) as backend:
        yield backend


# --- parsing and arithmetic ------------------------------------------------------------------------


def test_parse_questions_reads_fenced_json_orders_parents_first_and_maps_aliases():
    reply = ("Sure! Here are the questions.\n```json\n" + json.dumps({"questions": [
        {"id": 3, "category": "Counting", "question": "Are there  two dogs?", "parents": [1]},
        {"id": 1, "category": "entities", "question": "Is there a dog?", "parents": []},
        {"id": 2, "category": "spatial", "question": "Is a dog on the sofa?", "parents": [1, 4]},
        {"id": 4, "category": "entity", "question": "Is there a sofa?"}]}) + "\n```\nHope this helps.")
    qs = parse_questions(reply)
    assert [q.id for q in qs] == [1, 3, 4, 2]  # parents first, otherwise as given
    assert [q.category for q in qs] == ["entity", "count", "entity", "relation"]
    assert qs[1] == Question(3, "count", "Are there two dogs?", (1,))
    assert [q.id for q in parse_questions(reply, limit=2)] == [1, 3]
    assert [q.id for q in parse_questions(json.dumps(QUESTIONS))] == [1, 2, 3, 4, 5, 6]  # a bare list is fine


@pytest.mark.parametrize("reply,why", [
    ("I cannot help with that.", "no JSON"),
    ('{"questions": []}', "no 'questions'"),
    ('{"questions": [{"id": 1, "category": "vibe", "question": "Nice?"}]}', "category 'vibe'"),
    ('{"questions": [{"id": 1, "category": "entity", "question": "A?", "parents": [7]}]}', "depends on"),
    ('{"questions": [{"id": 1, "category": "entity", "question": "A?", "parents": [2]},'
     ' {"id": 2, "category": "entity", "question": "B?", "parents": [1]}]}', "cycle"),
    ('{"questions": [{"id": 1, "category": "entity", "question": "A?"}, {"id": 1, "category": "entity", '
     '"question": "B?"}]}', "repeat"),
])
def test_parse_questions_says_what_is_wrong(reply, why):
    with pytest.raises(ValueError, match=why):
        parse_questions(reply)


@pytest.mark.parametrize("text,want", [("Yes.", True), ("yes, there is", True), ("NO", False), ("No, it is green.", False),
                                       ("Maybe", None), ("", None), ("The answer is yes", None)])
def test_parse_answer(text, want):
    assert parse_answer(text) is want


def test_a_failed_parent_fails_its_children_and_scores_by_hand():
    qs = parse_questions(json.dumps(QUESTIONS))
    raw = {1: True, 2: False, 3: True, 4: True, 5: True, 6: True}
    passed = propagate(qs, raw)
    assert passed == {1: True, 2: False, 3: True, 4: False, 5: False, 6: True}
    score, cats = dsg_scores(qs, passed)
    assert score == 3 / 6 and cats == {"entity": 0.5, "attribute": 0.5, "count": 1.0, "relation": 0.0}


# --- against the server -----------------------------------------------------------------------------


def test_vision_messages_use_the_openai_image_url_form():
    png = _png("red")
    wire = wire_message(answer_messages("Is it red?", png)[1])
    assert wire["role"] == "user" and wire["content"][0] == {"type": "text", "text": "Is it red?"}
    url = wire["content"][1]["image_url"]["url"]
    assert wire["content"][1]["type"] == "image_url" and base64.b64decode(url.split(",", 1)[1]) == png
    assert wire_message(ChatMessage("user", "plain")) == {"role": "user", "content": "plain"}


def test_questions_come_from_the_server_and_a_bad_reply_is_asked_again(server, fake, vlm):
    fake.question_replies.append("Questions: 1. Is there an apple? 2. Is it red?")  # not JSON: asked again
    qs = generate_questions(vlm, PROMPT, seed=5)
    assert [q.text for q in qs] == [q["question"] for q in QUESTIONS]
    first, second = (r.json() for r in server.chat_requests)
    assert second["seed"] == first["seed"] + 1 and second["temperature"] == 0.0
    assert "yes/no questions" in first["messages"][0]["content"] and first["messages"][-1]["content"] == f"Prompt: {PROMPT}"
    assert all(r.headers["authorization"] == "Bearer sk-eval-Secret123" for r in server.chat_requests)


def test_questions_give_up_with_a_clear_error(fake, vlm):
    fake.question_replies.extend(["nope"] * 3)
    with pytest.raises(SelmaError, match="no usable questions.*question_model"):
        generate_questions(vlm, PROMPT, seed=0)


def test_score_image_on_the_server_by_hand(server, fake, vlm):
    qs = parse_questions(json.dumps(QUESTIONS))
    red = score_image(vlm, qs, _png("red"), seed=1)
    # red: apple yes, cup no -> "Is the cup blue?" and the relation are skipped (not asked), the rest yes.
    assert red.answers == {1: "yes", 2: "no", 3: "yes", 4: "skipped", 6: "yes", 5: "skipped"}
    assert red.score == 3 / 6 and red.categories == {"entity": 0.5, "attribute": 0.5, "count": 1.0, "relation": 0.0}
    assert [q for q, _, _ in fake.asked] == ["Is there an apple?", "Is there a cup?", "Is the apple red?",
                                             "Is there exactly one apple?"]
    assert {(size, colour) for _, size, colour in fake.asked} == {((32, 32), "red")}  # the PNG arrived whole
    blue = score_image(vlm, qs, _png("blue"), seed=1)
    assert blue.score == 1.0 and all(v == "yes" for v in blue.answers.values())
    green = score_image(vlm, qs, _png("green"), seed=1)
    # "Maybe ..." for the apple: unclear counts as failed, so everything that depends on it fails too.
    assert green.answers[1].startswith("unclear: Maybe") and green.answers[3] == "skipped"
    assert green.score == 2 / 6 and green.categories["count"] == 0.0
    body = server.chat_requests[-1].json()
    assert body["max_tokens"] == 64 and body["messages"][0]["role"] == "system"


def test_a_server_that_cannot_see_images_fails_loudly(server, vlm):
    server.set_reply(lambda request: (_ for _ in ()).throw(ValueError("no vision here")))
    with pytest.raises(SelmaError, match="could not answer 'Is there an apple\\?'.*HTTP 500"):
        score_image(vlm, parse_questions(json.dumps(QUESTIONS)), _png("red"), seed=0)


def test_vqa_settings_are_validated():
    with pytest.raises(SelmaError, match="vqa_url/vqa_model"):
        EvalConfig(vqa_url="http://127.0.0.1:1/v1")
    with pytest.raises(SelmaError, match="base_url"):
        EvalConfig(vqa_url="http://user:pw@127.0.0.1:1/v1", vqa_model="m")
    with pytest.raises(SelmaError, match="api_key_env"):
        EvalConfig(vqa_url="http://127.0.0.1:1/v1", vqa_model="m", vqa_key_env="sk-not-a-variable-name")
    cfg = EvalConfig(vqa_url="http://127.0.0.1:1/v1", vqa_model="vlm", question_model="writer")
    assert cfg.chat_config("question").model == "writer" and cfg.chat_config("answer").model == "vlm"
    assert "key" not in json.dumps(cfg.to_dict()).replace("vqa_key_env", "")
