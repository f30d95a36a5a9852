"""The stage-1 loop: any ChatBackend, messy replies, budget, resumable/byte-identical output, guards."""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from selma_backend import cli
from selma_backend.errors import SelmaError
from selma_backend.fsio import read_jsonl
from selma_backend.llm.base import ChatMessage, LLMError
from selma_backend.prompts.generate import (
    PromptBudgetExhausted,
    PromptConfig,
    generate_prompts,
    report_path,
)
from selma_backend.prompts.offline import OfflineBackend, _rules, offline_prompts
from selma_backend.skills import Skill, builtin_skills, skill_from_fields

CORPUS = Path(__file__).parent / "data" / "replies"
EXPECTED = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
REPLY_FILES = sorted(CORPUS.glob("*.txt"))
SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

#: A user skill whose seeds include the corpus' "shown" example, word limit 30 like the corpus expectations.
CAPTIONS = skill_from_fields(
    "captions", "Captions", "Write everyday captions.",
    [*EXPECTED["_shown"], "Two dogs playing with a frisbee in a park.", "A plate of pasta on a table."], 30,
)


class ScriptedBackend:
    """Test double: replays canned replies in order (cycling) and records every request."""

    source = "scripted:test"

    def __init__(self, replies: list[str], fail_at: int | None = None) -> None:
        self.replies = itertools.cycle(replies)
        self.calls: list[tuple[list[ChatMessage], int | None]] = []
        self.fail_at = fail_at
        self.closed = False

    def chat(self, messages, *, temperature, max_tokens, seed=None):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise LLMError("server went away")
        self.calls.append((messages, seed))
        return next(self.replies)

    def close(self):
        self.closed = True


class KilledOffline(OfflineBackend):
    """The offline backend that dies (like a killed process) at request ``fail_at``."""

    def __init__(self, skill: Skill, fail_at: int) -> None:
        super().__init__(skill)
        self.n, self.fail_at = 0, fail_at

    def chat(self, messages, **kw):
        if self.n == self.fail_at:
            raise KeyboardInterrupt
        self.n += 1
        return super().chat(messages, **kw)


def reference_keep(texts, pool):
    tokens = [SCORER._tokenizer.tokenize(t) for t in pool]
    keep = []
    for text in texts:
        t = SCORER._tokenizer.tokenize(text)
        ok = not tokens or max(rouge_scorer._score_lcs(t, p).fmeasure for p in tokens) <= 0.8
        keep.append(ok)
        if ok:
            tokens.append(t)
    return keep


def test_messy_replies_end_to_end_match_the_reference(tmp_path):
    replies = [p.read_bytes().decode("utf-8") for p in REPLY_FILES]
    backend = ScriptedBackend(replies)
    config = PromptConfig(skill=CAPTIONS, count=10_000, llm="offline", max_requests=len(replies), seed=4)
    with pytest.raises(PromptBudgetExhausted) as err:
        generate_prompts(config, tmp_path / "p.jsonl", backend=backend)
    report = err.value.report
    rows = read_jsonl(tmp_path / "p.jsonl")
    # What survives is exactly SELMA's rouge_score rule applied to the hand-checked corpus items.
    items = [i for f in REPLY_FILES for i in EXPECTED[f.name]["kept"]]
    expected = [t for t, k in zip(items, reference_keep(items, CAPTIONS.examples), strict=True) if k]
    assert [r["prompt"] for r in rows] == expected
    # Each rejection reason is counted; the parse-level ones exactly as in the corpus expectations.
    corpus = sum((Counter(EXPECTED[f.name]["rejected"]) for f in REPLY_FILES), Counter())
    for reason in ("empty", "commentary", "too_long", "too_short"):
        assert report.rejected.get(reason, 0) == corpus[reason]
    dropped = report.rejected.get("near_duplicate", 0) + report.rejected.get("copy_of_example", 0)
    assert dropped == len(items) + corpus["copy_of_example"] - len(expected) > 0
    assert report.requests == len(replies) and report.written == len(rows)
    assert report.source == "scripted:test" and all(r["source"] == "scripted:test" for r in rows)
    assert not backend.closed  # the caller owns a backend it passes in


