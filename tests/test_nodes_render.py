"""Stage 2 nodes inside a live ComfyUI: load (diffusers folder and single file), render a dataset,
Cancel keeps finished images, the native path appends ComfyUI's own renders, and ComfyUI's own
dataset loader reads the result."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from harness.comfy import collect_events

from selma_backend.fsio import read_jsonl

pytestmark = pytest.mark.comfy

LOAD = {"dtype": "auto", "device": "auto", "prediction_type": "auto", "vae_slicing": False, "vae_tiling": False,
        "allow_pickle": False}


def render_graph(checkpoint="diffusers/selma-tiny-sd1", count=4, k=2, steps=2, project="r", dataset_name="", seed=0):
    return {
        "1": {"class_type": "SelmaSkill", "inputs": {"skill_id": "countbench"}},
        "2": {"class_type": "SelmaGeneratePrompts", "inputs": {
            "skill": ["1", 0], "count": count, "seed": 0, "project": project, "dedup_threshold": 0.8,
            "examples_per_request": 3, "batch_size": 20, "blocklist": ""}},
        "3": {"class_type": "SelmaLoadModel", "inputs": {"checkpoint": checkpoint, **LOAD}},
        "4": {"class_type": "SelmaRenderDataset", "inputs": {
            "model": ["3", 0], "prompts": ["2", 0], "dataset_name": dataset_name, "images_per_prompt": k,
            "batch_size": 3, "steps": steps, "cfg": 5.0, "width": 64, "height": 64, "scheduler": "euler",
            "negative": "", "seed": seed}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 1]}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
    }


def _dataset(server, project, name="countbench-seed0") -> Path:
    return server.base_dir / "output" / "selma" / project / "datasets" / name


def test_render_from_a_diffusers_folder_writes_the_dataset(comfy_server):
    entry = comfy_server.run(render_graph(project="r1"))
    d = _dataset(comfy_server, "r1")
    rows = read_jsonl(d / "metadata.jsonl")
    assert len(rows) == 8 and {(r["prompt_id"], r["sample"]) for r in rows} == {
        (f"countbench-{i:06d}", s) for i in range(4) for s in range(2)}
    for r in rows:
        assert (d / r["file_name"]).is_file()
        assert (d / r["file_name"]).with_suffix(".txt").read_text().strip() == r["text"]
    info = json.loads((d / "dataset.json").read_text())
    assert "complete: 8 rendered" in entry["outputs"]["6"]["text"][0]
    assert len(entry["outputs"]["5"]["images"]) == 8 and json.dumps(info)
    # A second, identical render into the same folder renders nothing and still previews the dataset.
    again = render_graph(project="r1")
    again["4"]["inputs"]["batch_size"] = 2  # not cached by ComfyUI: an input changed
    entry = comfy_server.run(again)
    assert "complete: 0 rendered, 8 already there" in entry["outputs"]["6"]["text"][0]
    assert len(entry["outputs"]["5"]["images"]) == 8


def test_render_from_the_single_file_checkpoint(comfy_server):
    entry = comfy_server.run(render_graph(checkpoint="selma-mini-sd15.safetensors", count=1, k=1, steps=1,
                                          project="r2"))
    assert "selma-mini-sd15.safetensors: sd1, epsilon" in entry["outputs"]["3"]["text"][0]
    assert len(read_jsonl(_dataset(comfy_server, "r2") / "metadata.jsonl")) == 1


def test_cancel_keeps_every_finished_image_and_a_rerun_completes(comfy_server):
    graph = render_graph(count=12, k=1, steps=12, project="r3")
    ws = comfy_server.listen()

    def on_event(event):
        if event["type"] == "progress" and event["data"].get("node") == "4" and event["data"]["value"] >= 3:
            if not getattr(on_event, "sent", False):
                on_event.sent = True
                threading.Thread(target=comfy_server.post_json, args=("/interrupt", {})).start()

    try:
        events = collect_events(ws, comfy_server.queue(graph), on_event)
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_interrupted"
    d = _dataset(comfy_server, "r3")
    kept = read_jsonl(d / "metadata.jsonl")
    assert 3 <= len(kept) < 12
    mtimes = {r["file_name"]: (d / r["file_name"]).stat().st_mtime_ns for r in kept}
    comfy_server.run(graph)
    rows = read_jsonl(d / "metadata.jsonl")
    assert len(rows) == 12 and len({r["file_name"] for r in rows}) == 12
    assert all((d / f).stat().st_mtime_ns == m for f, m in mtimes.items())  # nothing finished was redone


def test_checkpoint_must_be_one_the_dropdown_lists(comfy_server):
    pid = comfy_server.queue(render_graph(checkpoint="diffusers/../../../tmp"))  # not in the list: refused
    with pytest.raises(AssertionError, match="checkpoint"):
        comfy_server.wait(pid)


@pytest.mark.parametrize("name", ["../escape", "/tmp/escape", "a/../../escape"])
def test_dataset_name_cannot_escape_the_output_folder(comfy_server, name):
    with pytest.raises(AssertionError, match="dataset: got"):
        comfy_server.run(render_graph(count=1, k=1, steps=1, project="r4", dataset_name=name))


def test_dataset_name_through_a_symlink_out_of_output_is_refused(comfy_server, tmp_path):
    link = comfy_server.base_dir / "output" / "selma" / "elsewhere"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(tmp_path)
    try:
        with pytest.raises(AssertionError, match="outside"):
            comfy_server.run(render_graph(count=1, k=1, steps=1, project="r5", dataset_name="elsewhere/data"))
        assert list(tmp_path.iterdir()) == []
    finally:
        link.unlink()


def native_graph(prompt: str, dataset_name: str, seed: int = 3) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "selma-mini-sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": prompt}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": 1, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SelmaSkill", "inputs": {"skill_id": "product"}},
        "8": {"class_type": "SelmaAppendToDataset", "inputs": {"images": ["6", 0], "prompt": prompt,
                                                                "skill": ["7", 0], "dataset_name": dataset_name}},
    }


def test_native_renders_append_to_a_dataset_that_comfyuis_loader_reads(comfy_server):
    prompt = "a ceramic mug on a white background"
    comfy_server.run(native_graph(prompt, "native/mugs"))
    comfy_server.run(native_graph(prompt, "native/mugs", seed=4))  # two more images, same prompt
    d = comfy_server.base_dir / "output" / "selma" / "native" / "mugs"
    rows = read_jsonl(d / "metadata.jsonl")
    assert len(rows) == 4 and {r["text"] for r in rows} == {prompt} and {r["skill"] for r in rows} == {"product"}
    assert sorted(r["sample"] for r in rows) == [0, 1, 2, 3]
    # ComfyUI's own dataset node reads folders under input/: link the dataset there, as a user would.
    (comfy_server.base_dir / "input" / "selma-mugs").symlink_to(d)
    entry = comfy_server.run({
        "1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": "selma-mugs"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}},
    })
    texts = entry["outputs"]["2"]["text"]
    assert len(texts) == 4 and set(texts) == {prompt}
