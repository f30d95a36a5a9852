"""Stage 4 in a live ComfyUI: the training node on the mini SD1.5 checkpoint, its expert loaded by
ComfyUI's own Load LoRA with every key matched, the live loss events, Cancel writing a checkpoint."""

from __future__ import annotations

import pytest
from harness.comfy import collect_events

from selma_backend.lora.format import load_lora, provenance

pytestmark = pytest.mark.comfy
CKPT = "selma-mini-sd15.safetensors"


def _graph(project: str, steps: int, name: str) -> dict:
    return {
        "1": {"class_type": "SelmaSkill", "inputs": {"skill_id": "spatial"}},
        "2": {"class_type": "SelmaGeneratePrompts", "inputs": {"skill": ["1", 0], "count": 3, "seed": 0, "project": project,
                                                                "dedup_threshold": 0.8, "examples_per_request": 3,
                                                                "batch_size": 20, "blocklist": ""}},
        "3": {"class_type": "SelmaLoadModel", "inputs": {"checkpoint": CKPT, "dtype": "auto", "device": "auto",
                                                          "prediction_type": "auto", "vae_slicing": False,
                                                          "vae_tiling": False, "allow_pickle": False}},
        "4": {"class_type": "SelmaRenderDataset", "inputs": {"model": ["3", 0], "prompts": ["2", 0], "dataset_name": "",
                                                              "images_per_prompt": 1, "batch_size": 3, "steps": 2,
                                                              "cfg": 5.0, "width": 64, "height": 64,
                                                              "scheduler": "euler", "negative": "", "seed": 0}},
        "5": {"class_type": "SelmaTrainExperts", "inputs": {
            "model": ["3", 0], "dataset": ["4", 0], "name": name, "steps": steps, "rank": 4, "alpha": 4.0,
            "learning_rate": 1e-3, "batch_size": 2, "grad_accum": 1, "resolution": 64, "preset": "selma",
            "text_encoder_lora": False, "lr_schedule": "constant", "warmup_steps": 0, "min_snr_gamma": 5.0,
            "noise_offset": 0.0, "flip": "skill", "score_weighting": "none", "mixed_precision": "auto",
            "gradient_checkpointing": False, "checkpoint_every": 1, "validation_every": 0, "validation_prompts": "",
            "seed": 0, "resume": True, "overwrite": False}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["5", 1]}},
    }


def _use_lora(lora_name: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name,
                                                     "strength_model": 1.0, "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a cube left of a ball"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 0, "steps": 1, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "selma-lora-check"}},
    }


def test_train_node_writes_an_expert_that_comfyui_loads_with_every_key(comfy_server):
    ws = comfy_server.listen()
    try:
        pid = comfy_server.queue(_graph("t1", 3, "t1"))
        events = collect_events(ws, pid)
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_success", events[-1]
    train = [e["data"] for e in events if e["type"] == "selma.train"]
    assert [e["step"] for e in train] == [1, 2, 3] and all(e["loss"] > 0 for e in train)
    entry = comfy_server.wait(pid)
    name = entry["outputs"]["7"]["text"][0]
    assert name == "selma/t1/spatial.safetensors"
    path = comfy_server.base_dir / "models" / "loras" / name
    tensors, meta = load_lora(path)
    assert provenance(meta)["steps"] == 3 and provenance(meta)["base_model"] == CKPT
    assert entry["outputs"]["6"]["images"]  # the loss plot, shown in the editor
    work = comfy_server.base_dir / "output" / "selma" / "train" / "t1" / "spatial"
    assert (work / "loss.csv").is_file() and (work / "checkpoints" / "step-000003").is_dir()

    before = len(comfy_server.log_tail(100000).splitlines())
    comfy_server.run(_use_lora(name))
    log = "\n".join(comfy_server.log_tail(100000).splitlines()[before:])
    assert "lora key not loaded" not in log.lower(), log[-3000:]
    assert list((comfy_server.base_dir / "output").glob("selma-lora-check*.latent"))


def test_train_node_refuses_to_overwrite_and_cancel_writes_a_checkpoint(comfy_server):
    with pytest.raises(AssertionError, match="never overwritten silently"):
        g = _graph("t1", 3, "t1")
        g["5"]["inputs"].update(resume=False, seed=1)  # another seed: not cached, really runs
        comfy_server.run(g)
    ws = comfy_server.listen()
    try:
        pid = comfy_server.queue(_graph("t2", 400, "t2"))

        def interrupt_on_first_step(event: dict) -> None:
            if event["type"] == "selma.train" and event["data"]["step"] == 2:
                with comfy_server.request("POST", "/interrupt", {}) as r:
                    r.read()

        events = collect_events(ws, pid, interrupt_on_first_step)
    finally:
        ws.close()
    assert events[-1]["type"] == "execution_interrupted"
    work = comfy_server.base_dir / "output" / "selma" / "train" / "t2" / "spatial" / "checkpoints"
    assert any(p.name.startswith("step-") for p in work.iterdir())
    assert not (comfy_server.base_dir / "models" / "loras" / "selma" / "t2" / "spatial.safetensors").exists()
