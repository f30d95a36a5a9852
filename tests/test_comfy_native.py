"""ComfyUI's own nodes on the mini SD1.5 fixture: detected as SD15, samples on CPU, and the
websocket streams per-step progress — the floor for native-render and LoRA tests."""

from __future__ import annotations

import pytest
from harness.comfy import collect_events

pytestmark = pytest.mark.comfy

CKPT = "selma-mini-sd15.safetensors"


def sampling_graph(steps: int = 2, seed: int = 1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "two red apples on a table"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "selma-native"}},
    }


def test_mini_sd15_is_listed_and_detected_as_sd15(comfy_server):
    ckpts = comfy_server.get_json("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert CKPT in ckpts
    comfy_server.run(sampling_graph(steps=1, seed=7))
    log = comfy_server.log_tail(400)
    # SD15's signature in ComfyUI: an epsilon model with the SD1 CLIP (SDXL/SD2 load other clips).
    assert "model_type EPS" in log and "Requested to load SD1ClipModel" in log


def test_native_sampling_streams_step_progress_and_saves_an_image(comfy_server):
    ws = comfy_server.listen()
    try:
        prompt_id = comfy_server.queue(sampling_graph(steps=3, seed=11))
        events = collect_events(ws, prompt_id)
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_success", events[-1]
    progress = [(e["data"]["value"], e["data"]["max"]) for e in events if e["type"] == "progress"]
    assert progress[-1] == (3, 3) and len(progress) >= 3
    entry = comfy_server.wait(prompt_id)
    (image,) = entry["outputs"]["7"]["images"]
    assert (comfy_server.base_dir / "output" / image["subfolder"] / image["filename"]).stat().st_size > 0
