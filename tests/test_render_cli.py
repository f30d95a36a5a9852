"""``selma render`` (selma_backend.render.cli), in-process with the real loader on the tiny SD1 folder."""

from __future__ import annotations

import json

import pytest
from render_helpers.common import check_dataset, one_thread, prompt_rows

from selma_backend import cli as selma_cli
from selma_backend.fsio import atomic_write_text
from selma_backend.render import cli
from selma_backend.tiny_models import write_sd1


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("render-cli")
    model = write_sd1(base / "sd1", seed=0)
    prompts = base / "prompts.jsonl"
    atomic_write_text(prompts, "".join(json.dumps(r) + "\n" for r in prompt_rows(3)))
    with one_thread():
        yield model, prompts


def argv(model, prompts, out, *extra):
    return ["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--batch-size", "2",
            *extra]


def test_cli_renders_and_prints_its_report(setup, tmp_path, capsys):
    model, prompts = setup
    assert cli.main(argv(model, prompts, tmp_path, "--images-per-prompt", "2", "--scheduler", "euler_a",
                         "--cfg", "4", "--negative", "ugly", "--seed", "3", "--device", "cpu")) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["status"], report["rendered"], report["planned"]) == ("complete", 6, 6)
    check_dataset(tmp_path, {f"countbench-00000{i}_s{k}.png" for i in range(3) for k in range(2)})
    settings = json.loads((tmp_path / "dataset.json").read_text())["render"]["settings"]
    assert (settings["scheduler"], settings["cfg"], settings["negative"], settings["seed"]) == ("euler_a", 4.0, "ugly", 3)


def test_bad_input_fails_before_the_model_loads(setup, tmp_path, capsys, monkeypatch):
    model, prompts = setup
    monkeypatch.setattr(cli, "load_model", lambda args: pytest.fail("the model was loaded"))
    assert cli.main(argv(model, prompts, tmp_path, "--width", "100")) == 2
    assert "width: got 100" in capsys.readouterr().err
    assert cli.main(argv(model, tmp_path / "nope.jsonl", tmp_path)) == 2
    assert "selma prompts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(argv(model, prompts, tmp_path, "--scheduler", "dpm++"))


def test_other_settings_need_allow_mixed(setup, tmp_path, capsys):
    model, prompts = setup
    assert cli.main(argv(model, prompts, tmp_path)) == 0
    assert cli.main(argv(model, prompts, tmp_path, "--cfg", "3", "--images-per-prompt", "2")) == 2
    assert "--allow-mixed" in capsys.readouterr().err
    assert cli.main(argv(model, prompts, tmp_path, "--cfg", "3", "--images-per-prompt", "2", "--allow-mixed")) == 0


@pytest.mark.skipif("render" not in selma_cli.COMMANDS, reason="`render` not yet registered in selma_backend/cli.py")
def test_selma_render_is_the_same_command(setup, tmp_path, capsys):
    model, prompts = setup
    assert selma_cli.main(["render", *argv(model, prompts, tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["rendered"] == 3
