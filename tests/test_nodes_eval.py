"""SELMA Evaluate in a live ComfyUI: a random LoRA placed in models/loras, held-out prompts written for the
training prompts' skill, the grid shown on the node, the table and the report path, progress events, a new
folder per run, and a prompts file that must stay inside the input folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import random_lora
from harness.comfy import collect_events

pytestmark = pytest.mark.comfy

LOAD = {"dtype": "auto", "device": "auto", "prediction_type": "auto", "vae_slicing": False, "vae_tiling": False,
        "allow_pickle": False}
LORA = "selma-eval-test/countbench-expert.safetensors"


def eval_graph(seed: int = 0, heldout: int = 2, prompts_file: str = "", lora: str = LORA) -> dict:
    inputs = {"model": ["3", 0], "clip": ["4", 0], "lora_1": lora, "lora_2": "(none)", "lora_3": "(none)",
              "prompts_file": prompts_file, "heldout_count": heldout, "heldout_seed": 1000, "max_per_skill": 0,
              "steps": 2, "cfg": 7.5, "width": 64, "height": 64, "scheduler": "euler", "seed": seed, "samples": 1,
              "batch_size": 4, "vqa_url": "", "vqa_model": "", "report_name": "nodetest"}
    if heldout:
        inputs["train_prompts"] = ["2", 0]
    return {
        "1": {"class_type": "SelmaSkill", "inputs": {"skill_id": "countbench"}},
        "2": {"class_type": "SelmaGeneratePrompts", "inputs": {
            "skill": ["1", 0], "count": 6, "seed": 0, "project": "ev", "dedup_threshold": 0.8,
            "examples_per_request": 3, "batch_size": 20, "blocklist": ""}},
        "3": {"class_type": "SelmaLoadModel", "inputs": {"checkpoint": "diffusers/selma-tiny-sd1", **LOAD}},
        "4": {"class_type": "SelmaLoadClip", "inputs": {"clip_model": "selma-tiny-clip", "arch": "", "device": "auto",
                                                       "dtype": "auto", "batch_size": 64}},
        "5": {"class_type": "SelmaEvaluate", "inputs": inputs},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}},
    }


@pytest.fixture(scope="module")
def lora(comfy_server, tiny_models) -> Path:
    path = comfy_server.base_dir / "models" / "loras" / LORA
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        random_lora(tiny_models["sd1"], path, seed=1, provenance={"skill": "countbench"})
    return path


def test_evaluate_node_writes_a_report_and_shows_the_grid(comfy_server, lora):
    ws = comfy_server.listen()
    try:
        events = collect_events(ws, comfy_server.queue(eval_graph(seed=1)))
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_success", events[-1]
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("node") == "5"]
    # 2 held-out prompts x 2 models: 4 renders + 4 CLIP scores
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 8
    entry = comfy_server.get_json("/history")[events[-1]["data"]["prompt_id"]]
    out = entry["outputs"]
    report = Path(out["7"]["text"][0])
    assert report.parent == comfy_server.base_dir / "output" / "selma" / "eval" and report.name.startswith("nodetest")
    scores = json.loads((report / "scores.json").read_text())
    assert [m["kind"] for m in scores["models"]] == ["base", "expert"]
    assert scores["models"][1]["path"] == str(lora.resolve()) and scores["skills"] == ["countbench"]
    assert all(p["source"] == "heldout:offline" for p in scores["prompts"]) and len(scores["prompts"]) == 2
    table = out["6"]["text"][0]
    assert "difference to base" in table and "countbench-expert" in table
    shown = out["5"]["images"]  # the grid, on the node itself
    assert len(shown) == 1 and shown[0]["type"] == "temp"
    with comfy_server.request("GET", f"/view?filename={shown[0]['filename']}&type=temp") as r:
        assert r.read()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "index.html").is_file() and (report / "grid.png").is_file()
    # The same graph with another seed: a new folder, the first report untouched.
    again = comfy_server.run(eval_graph(seed=2))
    second = Path(again["outputs"]["7"]["text"][0])
    assert second != report and second.parent == report.parent
    assert json.loads((report / "scores.json").read_text())["config"]["render"]["seed"] == 1


def test_evaluate_node_reads_a_prompts_file_from_the_input_folder(comfy_server, lora):
    csv = comfy_server.base_dir / "input" / "selma-eval-prompts.csv"
    csv.write_text("id,caption,category\nq1,a red apple,fruit\nq2,two blue cups,kitchen\n")
    entry = comfy_server.run(eval_graph(seed=3, heldout=0, prompts_file="selma-eval-prompts.csv", lora="(none)"))
    scores = json.loads((Path(entry["outputs"]["7"]["text"][0]) / "scores.json").read_text())
    assert scores["skills"] == ["fruit", "kitchen"] and [m["key"] for m in scores["models"]] == ["base"]


@pytest.mark.parametrize("name", ["../escape.csv", "/etc/passwd"])
def test_the_prompts_file_cannot_escape_the_input_folder(comfy_server, name):
    with pytest.raises(AssertionError, match="prompts_file: got"):
        comfy_server.run(eval_graph(seed=4, heldout=0, prompts_file=name, lora="(none)"))


def test_heldout_prompts_need_the_training_prompts(comfy_server):
    graph = eval_graph(seed=5, heldout=2, lora="(none)")
    del graph["5"]["inputs"]["train_prompts"]
    with pytest.raises(AssertionError, match="heldout_count: got 2"):
        comfy_server.run(graph)
