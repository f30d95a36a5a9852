"""Evaluation prompts: held-out prompts kept apart from training by stage 1's guard, and user prompt
files (JSON, JSONL, CSV, TSV, TXT; DSG/TIFA/PartiPrompts shapes) with errors that name file and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selma_backend.errors import SelmaError
from selma_backend.eval.prompts import (
    PromptSpec,
    collect_prompts,
    find_contaminated,
    heldout_prompts,
    load_eval_prompts,
    skill_of_prompts,
)
from selma_backend.fsio import read_jsonl
from selma_backend.prompts import PromptConfig, generate_prompts, load_prompt_texts
from selma_backend.prompts.dedup import rouge_l_f, rouge_tokens
from selma_backend.skills import resolve_skill


@pytest.fixture(scope="module")
def train(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "countbench-seed0.jsonl"
    generate_prompts(PromptConfig(skill="countbench", count=60, seed=0), out)
    return out


def test_heldout_prompts_are_new_and_far_from_every_training_prompt(train, tmp_path):
    rows = heldout_prompts(resolve_skill("countbench"), 15, tmp_path / "h.jsonl", seed=1000, train_prompts=[str(train)])
    assert len(rows) == 15 and {r["skill"] for r in rows} == {"countbench"}
    assert all(r["source"] == "heldout:offline" for r in rows)
    training = load_prompt_texts(train)
    for r in rows:  # the guard's own definition, recomputed here: ROUGE-L F <= 0.8 against every training prompt
        assert max(rouge_l_f(rouge_tokens(t), rouge_tokens(r["prompt"])) for t in training) <= 0.8
    assert {r["seed"] for r in read_jsonl(tmp_path / "h.jsonl")} == {1000}
    assert json.loads((tmp_path / "h.train.json").read_text()) == training  # the guard file, kept for the record
    with pytest.raises(SelmaError, match="exists already"):
        heldout_prompts(resolve_skill("countbench"), 3, tmp_path / "h.jsonl", seed=1000, train_prompts=[str(train)])


def test_the_training_seed_is_refused_for_heldout_prompts(train, tmp_path):
    with pytest.raises(SelmaError, match="heldout_seed.*seed other than"):
        heldout_prompts(resolve_skill("countbench"), 5, tmp_path / "h.jsonl", seed=0, train_prompts=[str(train)])


def test_user_files_copying_training_prompts_are_dropped_and_reported(train, tmp_path):
    copy = read_jsonl(train)[3]["prompt"]
    csv = tmp_path / "mine.csv"
    csv.write_text(f'id,Prompt,skill\nm1,"{copy}",countbench\nm2,a violet lighthouse under a green moon,spatial\n')
    spec = PromptSpec(files=(str(csv),), heldout_skills=("countbench",), heldout_count=4, train_prompts=(str(train),))
    got = collect_prompts(spec, tmp_path / "work")
    assert [h["id"] for h in got.contaminated] == ["m1"] and got.contaminated[0]["train_prompt"] == copy
    assert got.contaminated[0]["rouge_l"] == 1.0
    assert "m1" not in {r["id"] for r in got.rows} and "m2" in {r["id"] for r in got.rows}
    assert got.skills() == ["countbench", "spatial"] and len(got.rows) == 5
    assert set(got.files) == {"heldout:countbench", "file:mine.csv"}
    assert find_contaminated([{"id": "x", "skill": "s", "prompt": copy.upper()}], [copy])[0]["rouge_l"] == 1.0


def test_dsg_style_csv_gives_each_prompt_once(tmp_path):
    f = tmp_path / "dsg-1k-anns.csv"
    f.write_text("item_id,text,source,question_natural_language\n"
                 "d1,a cat on a mat,tifa,Is there a cat?\n"
                 "d1,a cat on a mat,tifa,Is there a mat?\n"
                 "d2,two dogs,tifa,Are there dogs?\n")
    rows = load_eval_prompts(f, skill="dsg")
    assert rows == [{"id": "d1", "skill": "dsg", "prompt": "a cat on a mat", "source": "file:dsg-1k-anns.csv"},
                    {"id": "d2", "skill": "dsg", "prompt": "two dogs", "source": "file:dsg-1k-anns.csv"}]


def test_partiprompts_tsv_takes_the_category_as_skill(tmp_path):
    f = tmp_path / "PartiPrompts.tsv"
    f.write_text("Prompt\tCategory\tChallenge\nA red cube on a blue sphere\tArtifacts\tBasic\nbread\tFood\tBasic\n")
    rows = load_eval_prompts(f)
    assert [(r["id"], r["skill"], r["prompt"]) for r in rows] == [
        ("PartiPrompts-00001", "Artifacts", "A red cube on a blue sphere"), ("PartiPrompts-00002", "Food", "bread")]


def test_json_lists_id_maps_jsonl_and_txt(tmp_path):
    (tmp_path / "tifa.json").write_text(json.dumps({"coco_1": {"caption": "a bus", "x": 1}, "coco_2": {"caption": "a kite"}}))
    (tmp_path / "ids.json").write_text(json.dumps({"k1": "a kite"}))
    (tmp_path / "list.json").write_text(json.dumps(["a", {"text": "b", "skill": "s"}]))
    (tmp_path / "p.jsonl").write_text('{"id": "q", "prompt": "a  spaced\\n prompt"}\n')
    (tmp_path / "p.txt").write_text("one prompt\n\nanother prompt\n")
    assert [(r["id"], r["prompt"]) for r in load_eval_prompts(tmp_path / "tifa.json")] == [("coco_1", "a bus"),
                                                                                           ("coco_2", "a kite")]
    assert [(r["id"], r["prompt"]) for r in load_eval_prompts(tmp_path / "ids.json")] == [("k1", "a kite")]
    assert [(r["id"], r["skill"]) for r in load_eval_prompts(tmp_path / "list.json")] == [("list-00001", "list"),
                                                                                         ("list-00002", "s")]
    assert load_eval_prompts(tmp_path / "p.jsonl")[0]["prompt"] == "a spaced prompt"
    assert [r["prompt"] for r in load_eval_prompts(tmp_path / "p.txt", skill="x")] == ["one prompt", "another prompt"]


def test_file_errors_name_the_file_and_the_column(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("id,description\n1,a cat\n")
    with pytest.raises(SelmaError, match=r"bad.csv: no prompt column; its columns are \['id', 'description'\]"):
        load_eval_prompts(f)
    assert load_eval_prompts(f, prompt_column="Description")[0]["prompt"] == "a cat"
    with pytest.raises(SelmaError, match="prompt_column: got 'caption'.*'id', 'description'"):
        load_eval_prompts(f, prompt_column="caption")
    f.write_text("id,prompt\n1,a cat\n2,\n")
    with pytest.raises(SelmaError, match=r"bad.csv, row 2: column 'prompt' is empty"):
        load_eval_prompts(f)
    f.write_text("id,prompt\n1,a cat\n1,a dog\n")
    with pytest.raises(SelmaError, match=r"row 2: id '1' is used for two different prompts"):
        load_eval_prompts(f)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SelmaError, match="bad.json: not valid JSON"):
        load_eval_prompts(tmp_path / "bad.json")


def test_spec_checks_before_anything_runs(train, tmp_path):
    with pytest.raises(SelmaError, match="prompts: got 'none'"):
        PromptSpec()
    with pytest.raises(SelmaError, match="train_prompts"):
        PromptSpec(heldout_skills=("countbench",))
    with pytest.raises(SelmaError, match="files: got .*missing.csv"):
        PromptSpec(files=(str(tmp_path / "missing.csv"),))
    with pytest.raises(SelmaError, match="skill: got 'no-such-skill'"):
        PromptSpec(heldout_skills=("no-such-skill",), train_prompts=(str(train),))
    spec = PromptSpec(heldout_skills=("countbench",), train_prompts=(str(train),))
    assert spec.to_dict()["heldout_skills"][0]["id"] == "countbench"


def test_the_skill_of_a_prompts_file_comes_from_its_report(train, tmp_path):
    assert skill_of_prompts(train, "countbench").id == "countbench"
    custom = {**resolve_skill("countbench").to_dict(), "id": "my_counting", "origin": "fields"}
    report = tmp_path / "p.report.json"
    report.write_text(json.dumps({"config": {"skill": custom}}))
    assert skill_of_prompts(tmp_path / "p.jsonl", "my_counting").instruction == custom["instruction"]
    with pytest.raises(SelmaError, match="skill: got 'other'"):
        skill_of_prompts(tmp_path / "p.jsonl", "other")
