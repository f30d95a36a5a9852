"""Stage 5 nodes in a live ComfyUI: merge experts from models/loras (and from a SELMA_LORAS wire) into
models/loras/selma/, apply the merge to the mini SD1.5 MODEL/CLIP through ComfyUI's own patching, and the
format bridge (keys matched, exact conversion)."""

from __future__ import annotations

import pytest
import torch
from merge_helpers import mini_experts, module_delta

from selma_backend.lora import load_lora, provenance, read_lora

pytestmark = pytest.mark.comfy

CKPT = "selma-mini-sd15.safetensors"
NAMES = [f"selma-test/x{i}.safetensors" for i in range(3)]


@pytest.fixture(scope="module")
def experts(comfy_server, tiny_models):
    folder = comfy_server.base_dir / "models" / "loras" / "selma-test"
    folder.mkdir(parents=True, exist_ok=True)
    return mini_experts(tiny_models["mini-sd15"], folder)


def merge_node(lora_names: str, name: str, method: str = "linear", weights: str = "", rank: int = 0,
               experts=None) -> dict:
    inputs = {"lora_names": lora_names, "method": method, "weights": weights, "rank": rank, "density": 0.5,
              "block_weights": "", "seed": 0, "name": name}
    if experts is not None:
        inputs["experts"] = experts
    return {"class_type": "SelmaMergeExperts", "inputs": inputs}


def _text(entry: dict, node: str) -> str:
    return entry["outputs"][node]["text"][0]


def test_merge_chain_apply_and_bridge_in_one_graph(comfy_server, experts):
    files, targets = experts
    loras = comfy_server.base_dir / "models" / "loras"
    graph = {
        "1": merge_node("\n".join(NAMES[:2]), "t-merged", weights="0.5, 0.5"),
        # the first merge's file arrives over the SELMA_LORAS wire and follows x2
        "2": merge_node(NAMES[2], "t-chain", method="svd", rank=8, experts=["1", 2]),
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "4": {"class_type": "SelmaApplyExperts", "inputs": {
            "model": ["3", 0], "clip": ["3", 1], "lora_names": NAMES[2], "strength_model": 1.0, "strength_clip": 1.0,
            "strengths": "1, 0.5", "lora_name": ["1", 0]}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 2]}},
        "6": {"class_type": "SelmaLoraBridge", "inputs": {
            "lora_name": NAMES[0], "model": ["3", 0], "clip": ["3", 1], "convert_to": "peft", "base": "auto",
            "out_name": ""}},
        "7": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}},  # the patched MODEL is produced
    }
    entry = comfy_server.run(graph)
    merged = loras / "selma" / "t-merged.safetensors"
    assert "linear merge of 2 experts" in _text(entry, "1") and merged.is_file()
    assert entry["outputs"]["1"]["text"][0].count("sha256") == 2
    # linear, equal weights 0.5: the merged file is exactly 0.5 dW_0 + 0.5 dW_1 (float32 storage)
    a, b, m = (load_lora(p)[0] for p in (files[0], files[1], merged))
    for module in list(targets)[:5]:
        want = 0.5 * module_delta(a, module) + 0.5 * module_delta(b, module)
        assert float((module_delta(m, module) - want).norm() / want.norm()) <= 1e-6  # tol: fp32 rounding
    chain = provenance(load_lora(loras / "selma" / "t-chain.safetensors")[1])
    assert [s["file"] for s in chain["sources"]] == ["x2.safetensors", "t-merged.safetensors"]
    assert chain["rank"] == 8 and chain["config"]["method"] == "svd"
    n = len(load_lora(merged)[0])
    applied = _text(entry, "5")
    assert f"t-merged.safetensors x0.5: {n} of {n} keys matched" in applied, applied
    assert f"x2.safetensors x1: {len(load_lora(files[2])[0])} of" in applied
    bridge = _text(entry, "6")
    total = len(load_lora(files[0])[0])
    assert bridge.startswith(f"{total} of {total} keys matched"), bridge
    converted = loras / "selma" / "x0_peft.safetensors"
    assert "converted to peft: selma/x0_peft.safetensors" in bridge and read_lora(converted).layout == "peft"
    back = read_lora(converted).kohya
    assert all(torch.equal(back[k], v) for k, v in load_lora(files[0])[0].items() if not k.endswith(".alpha"))


