"""Write the bundled workflows (UI format + API-format copy) from compact specs.

usage: python scripts/build_workflows.py OBJECT_INFO.json   (dump of a live server's /object_info)

Each spec lists nodes as (id, class_type, {input: value | (node_id, output_slot)}, (x, y)). Widget
values are laid out in the order the server declares (control_after_generate slots included), so
the UI files always match the node schemas; tests/test_workflows.py checks the result.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness.schema import WIDGET_TYPES, describe  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "workflows"
LOAD = {"dtype": "auto", "device": "auto", "prediction_type": "auto", "vae_slicing": False, "vae_tiling": False,
        "allow_pickle": False}
GEN = {"dedup_threshold": 0.8, "examples_per_request": 3, "batch_size": 20, "blocklist": ""}
RENDER = {"dataset_name": "", "images_per_prompt": 2, "batch_size": 4, "steps": 20, "cfg": 7.5, "width": 0,
          "height": 0, "scheduler": "dpmpp_2m_karras", "negative": "", "seed": 0}
FILTER = {"mode": "top_k_per_prompt", "threshold": 0.28, "keep_fraction": 0.5, "top_k": 1, "floor": -1.0,
          "per_skill": "", "dedup_cosine": 0.97, "min_pixel_std": 2.0}

SPECS = {
    "selma_stage2_render": [
        (1, "SelmaSkill", {"skill_id": "countbench"}, (40, 120)),
        (2, "SelmaGeneratePrompts", {"skill": (1, 0), "count": 20, "seed": 0, "project": "selma", **GEN}, (360, 120)),
        (3, "SelmaLoadModel", {"checkpoint": "diffusers/selma-tiny-sd1", **LOAD}, (40, 480)),
        (4, "SelmaRenderDataset", {"model": (3, 0), "prompts": (2, 0), **RENDER}, (760, 120)),
        (5, "PreviewImage", {"images": (4, 1)}, (1160, 120)),
        (6, "PreviewAny", {"source": (4, 2)}, (1160, 460)),
    ],
    "selma_stage3_filter_review": [
        (1, "SelmaSkill", {"skill_id": "countbench"}, (40, 120)),
        (2, "SelmaGeneratePrompts", {"skill": (1, 0), "count": 8, "seed": 0, "project": "selma", **GEN}, (360, 120)),
        (3, "SelmaLoadModel", {"checkpoint": "diffusers/selma-tiny-sd1", **LOAD}, (40, 480)),
        (4, "SelmaRenderDataset", {"model": (3, 0), "prompts": (2, 0), **RENDER}, (760, 120)),
        (5, "SelmaLoadClip", {"clip_model": "selma-tiny-clip", "arch": "", "device": "auto", "dtype": "auto",
                              "batch_size": 64}, (760, 640)),
        (6, "SelmaFilterDataset", {"dataset": (4, 0), "clip": (5, 0), **FILTER}, (1160, 120)),
        (7, "SelmaReviewDataset", {"dataset": (6, 0)}, (1560, 120)),
        (8, "PreviewAny", {"source": (6, 1)}, (1160, 560)),
    ],
    "selma_native_render": [
        (1, "CheckpointLoaderSimple", {"ckpt_name": "selma-mini-sd15.safetensors"}, (40, 120)),
        (2, "PrimitiveStringMultiline", {"value": "two ceramic mugs on a white background, product photo"}, (40, 360)),
        (3, "CLIPTextEncode", {"clip": (1, 1), "text": (2, 0)}, (420, 120)),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": "blurry, watermark"}, (420, 380)),
        (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 2}, (420, 620)),
        (6, "KSampler", {"model": (1, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0), "seed": 0,
                         "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
         (820, 120)),
        (7, "VAEDecode", {"samples": (6, 0), "vae": (1, 2)}, (1180, 120)),
        (8, "SelmaSkill", {"skill_id": "product"}, (1180, 320)),
        (9, "SelmaAppendToDataset", {"images": (7, 0), "prompt": (2, 0), "skill": (8, 0),
                                     "dataset_name": "native/product"}, (1480, 120)),
    ],
}


def build(name: str, spec: list, info: dict) -> tuple[dict, dict]:
    nodes, links, api = [], [], {}
    outputs_links: dict[tuple[int, int], list[int]] = {}
    for nid, cls, inputs, pos in spec:
        desc = describe(info[cls])
        ui_inputs, widgets = [], []
        for item in desc["inputs"]:
            name = item["name"]
            if name not in inputs:
                continue
            value = inputs[name]
            linked = isinstance(value, tuple)
            is_widget = item["type"] in WIDGET_TYPES and not item.get("force_input")
            if linked:
                link_id = len(links) + 1
                src, slot = value
                links.append([link_id, src, slot, nid, len(ui_inputs), info[cls]["input"][item["section"]][name][0]
                              if not is_widget else item["type"]])
                outputs_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": links[-1][5], "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name}
                ui_inputs.append(entry)
            if is_widget:
                widgets.append(None if linked else value)
                if item.get("control_after_generate"):
                    widgets.append("fixed")
        api[str(nid)] = {"class_type": cls, "inputs": {k: ([str(v[0]), v[1]] if isinstance(v, tuple) else v)
                                                        for k, v in inputs.items()},
                         "_meta": {"title": info[cls]["display_name"]}}
        nodes.append({"id": nid, "type": cls, "pos": list(pos), "size": [340, 200], "flags": {}, "order": len(nodes),
                      "mode": 0, "inputs": ui_inputs, "outputs": [], "properties": {"Node name for S&R": cls},
                      "widgets_values": widgets})
    for node, (nid, cls, _inputs, _pos) in zip(nodes, spec, strict=True):
        node["outputs"] = [{"name": n, "type": t, "links": outputs_links.get((nid, i)) or None,
                            **({"shape": 6} if lst else {})}
                           for i, (n, t, lst) in enumerate(zip(info[cls]["output_name"], info[cls]["output"],
                                                                info[cls]["output_is_list"], strict=True))]
    ui = {"id": f"5e17a000-0000-4000-8000-{hashlib.sha256(name.encode()).hexdigest()[:12]}", "revision": 0,
          "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
          "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
    return ui, api


def main(object_info: str) -> None:
    info = json.loads(Path(object_info).read_text())
    for name, spec in SPECS.items():
        ui, api = build(name, spec, info)
        (OUT / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        (OUT / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main(sys.argv[1])
