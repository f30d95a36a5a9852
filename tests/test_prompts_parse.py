"""Parsing what real models reply: a hand-written corpus of messy replies with checked expectations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selma_backend.prompts.parse import clean_item, extract_items, screen

CORPUS = Path(__file__).parent / "data" / "replies"
EXPECTED = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
REPLIES = sorted(p.name for p in CORPUS.glob("*.txt"))


def test_corpus_is_large_and_fully_specified():
    assert len(REPLIES) >= 30
    assert set(REPLIES) == {k for k in EXPECTED if not k.startswith("_")}


@pytest.mark.parametrize("name", REPLIES)
def test_corpus_reply(name):
    reply = (CORPUS / name).read_bytes().decode("utf-8")  # keep \r\n where a file has it
    items, rejected = extract_items(reply)
    kept, more = screen(items, word_limit=30, min_words=3, shown=EXPECTED["_shown"])
    assert kept == EXPECTED[name]["kept"]
    assert dict(rejected + more) == EXPECTED[name]["rejected"]
    for item in kept:  # no list markers, emphasis or wrapping quotes survive
        assert not item.startswith(("*", "-", '"', "\u201c", "'", "(", "[")) and "**" not in item
        assert not item[0].isdigit() or name.startswith("27_")


@pytest.mark.parametrize(
    "line",
    ["4. {p}", "4) {p}", "**4.** {p}", "4\\. {p}", "(4) {p}", "[4] {p}", "4: {p}", "4 - {p}", "- {p}", "* {p}",
     "\u2022 {p}", "Prompt 4: {p}", '4. "{p}"', "4. \u201c{p}\u201d", "4. **{p}**", '  "{p}",', "4. {p} (8 words)",
     "4. **Title**: {p}", "### 4. {p}"],
)
def test_every_list_style_yields_the_bare_prompt(line):
    p = "A red kite above a grey lighthouse."
    reply = f"Sure! Here you go:\n{line.format(p=p)}\n{line.format(p=p.replace('red', 'blue'))}\nHope this helps!"
    items, rejected = extract_items(reply)
    assert items == [p, p.replace("red", "blue")]
    assert rejected["commentary"] == 2


def test_screen_counts_each_reason():
    items = ["a b", "one two three four five six", "w " * 12, "The Cat sat ON the mat!", "keep this one please"]
    kept, rejected = screen(items, word_limit=10, min_words=3, shown=["the cat sat on the mat"])
    assert kept == ["one two three four five six", "keep this one please"]
    assert rejected == {"too_short": 1, "too_long": 1, "copy_of_example": 1}


def test_word_limit_is_exclusive():
    nine, ten = " ".join(["w"] * 9), " ".join(["w"] * 10)
    kept, rejected = screen([nine, ten], word_limit=10)
    assert kept == [nine] and rejected == {"too_long": 1}


def test_clean_item_keeps_inner_punctuation_and_quotes():
    assert clean_item('A sign reading "OPEN" on a door.') == 'A sign reading "OPEN" on a door.'
    assert clean_item("Product shot: a mug, top-down view.") == "Product shot: a mug, top-down view."
    assert clean_item('"A mug on a table".') == "A mug on a table"


def test_json_array_of_non_strings_falls_back_to_lines():
    items, _ = extract_items("1. A cat [2] on a mat with a dog.\n2. A bowl of [1, 2] soup on a stove.")
    assert items == ["A cat [2] on a mat with a dog.", "A bowl of [1, 2] soup on a stove."]