def test_request_shows_k_pool_examples_and_asks_for_a_numbered_batch(tmp_path):
    backend = ScriptedBackend([(CORPUS / "02_chatty_preamble_signoff.txt").read_text()])
    config = PromptConfig(skill=CAPTIONS, count=6, examples_per_request=2, batch_size=7, max_requests=3)
    with pytest.raises(PromptBudgetExhausted):
        generate_prompts(config, tmp_path / "p.jsonl", backend=backend)
    rows = read_jsonl(tmp_path / "p.jsonl")
    pool = dict(zip([f"captions-seed-{i}" for i in range(3)], CAPTIONS.examples, strict=True))
    pool.update({r["id"]: r["prompt"] for r in rows})
    assert len(backend.calls) == 3
    for messages, seed in backend.calls:
        system, user = messages
        assert "Write everyday captions." in system.content and "fewer than 30 words" in system.content
        assert "Write 7 new" in user.content and isinstance(seed, int)
        numbered = re.findall(r"^\d+\. (.*)$", user.content, re.M)
        assert len(numbered) == 2 and all(n in pool.values() for n in numbered)
    assert [r["id"] for r in rows] == [f"captions-{i:06d}" for i in range(4)]
    assert all(len(r["shown"]) == 2 and set(r["shown"]) <= set(pool) for r in rows)
    assert len({seed for _, seed in backend.calls}) == 3


def test_a_model_that_repeats_itself_ends_with_a_clear_message(tmp_path):
    backend = ScriptedBackend(["1. A cat on a mat in the sun.\n2. A dog on a rug by the door."])
    config = PromptConfig(skill="coco", count=40, batch_size=10)
    with pytest.raises(PromptBudgetExhausted) as err:
        generate_prompts(config, tmp_path / "p.jsonl", backend=backend)
    budget = math.ceil(40 / 10) * 5 + 5
    assert len(backend.calls) == budget  # stops at the automatic budget, does not loop
    msg = str(err.value)
    assert "request budget" in msg and "--max-requests" in msg and "2/40" in msg and "near_duplicate" in msg
    report = json.loads(report_path(tmp_path / "p.jsonl").read_text())
    assert report["status"] == "budget_exhausted" and report["total"] == 2
    # the two prompts come back every time: dropped as near-duplicates, or as copies when shown
    assert report["rejected"]["near_duplicate"] + report["rejected"].get("copy_of_example", 0) == 2 * (budget - 1)


def test_offline_same_seed_writes_a_byte_identical_file(tmp_path):
    for name in ("a", "b"):
        generate_prompts(PromptConfig(skill="spatial", count=150, seed=9), tmp_path / f"{name}.jsonl")
    generate_prompts(PromptConfig(skill="spatial", count=150, seed=10), tmp_path / "c.jsonl")
    a, b, c = ((tmp_path / f"{n}.jsonl").read_bytes() for n in "abc")
    assert a == b and a != c


def test_extend_and_resume_after_kill_are_byte_identical(tmp_path):
    straight = tmp_path / "straight.jsonl"
    generate_prompts(PromptConfig(skill="whoops", count=260, seed=2), straight)
    # 1) a shorter run, extended: continues numbering, no duplicates, same bytes
    grown = tmp_path / "grown.jsonl"
    generate_prompts(PromptConfig(skill="whoops", count=97, seed=2), grown)
    report = generate_prompts(PromptConfig(skill="whoops", count=260, seed=2), grown)
    assert report.existing == 97 and report.written == 163
    assert grown.read_bytes() == straight.read_bytes()
    # 2) a run killed mid-way (with a torn last line) loses nothing written, and resumes to the same bytes
    killed = tmp_path / "killed.jsonl"
    config = PromptConfig(skill="whoops", count=260, seed=2)
    with pytest.raises(KeyboardInterrupt):
        generate_prompts(config, killed, backend=KilledOffline(config.skill_obj, fail_at=5))
    kept = read_jsonl(killed)
    assert 0 < len(kept) < 260 and json.loads(report_path(killed).read_text())["status"] == "failed"
    with open(killed, "ab") as f:
        f.write(b'{"id": "whoops-0001')  # a write torn by the kill
    generate_prompts(config, killed)
    assert killed.read_bytes() == straight.read_bytes()
    rows = read_jsonl(killed)
    assert len({r["prompt"] for r in rows}) == len({r["id"] for r in rows}) == 260


