"""Stage-3 selection logic on controlled embeddings (no model): exact keep sets for every mode and check,
plus review precedence and the review rewrite."""

from __future__ import annotations

import json

import numpy as np
import pytest

from selma_backend.errors import SelmaError
from selma_backend.filter import CHECKS, MODES, FilterConfig, ScorerConfig, effective_keep, set_review
from selma_backend.filter.cli import add_arguments, config_from_args
from selma_backend.filter.config import parse_per_skill
from selma_backend.filter.review import rewrite_metadata
from selma_backend.filter.select import Scored, check_plan, choose, near_duplicates
from selma_backend.render.dataset import METADATA, locked


def _scored(specs: list[tuple], *, dim: int = 8, broken: dict[int, str] | None = None, max_tokens: int = 75,
            emb: np.ndarray | None = None) -> Scored:
    """specs: (file stem, skill, prompt_id, score[, text]) -> Scored with orthogonal embeddings (no duplicates)."""
    rows = [{"file_name": f"{s[0]}.png", "skill": s[1], "prompt_id": s[2], "text": s[4] if len(s) > 4 else "a cat"}
            for s in specs]
    n = len(rows)
    if emb is None:
        emb = np.eye(max(n, dim), dim if dim >= n else n, dtype=np.float32)[:n]
    return Scored(rows=rows, scores=np.array([s[3] for s in specs], dtype=np.float64), image_emb=emb,
                  pixel_std=np.full(n, 50.0), broken=broken or {}, caption_tokens=[len(r["text"].split()) for r in rows],
                  max_tokens=max_tokens)


def _kept(s: Scored, reasons: list[str]) -> set[str]:
    return {s.rows[i]["file_name"][:-4] for i, r in enumerate(reasons) if not r}


SPECS = [("a0", "spatial", "a", 0.31), ("a1", "spatial", "a", 0.27), ("a2", "spatial", "a", 0.29),
         ("b0", "spatial", "b", 0.22), ("b1", "spatial", "b", 0.25),
         ("c0", "count", "c", 0.26), ("c1", "count", "c", 0.35), ("c2", "count", "c", 0.28)]


def test_registries_offer_the_documented_choices():
    assert MODES.names() == ["threshold", "keep_fraction", "top_k_per_prompt", "per_skill"]
    assert CHECKS.names() == ["broken_file", "empty_caption", "caption_too_long", "blank_image"]


def test_threshold_keeps_scores_at_or_above():
    s = _scored(SPECS)
    reasons = choose(s, FilterConfig(mode="threshold", threshold=0.28))
    assert _kept(s, reasons) == {"a0", "a2", "c1", "c2"}  # 0.28 itself is kept (>=)
    assert reasons[1] == "below_threshold"


def test_keep_fraction_is_per_skill_and_rounds_up():
    s = _scored(SPECS)
    reasons = choose(s, FilterConfig(mode="keep_fraction", keep_fraction=0.5))
    # spatial: 5 rows -> ceil(2.5) = 3 best (0.31, 0.29, 0.27); count: 3 rows -> 2 best (0.35, 0.28)
    assert _kept(s, reasons) == {"a0", "a2", "a1", "c1", "c2"}
    assert {r for r in reasons if r} == {"below_fraction"}


def test_top_k_per_prompt_with_and_without_floor():
    s = _scored(SPECS)
    assert _kept(s, choose(s, FilterConfig(mode="top_k_per_prompt", top_k=1))) == {"a0", "b1", "c1"}
    assert _kept(s, choose(s, FilterConfig(mode="top_k_per_prompt", top_k=2))) == {"a0", "a2", "b1", "b0", "c1", "c2"}
    reasons = choose(s, FilterConfig(mode="top_k_per_prompt", top_k=2, floor=0.26))
    assert _kept(s, reasons) == {"a0", "a2", "c1", "c2"}
    assert reasons[4] == "below_floor" and reasons[3] == "below_floor"  # b1 0.25, b0 0.22: best of b, under floor
    assert reasons[1] == "not_top_k"


def test_per_skill_thresholds_and_default():
    s = _scored(SPECS)
    cfg = FilterConfig(mode="per_skill", per_skill={"spatial": 0.24, "count": 0.3})
    assert _kept(s, choose(s, cfg)) == {"a0", "a1", "a2", "b1", "c1"}
    with pytest.raises(SelmaError, match="count"):
        check_plan(FilterConfig(mode="per_skill", per_skill={"spatial": 0.24}), s.rows)
    cfg = FilterConfig(mode="per_skill", per_skill={"spatial": 0.24}, threshold=0.3)  # default for other skills
    check_plan(cfg, s.rows)
    assert _kept(s, choose(s, cfg)) == {"a0", "a1", "a2", "b1", "c1"}


