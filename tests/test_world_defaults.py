"""The world's skills and models are SELMA's defaults: skills everywhere, offline world prompts, shipped models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from selma_backend.errors import SelmaError
from selma_backend.prompts.generate import PromptConfig, generate_prompts
from selma_backend.prompts.offline import OfflineBackend, offline_prompts, offline_skills
from selma_backend.skills import all_skills, builtin_skills, resolve_skill, world_skills
from selma_backend.train.data import load_samples
from selma_backend.world.captions import parse_caption
from selma_backend.world.skills import WORLD_SKILLS, split_of, world_prompts, write_skill_files

BIN = Path(sys.executable).parent


def test_world_skills_follow_the_builtins_and_keep_eight_builtins():
    skills = all_skills()
    assert len(builtin_skills()) == 8
    assert list(skills) == list(builtin_skills()) + WORLD_SKILLS.names()
    assert all(skills[s].origin == "world" for s in WORLD_SKILLS.names())
    assert resolve_skill("world_spatial").flip == "swap_left_right" and resolve_skill("world_counting").flip == "allow"
    assert set(world_skills()) == set(WORLD_SKILLS.names())


def test_a_user_file_may_replace_a_world_skill_but_not_a_builtin(tmp_path):
    write_skill_files(tmp_path)
    data = json.loads((tmp_path / "world_counting.json").read_text())
    (tmp_path / "world_counting.json").write_text(json.dumps({**data, "name": "My counting", "flip": "never"}))
    mine = all_skills(tmp_path)["world_counting"]
    assert (mine.name, mine.flip, mine.origin) == ("My counting", "never", str(tmp_path / "world_counting.json"))
    (tmp_path / "coco.json").write_text(json.dumps({**data, "id": "coco"}))
    with pytest.raises(SelmaError, match="'coco' is a built-in skill"):
        all_skills(tmp_path)


@pytest.mark.parametrize("skill", ["world_counting", "world_spatial"])
def test_offline_backend_writes_the_world_generators_training_captions(tmp_path, skill):
    assert skill in offline_skills()
    texts = offline_prompts(resolve_skill(skill), 30, seed=5)
    assert texts == [r["prompt"] for r in world_prompts(skill, 30, seed=5)]
    for t in texts:  # each one a caption the world parses, none of them held out
        assert split_of(parse_caption(t)) == "train"
    report = generate_prompts(PromptConfig(skill=resolve_skill(skill), count=40, seed=0), tmp_path / "p.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert report.status == "complete" and len(rows) == 40 and {r["skill"] for r in rows} == {skill}
    assert all(split_of(parse_caption(r["prompt"])) == "train" for r in rows)
    reply = OfflineBackend(resolve_skill(skill)).chat([], seed=3)
    assert len(reply.splitlines()) == 20 and reply.startswith("1. ")


def test_builtin_skills_keep_their_grammar_prompts():
    texts = offline_prompts(resolve_skill("countbench"), 5, seed=0)
    assert len(texts) == 5 and not any(t in {r["prompt"] for r in world_prompts("world_counting", 200)} for t in texts)


def test_cli_writes_world_prompts_offline(tmp_path):
    out = tmp_path / "counting.jsonl"
    done = subprocess.run([str(BIN / "selma"), "prompts", "--llm", "offline", "--skill", "world_counting", "--count", "25",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 25
    for r in rows:
        spec = parse_caption(r["prompt"])
        assert spec.entities[0].numbered and 1 <= spec.entities[0].count <= 4


def test_training_resolves_the_world_flip_policies(tmp_path):
    from PIL import Image

    rows = []
    for i, skill in enumerate(["world_spatial", "world_counting"]):
        Image.new("RGB", (64, 64), "white").save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": "a red circle left of a blue square", "skill": skill})
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spatial, counting = load_samples(tmp_path, resolution=64, buckets=False)
    assert (spatial.flip, counting.flip) == ("swap_left_right", "allow")
    assert spatial.caption_for(True) == "a red circle right of a blue square"


def test_evaluation_of_a_world_skill_uses_the_worlds_heldout_prompts(tmp_path):
    from selma_backend.eval.prompts import heldout_prompts

    train = tmp_path / "train.jsonl"
    generate_prompts(PromptConfig(skill=resolve_skill("world_spatial"), count=60, seed=0), train)
    rows = heldout_prompts(resolve_skill("world_spatial"), 12, tmp_path / "heldout.jsonl", seed=1000,
                           train_prompts=[str(train)])
    assert len(rows) == 12 and all(r["source"] == "heldout:offline" for r in rows)
    assert all(split_of(parse_caption(r["prompt"])) == "heldout" for r in rows)  # never a training meaning


@pytest.mark.comfy
def test_selma_loaders_list_the_shipped_models_and_native_loaders_do_not(comfy_server):
    info = comfy_server.get_json("/object_info")

    def options(node: str, name: str) -> list[str]:
        spec = info[node]["input"]["required"][name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]

    assert "diffusers/world-sd" in options("SelmaLoadModel", "checkpoint")
    assert "world-clip" in options("SelmaLoadClip", "clip_model")
    assert not any("world" in n for n in options("CheckpointLoaderSimple", "ckpt_name"))
    assert not any("world" in n for n in options("CLIPLoader", "clip_name"))
    assert not (comfy_server.base_dir / "models" / "clip" / "world-clip").exists()  # listed, not copied


@pytest.mark.comfy
def test_a_graph_renders_with_world_sd_and_scores_with_world_clip(comfy_server):
    from PIL import Image

    from selma_backend.fsio import read_jsonl
    from selma_backend.world.clip_eval import WORLD_CLIP
    from selma_backend.world.sd_model import WORLD_SD

    graph = json.loads((Path(__file__).resolve().parents[1] / "workflows" / "api" /
                        "selma_stage3_filter_review.json").read_text())
    graph["2"]["inputs"].update(project="world-defaults", count=2)
    graph["4"]["inputs"].update(steps=2)
    entry = comfy_server.run(graph)
    d = comfy_server.base_dir / "output" / "selma" / "world-defaults" / "datasets" / "world_counting-seed0"
    rows = read_jsonl(d / "metadata.jsonl")
    assert len(rows) == 4 and all(isinstance(r["clip_score"], float) for r in rows)
    assert all(Image.open(d / r["file_name"]).size == (64, 64) for r in rows)  # the world model's size
    for r in rows:
        assert parse_caption(r["text"]).entities[0].numbered  # world prompts, as the world judge reads them
    info = json.loads((d / "dataset.json").read_text())
    shipped = (WORLD_SD / "model_index.json").is_file()
    expected = WORLD_SD if shipped else comfy_server.base_dir / "models" / "diffusers" / "world-sd"
    assert Path(info["render"]["model"]["source"]) == expected  # the shipped folder itself: nothing was copied
    assert Path(info["filter"]["scorer"]["path"]) == WORLD_CLIP
    assert "kept" in entry["outputs"]["8"]["text"][0]


def test_world_guidance_is_the_same_in_reproduce_demo_and_workflows():
    """One measured guidance for world-sd (README): the demo and the workflows render as `selma reproduce` does."""
    from selma_backend.demo import WORLD
    from selma_backend.world.reproduce import ReproduceConfig

    cfg = ReproduceConfig().cfg
    assert cfg == WORLD["cfg"] == 7.5
    folder = Path(__file__).resolve().parents[1] / "workflows" / "api"
    seen = {}
    for path in folder.glob("*.json"):
        for node in json.loads(path.read_text()).values():
            if node["class_type"].startswith("Selma") and "cfg" in node["inputs"]:
                seen[f"{path.stem}/{node['class_type']}"] = node["inputs"]["cfg"]
    assert {"selma_stage2_render/SelmaRenderDataset", "selma_stage6_evaluate/SelmaEvaluate"} <= set(seen), seen
    assert set(seen.values()) == {cfg}, seen


def test_world_loras_train_with_world_sds_noise_offset():
    """world-sd learnt with a noise offset; every place that trains a LoRA on it by default uses the same one."""
    from selma_backend.demo import WORLD
    from selma_backend.world.reproduce import ReproduceConfig
    from selma_backend.world.sd_train import SdTrainConfig

    offset = SdTrainConfig().noise_offset
    assert offset > 0 and ReproduceConfig().noise_offset == WORLD["noise_offset"] == offset
    folder = Path(__file__).resolve().parents[1] / "workflows" / "api"
    seen = {f"{path.stem}/{key}": node["inputs"]["noise_offset"]
            for path in folder.glob("*.json") for key, node in json.loads(path.read_text()).items()
            if node["class_type"] == "SelmaTrainExperts"}
    assert {k.split("/")[0] for k in seen} == {"selma_stage4_train", "selma_full_pipeline"}, seen
    assert set(seen.values()) == {offset}, seen