def test_stop_request_ends_cleanly_after_the_current_request(tmp_path):
    out = tmp_path / "p.jsonl"
    seen: list[tuple[int, int]] = []
    report = generate_prompts(PromptConfig(skill="coco", count=200, seed=1), out,
                              progress=lambda d, t: seen.append((d, t)), should_stop=lambda: len(seen) >= 3)
    assert report.status == "stopped" and report.requests == 3 and "re-run" in report.message
    assert [t for _, t in seen] == [200] * 3 and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert len(read_jsonl(out)) == seen[-1][0] == report.total
    final = generate_prompts(PromptConfig(skill="coco", count=200, seed=1), out)
    assert final.status == "complete" and final.total == 200
    generate_prompts(PromptConfig(skill="coco", count=200, seed=1), tmp_path / "straight.jsonl")
    assert out.read_bytes() == (tmp_path / "straight.jsonl").read_bytes()


def test_blocklist_and_evaluation_guard(tmp_path):
    evals = offline_prompts(builtin_skills()["coco"], 100, seed=123)  # what a later eval might use
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in evals))
    config = PromptConfig(skill="coco", count=150, seed=0, blocklist=("table", r"re:\b(cat|dog)s?\b"),
                          eval_prompts=str(tmp_path / "eval.jsonl"), eval_threshold=0.6)
    report = generate_prompts(config, tmp_path / "p.jsonl")
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert report.blocklist_hits["table"] > 0 and report.blocklist_hits[r"re:\b(cat|dog)s?\b"] > 0
    assert report.rejected["blocklist"] <= sum(report.blocklist_hits.values())
    assert report.rejected["contamination"] > 0
    eval_tokens = [SCORER._tokenizer.tokenize(e) for e in evals]
    for r in rows:
        assert not re.search(r"\btable\b|\b(cat|dog)s?\b", r["prompt"], re.I)
        t = SCORER._tokenizer.tokenize(r["prompt"])
        assert max(rouge_scorer._score_lcs(t, e).fmeasure for e in eval_tokens) <= 0.6
    saved = json.loads(report_path(tmp_path / "p.jsonl").read_text())
    assert saved["config"]["blocklist"] == ["table", r"re:\b(cat|dog)s?\b"]
    assert saved["config"]["skill"]["id"] == "coco" and saved["rejected"] == report.rejected


@pytest.mark.parametrize("skill", list(builtin_skills()))
def test_offline_gives_1000_distinct_prompts_for_every_builtin_skill(tmp_path, skill):
    report = generate_prompts(PromptConfig(skill=skill, count=1000, seed=0), tmp_path / "p.jsonl")
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert report.status == "complete" and len(rows) == 1000 and report.requests <= report.request_budget
    limit = builtin_skills()[skill].word_limit
    assert all(3 <= len(r["prompt"].split()) < limit and r["source"] == "offline" for r in rows)
    assert len({r["prompt"].lower() for r in rows}) == 1000
    texts = [r["prompt"] for r in rows]
    if skill == "countbench":
        assert not any(re.search(r"\b(four|five|six|seven|eight|nine|ten|dozen|[4-9]|\d\d+)\b", t, re.I) for t in texts)
        assert all(re.search(r"\b(one|two|three|single)\b", t, re.I) for t in texts)
    if skill == "spatial":
        rel = r"\b(left|right|above|below|on top of|under|underneath|in front of|behind|next to|beside|inside|against)\b"
        assert all(re.search(rel, t) for t in texts)
    if skill == "product":
        rules = _rules()  # catalogue style: a material or texture, and a backdrop
        looks = [*rules["material"], *rules["texture"]]
        assert all(any(re.search(rf"\b{re.escape(w)}\b", t) for w in looks) for t in texts)
        assert all(any(b in t for b in rules["pbackground"]) for t in texts)