def test_ties_are_broken_by_file_name_whatever_the_row_order():
    specs = [("z", "s", "p", 0.3), ("m", "s", "p", 0.3), ("a", "s", "p", 0.3)]
    for order in (specs, specs[::-1]):
        s = _scored(order)
        assert _kept(s, choose(s, FilterConfig(mode="top_k_per_prompt", top_k=2))) == {"a", "m"}


def test_basic_checks_come_first_and_in_order():
    specs = [("ok", "s", "p", 0.3), ("broken", "s", "p", 0.9), ("empty", "s", "p", 0.9, "  "),
             ("long", "s", "p", 0.9, "w " * 6), ("blank", "s", "p", 0.9)]
    s = _scored(specs, broken={1: "cannot decode"}, max_tokens=5)
    s.pixel_std[4] = 1.0
    reasons = choose(s, FilterConfig(mode="threshold", threshold=0.0))
    assert reasons == ["", "broken_file", "empty_caption", "caption_too_long", "blank_image"]
    s.pixel_std[4] = 3.0  # above the default 2.0
    assert choose(s, FilterConfig(mode="threshold", threshold=0.0))[4] == ""
    # checks run before the mode: a broken image does not take a top-k slot
    assert choose(s, FilterConfig(mode="top_k_per_prompt", top_k=1)) == \
        ["not_top_k", "broken_file", "empty_caption", "caption_too_long", ""]


def test_near_duplicates_keep_the_better_copy_within_a_skill():
    e = np.zeros((5, 4), dtype=np.float32)
    e[0] = [1, 0, 0, 0]
    e[1] = [0.99, 0.141, 0, 0]  # cos(0, 1) = 0.99
    e[2] = [0, 1, 0, 0]
    e[3] = [0.99, 0.141, 0, 0]  # duplicate of 1 and of 0, but another skill than 0 and 1
    e[4] = [0, 0, 1, 0]
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    specs = [("x0", "s", "p0", 0.20), ("x1", "s", "p1", 0.30), ("x2", "s", "p2", 0.10),
             ("y3", "t", "p3", 0.40), ("y4", "t", "p4", 0.05)]
    s = _scored(specs, emb=e)
    reasons = choose(s, FilterConfig(mode="threshold", threshold=0.0, dedup_cosine=0.95))
    assert reasons == ["near_duplicate", "", "", "", ""]  # x1 scores higher than x0, so x0 goes
    assert choose(s, FilterConfig(mode="threshold", threshold=0.0, dedup_cosine=0)) == [""] * 5
    assert choose(s, FilterConfig(mode="threshold", threshold=0.0, dedup_cosine=0.995)) == [""] * 5


def test_near_duplicates_compare_only_with_kept_rows_across_blocks():
    # a chain 0 ~ 1 ~ 2 where 0 and 2 are not similar: greedy keeps 0, drops 1, keeps 2
    angles = np.radians([0.0, 10.0, 20.0, 90.0])
    e = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    threshold = float(np.cos(np.radians(15)))
    for block in (1, 2, 1024):
        assert near_duplicates(e, [0, 1, 2, 3], threshold, block=block) == [1]
    assert near_duplicates(e, [1, 0, 2, 3], threshold) == [0, 2]


def test_config_validation_names_the_field():
    with pytest.raises(SelmaError, match="mode"):
        FilterConfig(mode="best")
    with pytest.raises(SelmaError, match="threshold: got None"):
        FilterConfig(mode="threshold")
    with pytest.raises(SelmaError, match="CLIPScore"):
        FilterConfig(threshold=28)
    with pytest.raises(SelmaError, match="keep_fraction"):
        FilterConfig(mode="keep_fraction", keep_fraction=0)
    with pytest.raises(SelmaError, match="top_k"):
        FilterConfig(mode="top_k_per_prompt", top_k=0)
    with pytest.raises(SelmaError, match="per_skill"):
        FilterConfig(mode="per_skill")
    with pytest.raises(SelmaError, match="dedup_cosine"):
        FilterConfig(threshold=0.2, dedup_cosine=1.5)
    with pytest.raises(SelmaError, match="device"):
        ScorerConfig(path="x", device="tpu")
    cfg = FilterConfig(mode="per_skill", per_skill={"b": 0.3, "a": 0.2})
    assert cfg.per_skill == (("a", 0.2), ("b", 0.3)) and hash(cfg)
    assert cfg.to_dict()["per_skill"] == {"a": 0.2, "b": 0.3}


