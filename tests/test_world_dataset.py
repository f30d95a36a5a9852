"""World datasets: SELMA dataset folders of ground-truth images that stages 3 and 4 read unchanged."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from selma_backend.cli import main as selma_main
from selma_backend.errors import SelmaError
from selma_backend.filter import FilterConfig, ScorerConfig, filter_dataset, load_scorer
from selma_backend.fsio import read_jsonl
from selma_backend.render.dataset import METADATA, read_info, read_record
from selma_backend.tiny_models import write_clip
from selma_backend.train.data import load_samples
from selma_backend.world.dataset import WorldRenderConfig, judge_dataset, render_world_dataset
from selma_backend.world.judge import judge
from selma_backend.world.scene import Scene
from selma_backend.world.skills import world_prompts, write_skill_files


@pytest.fixture(scope="module")
def rows():
    return world_prompts("world_spatial", 6, seed=0) + world_prompts("world_counting", 6, seed=0)


def test_dataset_is_reproducible_resumable_and_exact(tmp_path, rows):
    cfg = WorldRenderConfig(resolution=32, images_per_prompt=2, seed=3)
    a = render_world_dataset(rows, tmp_path / "a", cfg)
    assert (a.planned, a.rendered, a.existing) == (24, 24, 0)
    render_world_dataset(rows, tmp_path / "b", cfg)
    meta = read_jsonl(tmp_path / "a" / METADATA)
    assert meta == read_jsonl(tmp_path / "b" / METADATA) and len(meta) == 24
    for row in meta:
        png_a, png_b = tmp_path / "a" / row["file_name"], tmp_path / "b" / row["file_name"]
        assert png_a.read_bytes() == png_b.read_bytes()
        assert png_a.with_suffix(".txt").read_text() == row["text"]
        record = read_record(png_a)
        assert record["row"] == row and row["source"] == "selma-world"
        scene = Scene.from_dict(record["settings"]["scene"])  # the ground truth travels with the image
        with Image.open(png_a) as im:
            assert im.size == (32, 32)
            result = judge(im.convert("RGB"), row["text"])
        assert result.score == 1.0
        assert sorted(o.shape for o in scene.objects) == sorted(d.shape for d in result.detections.objects)
    (tmp_path / "a" / meta[0]["file_name"]).unlink()
    again = render_world_dataset(rows, tmp_path / "a", cfg)
    assert (again.existing, again.rendered) == (23, 1)
    assert (tmp_path / "a" / meta[0]["file_name"]).read_bytes() == (tmp_path / "b" / meta[0]["file_name"]).read_bytes()
    assert read_info(tmp_path / "a")["render"]["settings"]["resolution"] == 32
    with pytest.raises(SelmaError, match="other settings"):
        render_world_dataset(rows, tmp_path / "a", WorldRenderConfig(resolution=64, images_per_prompt=2, seed=3))
    summary = judge_dataset(tmp_path / "a")
    assert summary["images"] == 24 and summary["score"] == 1.0 and set(summary["skills"]) == {"world_spatial", "world_counting"}


def test_filter_and_training_loaders_read_a_world_dataset(tmp_path, rows):
    data = tmp_path / "data"
    render_world_dataset(rows, data, WorldRenderConfig(resolution=64))
    with load_scorer(ScorerConfig(str(write_clip(tmp_path / "clip", seed=0)), batch_size=4)) as scorer:
        report = filter_dataset(data, scorer, FilterConfig(mode="threshold", threshold=-1.0, dedup_cosine=0.0))
    assert report.embedded == 12
    scored = read_jsonl(data / METADATA)
    assert all(isinstance(r["clip_score"], float) and r["keep"] for r in scored)
    samples = load_samples(data, resolution=64, buckets=False, user_dir=write_skill_files(tmp_path / "skills")[0].parent)
    assert len(samples) == 12
    flips = {s.skill: s.flip for s in samples}
    assert flips == {"world_spatial": "swap_left_right", "world_counting": "allow"}
    spatial = next(s for s in samples if s.skill == "world_spatial" and " left " in f" {s.caption} ")
    assert " right " in f" {spatial.caption_for(True)} "


def test_cli_writes_prompts_renders_and_judges(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    assert selma_main(["world", "prompts", "--skill", "world_whoops", "--n", "5", "--out", str(prompts)]) == 0
    assert len(read_jsonl(prompts)) == 5
    assert selma_main(["world", "render", "--prompts", str(prompts), "--out", str(tmp_path / "d"),
                       "--resolution", "32"]) == 0
    assert selma_main(["world", "render", "--skill", "world_binding", "--n", "3", "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert selma_main(["world", "judge", "--dataset", str(tmp_path / "d"), "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == 1.0
    assert json.loads((tmp_path / "s.json").read_text())["images"] == 5
    assert selma_main(["world", "render", "--out", str(tmp_path / "f")]) == 2  # neither --prompts nor --skill
    assert selma_main(["world", "prompts", "--skill", "world_whoops", "--n", "5", "--out", str(prompts)]) == 2


def test_a_tight_scene_whose_first_50_tries_fail_still_renders(tmp_path):
    """'A yellow star above a little orange star' (seed 0, sample 0) finds no placement in sample_scene's
    first 50 tries; the writer keeps drawing from the same generator instead of stopping the dataset."""
    import random

    from selma_backend.world.dataset import scene_seed
    from selma_backend.world.scene import sample_scene
    from selma_backend.world.spec import PromptSpec

    (row,) = [r for r in world_prompts("world_spatial", 1400, seed=0) if r["id"] == "world_spatial-t001336"]
    with pytest.raises(SelmaError, match="no room"):
        sample_scene(PromptSpec.from_dict(row["spec"]), random.Random(scene_seed(0, row["id"], 0)))
    report = render_world_dataset([row], tmp_path / "d", WorldRenderConfig(resolution=64, seed=0))
    assert report.rendered == 1
    assert judge_dataset(tmp_path / "d")["score"] == 1.0