def test_offline_rejects_user_skills_with_a_teaching_error(tmp_path):
    with pytest.raises(SelmaError, match="only knows the built-in skills.*openai or transformers"):
        generate_prompts(PromptConfig(skill=CAPTIONS, count=5), tmp_path / "p.jsonl")


def test_output_of_another_skill_is_not_mixed(tmp_path):
    generate_prompts(PromptConfig(skill="coco", count=5), tmp_path / "p.jsonl")
    with pytest.raises(SelmaError, match=r"row 1: not a prompt of skill 'spatial'.*another --out"):
        generate_prompts(PromptConfig(skill="spatial", count=5), tmp_path / "p.jsonl")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"count": 0}, "count"), ({"batch_size": 0}, "batch_size"), ({"dedup_threshold": 1.2}, "dedup_threshold"),
     ({"blocklist": ("re:(",)}, "blocklist"), ({"blocklist": "brand"}, "blocklist"), ({"min_words": 30}, "min_words"),
     ({"eval_prompts": "/nonexistent.txt"}, "eval_prompts"), ({"llm": "gpt"}, "llm"), ({"skill": "nope"}, "skill"),
     ({"temperature": 3}, "temperature")],
)
def test_config_is_validated_with_teaching_errors(kwargs, field):
    with pytest.raises(SelmaError, match=rf"^{field}: got .*allowed"):
        PromptConfig(**{"skill": "coco", **kwargs})


def test_cli_offline_run_and_report(tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    assert cli.main(["prompts", "--skill", "coco", "--count", "30", "--seed", "3", "--block", "kitchen", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "complete" and summary["total"] == 30 and len(read_jsonl(out)) == 30
    assert not any("kitchen" in r["prompt"].lower() for r in read_jsonl(out))


def test_cli_builds_the_chat_backend_from_flags(tmp_path, monkeypatch, capsys):
    from selma_backend.llm import backends

    made = []
    reply = (CORPUS / "01_plain_numbered.txt").read_text()

    def fake_make(config, *, user_dir=None):
        made.append(config)
        return ScriptedBackend([reply])

    monkeypatch.setattr(backends, "make_chat_backend", fake_make)
    code = cli.main(["prompts", "--skill", "coco", "--count", "3", "--llm", "openai", "--llm-url", "http://127.0.0.1:9/v1",
                     "--llm-model", "tiny", "--temperature", "0.7", "--out", str(tmp_path / "p.jsonl")])
    assert code == 0
    assert (made[0].backend, made[0].base_url, made[0].model, made[0].temperature) == ("openai", "http://127.0.0.1:9/v1", "tiny", 0.7)
    rows = read_jsonl(tmp_path / "p.jsonl")
    assert [r["prompt"] for r in rows] == EXPECTED["01_plain_numbered.txt"]["kept"]
    assert json.loads(capsys.readouterr().out)["source"] == "scripted:test"


def test_cli_reports_llm_failure_and_keeps_rows(tmp_path, monkeypatch, capsys):
    from selma_backend.llm import backends

    reply = (CORPUS / "01_plain_numbered.txt").read_text()
    monkeypatch.setattr(backends, "make_chat_backend", lambda c, user_dir=None: ScriptedBackend([reply], fail_at=1))
    code = cli.main(["prompts", "--skill", "coco", "--count", "10", "--llm", "openai", "--llm-model", "m",
                     "--out", str(tmp_path / "p.jsonl")])
    assert code == 1 and "server went away" in capsys.readouterr().err
    assert len(read_jsonl(tmp_path / "p.jsonl")) == 3
