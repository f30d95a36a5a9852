"""World skills: seeded offline generators, distinct prompts, a held-out split no training prompt touches."""

from __future__ import annotations

import json

import pytest

from selma_backend.errors import SelmaError
from selma_backend.skills import all_skills, load_skills_dir
from selma_backend.world.captions import parse_caption
from selma_backend.world.skills import (
    WORLD_SKILLS,
    as_selma_skill,
    split_of,
    world_prompts,
    write_prompts,
    write_skill_files,
)
from selma_backend.world.spec import COMMON_COLOURS, PromptSpec, is_common

SKILLS = WORLD_SKILLS.names()


def test_the_world_has_selmas_skills():
    assert SKILLS == ["world_common", "world_counting", "world_spatial", "world_binding", "world_whoops"]


@pytest.mark.parametrize("skill", SKILLS)
def test_prompts_are_seeded_distinct_and_carry_their_meaning(skill):
    rows = world_prompts(skill, 300, seed=1)
    assert rows == world_prompts(skill, 300, seed=1)
    assert rows != world_prompts(skill, 300, seed=2)
    specs = [PromptSpec.from_dict(r["spec"]) for r in rows]
    assert len({s.key() for s in specs}) == 300
    for r, s in zip(rows, specs, strict=True):
        assert parse_caption(r["prompt"]) == s
        assert r["skill"] == skill and r["split"] == "train" == split_of(s) and r["source"] == "world"
        assert set(r) >= {"id", "skill", "prompt", "source", "seed"}  # what stage 2 reads
    assert len({r["id"] for r in rows}) == 300


def test_skills_ask_for_what_they_teach():
    for s in (PromptSpec.from_dict(r["spec"]) for r in world_prompts("world_common", 200)):
        assert all(is_common(e.shape, e.colour) for e in s.entities)
    for s in (PromptSpec.from_dict(r["spec"]) for r in world_prompts("world_counting", 200)):
        assert s.entities[0].numbered and s.relation is None
    assert {e.count for r in world_prompts("world_counting", 200)
            for e in [PromptSpec.from_dict(r["spec"]).entities[0]]} == {1, 2, 3, 4}
    for s in (PromptSpec.from_dict(r["spec"]) for r in world_prompts("world_spatial", 200)):
        assert s.relation is not None and len(s.entities) == 2
    for s in (PromptSpec.from_dict(r["spec"]) for r in world_prompts("world_binding", 200)):
        a, b = s.entities
        assert not is_common(a.shape, a.colour) and not is_common(b.shape, b.colour)
        assert is_common(a.shape, b.colour) and is_common(b.shape, a.colour)  # swapped
    for s in (PromptSpec.from_dict(r["spec"]) for r in world_prompts("world_whoops", 200)):
        assert any(not is_common(e.shape, e.colour) for e in s.entities)


def test_heldout_prompts_never_appear_in_training_prompts_of_any_skill():
    train = [r for sk in SKILLS for r in world_prompts(sk, 400, seed=0)]
    heldout = [r for sk in SKILLS for r in world_prompts(sk, 100, seed=0, split="heldout")]
    assert {r["split"] for r in heldout} == {"heldout"}
    train_keys = {PromptSpec.from_dict(r["spec"]).key() for r in train}
    held_keys = {PromptSpec.from_dict(r["spec"]).key() for r in heldout}
    assert len(held_keys) > 450 and not train_keys & held_keys  # (common scenes include spatial ones)
    assert not {r["prompt"].lower() for r in train} & {r["prompt"].lower() for r in heldout}
    mixed = world_prompts("world_spatial", 500, seed=3, split="all")
    share = sum(r["split"] == "heldout" for r in mixed) / len(mixed)
    assert 0.12 < share < 0.28  # about HELDOUT_FRACTION = 0.2


def test_too_many_prompts_is_a_clear_error_and_bad_arguments_teach():
    with pytest.raises(SelmaError, match="fewer"):
        world_prompts("world_binding", 100_000)
    with pytest.raises(SelmaError, match="world_counting"):
        world_prompts("counting", 10)
    with pytest.raises(SelmaError, match="heldout"):
        world_prompts("world_counting", 10, split="test")


def test_world_skills_are_selma_skills_with_the_right_flip(tmp_path):
    skill = as_selma_skill("world_spatial")
    assert skill.flip == "swap_left_right" and len(skill.examples) == 3
    assert all(split_of(parse_caption(e)) == "train" for e in skill.examples)
    paths = write_skill_files(tmp_path / "skills")
    assert [p.name for p in paths] == [f"{s}.json" for s in SKILLS]
    loaded = load_skills_dir(tmp_path / "skills")
    assert loaded["world_spatial"] == skill and loaded["world_counting"].flip == "allow"
    assert set(SKILLS) <= set(all_skills(tmp_path / "skills"))


def test_write_prompts_never_overwrites(tmp_path):
    rows = world_prompts("world_counting", 5)
    path = write_prompts(rows, tmp_path / "prompts.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    with pytest.raises(SelmaError, match="exists"):
        write_prompts(rows, path)
    assert set(COMMON_COLOURS) == set(PromptSpec.from_dict(r["spec"]).entities[0].shape for r in
                                      world_prompts("world_counting", 100))
