"""Stages 4 -> 5 -> 6 wired together in a live ComfyUI: two experts trained in one node, merged through
the ``experts`` wire, and the merge evaluated through the ``loras`` wire -- the way a workflow chains them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selma_backend.lora.format import load_lora, provenance

pytestmark = pytest.mark.comfy
LOAD = {"dtype": "auto", "device": "auto", "prediction_type": "auto", "vae_slicing": False, "vae_tiling": False,
        "allow_pickle": False}


def _skill_data(first: int, skill: str) -> dict:
    a, b, c = (str(first + k) for k in range(3))
    return {
        a: {"class_type": "SelmaSkill", "inputs": {"skill_id": skill}},
        b: {"class_type": "SelmaGeneratePrompts", "inputs": {"skill": [a, 0], "count": 3, "seed": 0, "project": "chain",
                                                             "dedup_threshold": 0.8, "examples_per_request": 3,
                                                             "batch_size": 20, "blocklist": ""}},
        c: {"class_type": "SelmaRenderDataset", "inputs": {"model": ["1", 0], "prompts": [b, 0], "dataset_name": "",
                                                           "images_per_prompt": 1, "batch_size": 3, "steps": 2,
                                                           "cfg": 5.0, "width": 64, "height": 64, "scheduler": "euler",
                                                           "negative": "", "seed": 0}},
    }


def _graph() -> dict:
    train = {"model": ["1", 0], "dataset": ["12", 0], "dataset_2": ["22", 0], "name": "chain", "steps": 2, "rank": 4,
             "alpha": 4.0, "learning_rate": 1e-3, "batch_size": 2, "grad_accum": 1, "resolution": 64, "preset": "selma",
             "text_encoder_lora": False, "lr_schedule": "constant", "warmup_steps": 0, "min_snr_gamma": 0.0,
             "noise_offset": 0.0, "flip": "skill", "score_weighting": "none", "mixed_precision": "auto",
             "gradient_checkpointing": False, "checkpoint_every": 10, "validation_every": 0, "validation_prompts": "",
             "seed": 0, "resume": True, "overwrite": False}
    merge = {"lora_names": "", "method": "linear", "weights": "", "rank": 0, "density": 0.5, "block_weights": "",
             "seed": 0, "name": "chain-merged", "experts": ["30", 0]}
    evaluate = {"model": ["1", 0], "clip": ["32", 0], "lora_1": "(none)", "lora_2": "(none)", "lora_3": "(none)",
                "prompts_file": "", "heldout_count": 2, "heldout_seed": 1000, "max_per_skill": 0, "steps": 2, "cfg": 5.0,
                "width": 64, "height": 64, "scheduler": "euler", "seed": 0, "samples": 1, "batch_size": 4,
                "vqa_url": "", "vqa_model": "", "report_name": "chain", "train_prompts": ["11", 0], "loras": ["31", 2]}
    return {
        "1": {"class_type": "SelmaLoadModel", "inputs": {"checkpoint": "diffusers/selma-tiny-sd1", **LOAD}},
        **_skill_data(10, "countbench"),
        **_skill_data(20, "spatial"),
        "30": {"class_type": "SelmaTrainExperts", "inputs": train},
        "31": {"class_type": "SelmaMergeExperts", "inputs": merge},
        "32": {"class_type": "SelmaLoadClip", "inputs": {"clip_model": "selma-tiny-clip", "arch": "", "device": "auto",
                                                        "dtype": "auto", "batch_size": 64}},
        "33": {"class_type": "SelmaEvaluate", "inputs": evaluate},
        "34": {"class_type": "PreviewAny", "inputs": {"source": ["30", 1]}},
        "35": {"class_type": "PreviewAny", "inputs": {"source": ["31", 0]}},
        "36": {"class_type": "PreviewAny", "inputs": {"source": ["33", 2]}},
    }


def test_train_merge_evaluate_chain_through_the_wires(comfy_server):
    out = comfy_server.run(_graph(), timeout=600)["outputs"]
    loras = comfy_server.base_dir / "models" / "loras"
    assert out["34"]["text"][0].splitlines() == ["selma/chain/countbench.safetensors", "selma/chain/spatial.safetensors"]
    merged_name = out["35"]["text"][0]
    merged = provenance(load_lora(loras / merged_name)[1])
    assert merged["config"]["method"] == "linear"
    assert sorted(Path(s["file"]).name for s in merged["sources"]) == ["countbench.safetensors", "spatial.safetensors"]
    report = Path(out["36"]["text"][0])
    scores = json.loads((report / "scores.json").read_text())
    assert [m["kind"] for m in scores["models"]] == ["base", "merged"]
    assert Path(scores["models"][1]["path"]).name == Path(merged_name).name
