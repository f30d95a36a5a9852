"""`selma demo`: runs the built stages on embedded defaults, offline, and resumes instead of redoing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from selma_backend.fsio import read_jsonl

BIN = Path(sys.executable).parent


def test_demo_writes_every_artefact_offline_and_resumes(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf"))
    cmd = [str(BIN / "selma"), "demo", "--tiny", "--eval-count", "4", "--out", str(tmp_path / "d"), "--steps", "2",
           "--count", "12", "--skills", "countbench,product"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr
    manifest = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert manifest["mode"] == "tiny" and manifest["models"]["sd"] == manifest["models"]["sd1"]
    assert set(manifest["models"]) == {"sd", "sd1", "sdxl", "mini-sd15", "clip", "llm"}
    assert manifest["judge"] is None  # the world judge reads world prompts only
    for skill in ("countbench", "product"):
        rows = read_jsonl(manifest["prompts"][skill])
        assert len(rows) == 12 and {r["skill"] for r in rows} == {skill}
        images = read_jsonl(Path(manifest["datasets"][skill]) / "metadata.jsonl")
        assert len(images) == 24 and all(isinstance(r["clip_score"], float) for r in images)
        assert sum(r["keep"] for r in images) == 12 == manifest["filter"][skill]["kept"]  # best of 2 per prompt
        assert Path(manifest["filter"][skill]["histogram"]).is_file()
    from selma_backend.lora.format import load_lora, provenance

    for skill in ("countbench", "product"):
        tensors, meta = load_lora(manifest["experts"][skill])
        assert provenance(meta)["skill"] == skill and tensors
    merged = provenance(load_lora(manifest["merged"]["path"])[1])
    assert merged["config"]["method"] == "linear" and len(merged["sources"]) == 2
    assert Path(manifest["report"]).name == "index.html" and Path(manifest["report"]).is_file()
    assert manifest["pending_stages"] == []
    before = Path(manifest["prompts"]["countbench"]).read_bytes()
    again = subprocess.run(cmd[:-3] + ["16", "--skills", "countbench,product"], capture_output=True,
                           text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "skipped" in again.stdout and "8 rendered, 24 already there" in again.stdout  # resumed, not redone
    after = Path(manifest["prompts"]["countbench"]).read_bytes()
    assert after.startswith(before) and len(read_jsonl(manifest["prompts"]["countbench"])) == 16
    assert "already trained" not in again.stdout  # the data grew: the experts were trained again
    assert "already merged" not in again.stdout and "report-002" in again.stdout  # a new report, the old one kept


def test_demo_rejects_an_unknown_skill_before_doing_anything(tmp_path):
    out = subprocess.run([str(BIN / "selma"), "demo", "--out", str(tmp_path / "d"), "--skills", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "nope" in out.stderr
    assert not (tmp_path / "d").exists()


def test_demo_defaults_to_the_world_models_and_judges_base_vs_merged(tmp_path, world_sd):
    """The default run: world-sd renders/trains/is evaluated, world-clip scores, world skills' prompts, and the
    world judge's accuracy of base vs merged on held-out world prompts, with a before/after grid."""
    from PIL import Image

    from selma_backend.world.captions import parse_caption
    from selma_backend.world.clip_eval import WORLD_CLIP
    from selma_backend.world.judge import judge
    from selma_backend.world.sd_model import WORLD_SD
    from selma_backend.world.skills import split_of

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf"))
    model = [] if world_sd == WORLD_SD else ["--model", str(world_sd)]  # the stand-in until world-sd ships
    cmd = [str(BIN / "selma"), "demo", "--out", str(tmp_path / "d"), "--count", "3", "--steps", "2",
           "--train-steps", "2", "--eval-count", "2", *model]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    m = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert m["mode"] == "world" and m["models"] == {"sd": str(world_sd), "clip": str(WORLD_CLIP)}
    assert list(m["prompts"]) == ["world_counting", "world_spatial"]
    for skill, path in m["prompts"].items():
        for row in read_jsonl(path):  # the world generator's training captions
            assert row["skill"] == skill and split_of(parse_caption(row["prompt"])) == "train"
    report = Path(m["report"]).parent
    scores = json.loads((report / "scores.json").read_text())
    assert len(scores["prompts"]) == 4 and all(split_of(parse_caption(p["prompt"])) == "heldout"
                                               for p in scores["prompts"])
    base, merged = m["judge"]["base"], m["judge"]["merged"]
    assert base["images"] == merged["images"] == 4 and set(m["judge"]["models"]) >= {"base", "merged-linear"}
    prompts = {p["id"]: p["prompt"] for p in scores["prompts"]}
    mine = [judge(Image.open(report / r["file"]).convert("RGB"), prompts[r["prompt_id"]]).score
            for r in scores["records"] if r["model"] == "merged-linear"]
    assert merged["score"] == round(sum(mine) / len(mine), 4)  # the judge's own scores, averaged
    grid = Image.open(m["grid"])
    assert grid.width > 2 * 128 and grid.height > 4 * 128  # base | merged, one row per held-out prompt
    assert "world judge (held-out)  base" in done.stdout and "before/after grid" in done.stdout


def test_demo_names_a_missing_world_model_and_the_way_out(tmp_path):
    out = subprocess.run([str(BIN / "selma"), "demo", "--out", str(tmp_path / "d"), "--model", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "model_index.json" in out.stderr and "--tiny" in out.stderr