def test_effective_keep_precedence_review_over_filter_over_default():
    assert effective_keep({}) is True
    assert effective_keep({"keep": False}) is False
    assert effective_keep({"keep": True}) is True
    assert effective_keep({"keep": False, "review": "keep"}) is True
    assert effective_keep({"keep": True, "review": "reject"}) is False
    assert effective_keep({"review": "reject"}) is False
    assert effective_keep({"keep": False, "review": None}) is False
    with pytest.raises(SelmaError, match="review"):
        effective_keep({"review": "maybe"})
    with pytest.raises(SelmaError, match="keep"):
        effective_keep({"keep": "yes"})


def _write_rows(d, rows):
    d.mkdir(parents=True, exist_ok=True)
    (d / METADATA).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_set_review_rewrites_one_row_and_keeps_everything_else(tmp_path):
    rows = [{"file_name": "a_s0.png", "text": "x", "keep": False, "clip_score": 0.1, "extra": [1]},
            {"file_name": "b_s0.png", "text": "y", "review": "keep"}]
    _write_rows(tmp_path, rows)
    row = set_review(tmp_path, "a_s0.png", "keep")
    assert row["review"] == "keep" and effective_keep(row)
    lines = [json.loads(x) for x in (tmp_path / METADATA).read_text().splitlines()]
    assert lines == [{**rows[0], "review": "keep"}, rows[1]]
    set_review(tmp_path, "b_s0.png", None)  # None clears
    lines = [json.loads(x) for x in (tmp_path / METADATA).read_text().splitlines()]
    assert "review" not in lines[1] and lines[0]["review"] == "keep"
    before = (tmp_path / METADATA).read_bytes()
    with pytest.raises(SelmaError, match="file_name"):
        set_review(tmp_path, "missing.png", "keep")
    with pytest.raises(SelmaError, match="review"):
        set_review(tmp_path, "a_s0.png", "ok")
    assert (tmp_path / METADATA).read_bytes() == before


def test_rewrite_is_atomic_and_respects_the_lock(tmp_path):
    _write_rows(tmp_path, [{"file_name": "a.png"}, {"file_name": "b.png"}])
    before = (tmp_path / METADATA).read_bytes()

    def half_then_fail(rows):
        rows[0]["keep"] = False
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        rewrite_metadata(tmp_path, half_then_fail)
    assert (tmp_path / METADATA).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with locked(tmp_path), pytest.raises(SelmaError, match="another process"):
        rewrite_metadata(tmp_path, lambda rows: None, wait_s=0.1)
    assert (tmp_path / METADATA).read_bytes() == before


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--data", "d", "--clip", "c", *argv])


def test_cli_flags_build_the_config():
    assert config_from_args(_args(["--threshold", "0.28"])) == FilterConfig(mode="threshold", threshold=0.28)
    cfg = config_from_args(_args(["--top-k-per-prompt", "2", "--floor", "0.2"]))
    assert (cfg.mode, cfg.top_k, cfg.floor) == ("top_k_per_prompt", 2, 0.2)
    cfg = config_from_args(_args(["--per-skill", "spatial=0.3,countbench=0.25", "--threshold", "0.2"]))
    assert cfg.per_skill == (("countbench", 0.25), ("spatial", 0.3)) and cfg.threshold == 0.2
    assert config_from_args(_args(["--keep-fraction", "0.3"])).keep_fraction == 0.3
    with pytest.raises(SelmaError, match="choose how to select"):
        config_from_args(_args([]))
    with pytest.raises(SelmaError, match="--floor"):
        config_from_args(_args(["--keep-fraction", "0.3", "--threshold", "0.2"]))
    with pytest.raises(SelmaError, match="per_skill: got 'spatial:0.3'"):
        parse_per_skill("spatial:0.3")
    assert parse_per_skill("spatial=0.3\ncountbench = 0.25, ") == {"spatial": 0.3, "countbench": 0.25}  # node text
    assert parse_per_skill("") == {}
    with pytest.raises(SystemExit):
        _args(["--keep-fraction", "0.3", "--top-k-per-prompt", "1"])