def test_bridge_counts_what_comfyui_would_not_load(comfy_server, experts):
    """ComfyUI 0.3.75 matches diffusers' UNet attention names only in their old '.processor.' form: the bridge
    reports the PEFT layout's UNet keys as not loaded before sampling, and converting back fixes it."""
    graph = {"3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
             "6": {"class_type": "SelmaLoraBridge", "inputs": {
                 "lora_name": NAMES[1], "model": ["3", 0], "clip": ["3", 1], "convert_to": "peft", "base": "auto",
                 "out_name": "x1-as-peft"}}}
    comfy_server.run(graph)
    graph["6"]["inputs"].update(lora_name="selma/x1-as-peft.safetensors", convert_to="kohya", out_name="x1-back")
    entry = comfy_server.run(graph)
    report = _text(entry, "6")
    first = report.splitlines()[0]
    matched, total = (int(x) for x in first.split(" keys matched")[0].split(" of "))
    assert 0 < matched < total and "peft layout" in first and "convert this file to the kohya layout" in report
    graph["6"]["inputs"].update(lora_name="selma/x1-back.safetensors", convert_to="none")
    entry = comfy_server.run(graph)
    n = len(load_lora(experts[0][1])[0])  # kohya: down, up and alpha of each module (PEFT: no alpha tensors)
    assert _text(entry, "6").startswith(f"{n} of {n} keys matched")
    graph["6"]["inputs"].update(lora_name=NAMES[1], convert_to="comfy", out_name="x1-comfy")  # ComfyUI-native names
    comfy_server.run(graph)
    graph["6"]["inputs"].update(lora_name="selma/x1-comfy.safetensors", convert_to="none")
    report = _text(comfy_server.run(graph), "6")
    assert report.startswith(f"{n} of {n} keys matched") and "comfy layout" in report


def test_existing_name_gets_a_number_and_names_must_be_listed(comfy_server, experts):
    loras = comfy_server.base_dir / "models" / "loras" / "selma"
    for weights in ("0.7, 0.3", "0.6, 0.4"):  # different inputs: ComfyUI runs the node again
        entry = comfy_server.run({"1": merge_node("\n".join(NAMES[:2]), "t-num", weights=weights)})
    assert (loras / "t-num.safetensors").is_file() and (loras / "t-num_0001.safetensors").is_file()
    assert provenance(load_lora(loras / "t-num_0001.safetensors")[1])["weights"] == [0.6, 0.4]
    assert "t-num_0001.safetensors" in _text(entry, "1")
    for bad in ("../../checkpoints/selma-mini-sd15.safetensors", "/etc/passwd"):
        with pytest.raises(AssertionError, match="lora_names: got"):
            comfy_server.run({"1": merge_node(bad, "t-bad")})
    with pytest.raises(AssertionError, match="name: got"):
        comfy_server.run({"1": merge_node(NAMES[0], "../escape")})
    assert not (comfy_server.base_dir / "models" / "loras" / "escape.safetensors").exists()


def test_a_name_taken_by_a_symlink_gets_a_number_and_the_link_target_is_untouched(comfy_server, experts, tmp_path):
    """A LoRA the user linked into models/loras/selma/ under the merge's name: skipped, never followed."""
    loras = comfy_server.base_dir / "models" / "loras" / "selma"
    loras.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "kept.safetensors"
    outside.write_bytes(b"the user's own file")
    (loras / "t-link.safetensors").symlink_to(outside)
    entry = comfy_server.run({"1": merge_node("\n".join(NAMES[:2]), "t-link", weights="0.5, 0.5")})
    assert "t-link_0001.safetensors" in _text(entry, "1")
    assert (loras / "t-link_0001.safetensors").is_file() and not (loras / "t-link_0001.safetensors").is_symlink()
    assert outside.read_bytes() == b"the user's own file"
