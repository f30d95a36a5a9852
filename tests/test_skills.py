"""Skills: built-ins as the issue lists them, user files (JSON/TOML) with teaching errors, lookup."""

from __future__ import annotations

import json

import pytest

from selma_backend import cli
from selma_backend.errors import SelmaError
from selma_backend.skills import (
    FLIP_POLICIES,
    Skill,
    builtin_skills,
    list_skills,
    load_skill_file,
    load_skills_dir,
    resolve_skill,
    skill_from_fields,
)
from selma_backend.world.skills import WORLD_SKILLS

SELMA_FIVE = {"localized_narratives": 50, "countbench": 30, "diffusiondb": 50, "whoops": 30, "coco": 30}
OURS = {"spatial", "attributes", "product"}

GOOD_TOML = """
id = "signage"
name = "Shop signage"
instruction = "Write descriptions of shop fronts with hand-painted signs."
examples = ["A bakery front with a striped awning.", "A flower shop with buckets on the pavement.", "A barber shop pole beside a glass door."]
word_limit = 25
flip = "never"
"""


def test_builtins_are_the_issue_list_with_its_word_limits():
    skills = builtin_skills()
    assert list(skills)[:5] == list(SELMA_FIVE)  # SELMA's five first, stable order
    assert set(skills) == set(SELMA_FIVE) | OURS
    for sid, limit in SELMA_FIVE.items():
        assert skills[sid].word_limit == limit
    for s in skills.values():
        assert len(s.examples) >= 3 and s.instruction and s.name
        assert s.flip in FLIP_POLICIES
        assert all(len(e.split()) < s.word_limit for e in s.examples)
    # spatial captions must not be mirrored blindly; product shots may carry text/logos
    assert skills["spatial"].flip == "swap_left_right"
    assert skills["product"].flip == "never"
    assert "three" in skills["countbench"].instruction


def test_list_skills_shows_builtins_and_user_folder(tmp_path):
    (tmp_path / "signage.toml").write_text(GOOD_TOML)
    (tmp_path / "notes.md").write_text("not a skill")
    listed = list_skills(tmp_path)
    assert [s.id for s in listed][-1] == "signage"
    signage = listed[-1]
    assert (signage.name, signage.word_limit, signage.flip) == ("Shop signage", 25, "never")
    assert signage.origin == str(tmp_path / "signage.toml")
    assert [s.id for s in list_skills()] == list(builtin_skills()) + WORLD_SKILLS.names()  # built-ins, then the world's


def test_env_var_names_the_user_folder(tmp_path, monkeypatch):
    (tmp_path / "signage.toml").write_text(GOOD_TOML)
    monkeypatch.setenv("SELMA_SKILLS_DIR", str(tmp_path))
    assert resolve_skill("signage").word_limit == 25


def test_json_and_toml_files_load_the_same_skill(tmp_path):
    toml_skill = load_skill_file(_write(tmp_path / "a.toml", GOOD_TOML))
    data = toml_skill.to_dict()
    data.pop("origin")
    json_skill = load_skill_file(_write(tmp_path / "a.json", json.dumps(data)))
    assert json_skill == toml_skill  # origin is not compared
    assert json_skill.examples == toml_skill.examples and isinstance(json_skill.examples, tuple)


@pytest.mark.parametrize(
    ("body", "must_say"),
    [
        (GOOD_TOML.replace('flip = "never"', 'flip = "mirror"'), ["flip", "'mirror'", "swap_left_right"]),
        (GOOD_TOML.replace("word_limit = 25", "word_limit = 2"), ["word_limit", "3 to 300"]),
        (GOOD_TOML.replace("word_limit = 25\n", ""), ["missing field 'word_limit'"]),
        (GOOD_TOML + 'colour = "red"\n', ["unknown field 'colour'", "allowed fields"]),
        (GOOD_TOML.replace('"A barber shop pole beside a glass door."', ""), ["examples", "at least 3"]),
        (GOOD_TOML.replace('id = "signage"', 'id = "Shop Signs!"'), ["id", "lowercase"]),
        (GOOD_TOML, []),  # control: the good file loads
        ('id = "x"\nname = [unclosed', ["not valid TOML", "fix the syntax"]),
    ],
)
def test_bad_skill_file_errors_name_file_field_and_fix(tmp_path, body, must_say):
    path = _write(tmp_path / "bad.toml", body)
    if not must_say:
        load_skill_file(path)  # control: the unmodified file is fine
        return
    with pytest.raises(SelmaError) as err:
        load_skill_file(path)
    msg = str(err.value)
    assert str(path) in msg
    for part in must_say:
        assert part in msg


def test_bad_json_and_example_over_limit(tmp_path):
    with pytest.raises(SelmaError, match=r"bad\.json.*not valid JSON"):
        load_skill_file(_write(tmp_path / "bad.json", '{"id": "x",'))
    long = dict(id="x", name="X", instruction="Do it.", examples=["one two three four five", "a b c", "d e f"], word_limit=5)
    with pytest.raises(SelmaError, match=r"examples.*fewer than word_limit=5"):
        load_skill_file(_write(tmp_path / "long.json", json.dumps(long)))


def test_user_folder_conflicts_are_errors(tmp_path):
    _write(tmp_path / "a.toml", GOOD_TOML)
    _write(tmp_path / "b.toml", GOOD_TOML)
    with pytest.raises(SelmaError, match=r"b\.toml.*'signage'.*also used by.*a\.toml"):
        load_skills_dir(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _write(other / "coco.toml", GOOD_TOML.replace('id = "signage"', 'id = "coco"'))
    with pytest.raises(SelmaError, match=r"'coco' is a built-in skill; choose another id"):
        list_skills(other)


def test_resolve_by_id_path_or_skill(tmp_path):
    assert resolve_skill("spatial") is not None and resolve_skill("spatial").id == "spatial"
    path = _write(tmp_path / "s.toml", GOOD_TOML)
    assert resolve_skill(str(path)).id == "signage"
    s = resolve_skill("coco")
    assert resolve_skill(s) is s
    with pytest.raises(SelmaError) as err:
        resolve_skill("colour")
    assert "'colour'" in str(err.value) and "'attributes'" in str(err.value)
    with pytest.raises(SelmaError, match="existing .json/.toml skill file"):
        resolve_skill(str(tmp_path / "missing.toml"))


def test_skill_from_node_fields():
    s = skill_from_fields("signs", "Signs", "Write shop signs.", "A red sign.\n\n  A blue sign. \nA neon sign.", 20, "never")
    assert s.examples == ("A red sign.", "A blue sign.", "A neon sign.")
    assert s.origin == "fields" and s.flip == "never"
    with pytest.raises(SelmaError, match="examples"):
        skill_from_fields("signs", "Signs", "Write shop signs.", "only one", 20)
    with pytest.raises(SelmaError, match="flip"):
        Skill("x", "X", "Do.", ("a b", "c d", "e f"), 10, "sometimes")


def test_cli_lists_and_shows_skills(tmp_path, capsys):
    _write(tmp_path / "signage.toml", GOOD_TOML)
    assert cli.main(["skills", "--skills-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for sid in [*SELMA_FIVE, *OURS, "signage"]:
        assert sid in out
    assert "swap_left_right" in out and "< 25" in out
    assert cli.main(["skills", "spatial"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "spatial"
    assert cli.main(["skills", "nope"]) == 2
    assert "allowed" in capsys.readouterr().err


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path
