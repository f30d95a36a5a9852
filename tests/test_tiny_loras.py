"""``write_tiny_loras``: kohya-layout experts for the mini SD 1.5 checkpoint and their exact merge, the
files the stage-5 and apply-experts workflows read in the test ComfyUI (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from merge_helpers import module_delta

from selma_backend.errors import SelmaError
from selma_backend.lora import detect_layout, kohya_metadata, load_lora, provenance, save_lora
from selma_backend.tiny.loras import RANK, expert_tensors, mini_arch
from selma_backend.tiny_models import write_tiny_loras

NAMES = {"lora-countbench": "selma/experts/countbench.safetensors", "lora-spatial": "selma/experts/spatial.safetensors",
         "lora-merged": "selma/merged.safetensors"}


def test_experts_and_their_merge_under_the_names_selma_writes(tmp_path):
    paths = write_tiny_loras(tmp_path, seed=0)
    assert {k: p.relative_to(tmp_path).as_posix() for k, p in paths.items()} == NAMES
    (a, meta_a), (b, _), (merged, meta_m) = (load_lora(paths[k]) for k in NAMES)
    assert detect_layout(a) == detect_layout(merged) == "kohya"
    assert meta_a["ss_base_model_version"] == "sd_v1" and meta_a["ss_network_dim"] == str(RANK)
    assert provenance(meta_a)["skill"] == "countbench" and provenance(meta_m)["config"]["method"] == "linear"
    modules = {k.removesuffix(".lora_down.weight") for k in a if k.endswith(".lora_down.weight")}
    assert len(modules) == 32 and all(m.startswith("lora_unet_") and "_attn" in m for m in modules)
    for m in modules:  # the merge is exactly the mean of the two experts' weight changes
        want = (module_delta(a, m) + module_delta(b, m)) / 2
        assert torch.allclose(module_delta(merged, m), want, atol=1e-6, rtol=1e-4), m
        assert not torch.allclose(module_delta(a, m), module_delta(b, m))


def test_a_function_of_the_seed_kept_when_present(tmp_path):
    first = write_tiny_loras(tmp_path / "a", seed=0)
    again = write_tiny_loras(tmp_path / "b", seed=0)
    other = write_tiny_loras(tmp_path / "c", seed=1)
    key = next(k for k in load_lora(first["lora-spatial"])[0] if k.endswith(".lora_up.weight"))
    assert torch.equal(load_lora(first["lora-spatial"])[0][key], load_lora(again["lora-spatial"])[0][key])
    assert not torch.equal(load_lora(first["lora-spatial"])[0][key], load_lora(other["lora-spatial"])[0][key])
    stamps = {k: p.stat().st_mtime_ns for k, p in first.items()}
    write_tiny_loras(tmp_path / "a", seed=0)
    assert {k: p.stat().st_mtime_ns for k, p in first.items()} == stamps
    with pytest.raises(SelmaError, match="another seed"):
        write_tiny_loras(tmp_path / "a", seed=1)
    write_tiny_loras(tmp_path / "a", seed=1, force=True)
    assert provenance(load_lora(first["lora-countbench"])[1])["seed"] == 1


@pytest.mark.parametrize("which", ["lora-spatial", "lora-merged"])
def test_a_file_it_did_not_write_is_left_alone(tmp_path, which):
    path = tmp_path / NAMES[which]
    path.parent.mkdir(parents=True)
    save_lora(path, expert_tensors(7), kohya_metadata(arch=mini_arch(), rank=RANK, alpha=1.0))
    before = path.read_bytes()
    for force in (False, True):
        with pytest.raises(SelmaError, match="left alone"):
            write_tiny_loras(tmp_path, seed=0, force=force)
    assert path.read_bytes() == before


@pytest.mark.comfy
def test_comfyui_loads_every_key_onto_the_mini_checkpoint(comfy_server):
    """Installed in the test ComfyUI (conftest TINY_LORA_INSTALL), each file patches the mini SD 1.5
    checkpoint through ComfyUI's own LoRA loader with no key left over."""
    names = [NAMES[k] for k in NAMES]
    log_start = len(comfy_server.log_tail(100_000).splitlines())
    out = comfy_server.run({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "selma-mini-sd15.safetensors"}},
        "2": {"class_type": "SelmaApplyExperts", "inputs": {"model": ["1", 0], "clip": ["1", 1],
              "lora_names": "\n".join(names), "strength_model": 1.0, "strength_clip": 1.0, "strengths": ""}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}},
    })["outputs"]["3"]["text"][0]
    lines = [line for line in out.splitlines() if " keys matched" in line]
    assert len(lines) == 3 and all(": 96 of 96 keys matched (32 of 32 modules" in line for line in lines), out
    new_log = "\n".join(comfy_server.log_tail(100_000).splitlines()[log_start:])
    assert "lora key not loaded" not in new_log.lower()
