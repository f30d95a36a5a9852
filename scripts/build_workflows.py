"""Write the bundled workflows (UI format + API-format copy) from compact specs.

usage: python scripts/build_workflows.py OBJECT_INFO.json   (dump of a live server's /object_info)

Each spec lists nodes as (id, class_type, {input: value | (node_id, output_slot)}, column[, title]).
Nodes are stacked top to bottom in their column (left to right: the stages), sized from their widgets;
GROUPS frames the nodes of each stage. Widget values are laid out in the order the server declares
(control_after_generate slots included), so the UI files always match the node schemas;
tests/test_workflows.py checks the result. Saved values are real-use settings (the paper's recipe where
the nodes default to it); the tests make them tiny with tests/harness/schema.py TINY_SETTINGS.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from harness.schema import WIDGET_TYPES, describe  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "workflows"
LOAD = {"dtype": "auto", "device": "auto", "prediction_type": "auto", "vae_slicing": False, "vae_tiling": False,
        "allow_pickle": False}
GEN = {"dedup_threshold": 0.8, "examples_per_request": 3, "batch_size": 20, "blocklist": ""}
# The SELMA-node workflows run on the shipped world model (selma_backend/world/assets, listed by SELMA's loaders):
# a 64 px Stable Diffusion of the miniature world, its CLIP, and the world's skills with the offline prompt writer
# (the world generator's captions). Settings are real-use ones for that model (as `selma world reproduce` uses):
# 64 px, 20 dpmpp_2m steps at cfg 7.5, rank-8 LoRAs trained 200 steps on batches of 16 at lr 1e-3.
RENDER = {"dataset_name": "", "images_per_prompt": 2, "batch_size": 32, "steps": 20, "cfg": 7.5, "width": 64,
          "height": 64, "scheduler": "dpmpp_2m", "negative": "", "seed": 0}
FILTER = {"mode": "top_k_per_prompt", "threshold": 0.28, "keep_fraction": 0.5, "top_k": 1, "floor": -1.0,
          "per_skill": "", "dedup_cosine": 0.97, "min_pixel_std": 2.0}
CLIP = {"clip_model": "world-clip", "arch": "", "device": "auto", "dtype": "auto", "batch_size": 64}
SELMA_MODEL = "diffusers/world-sd"  # the shipped world model through every SELMA stage: a user picks theirs
# ComfyUI's native CheckpointLoaderSimple cannot load world-sd (a diffusers folder whose VAE downsamples by 4, not 8),
# so the native-node workflows (native render, apply experts) stay on a real SD 1.x checkpoint; the tests install
# a mini SD 1.5 under this name (tests/conftest.py TINY_INSTALL). A user picks their own checkpoint there.
NATIVE_MODEL = "selma-mini-sd15.safetensors"
SKILL_1, SKILL_2 = "world_counting", "world_spatial"
# Stage 4 on the world model: rank 8, 200 steps, batch 16 at 64 px (the paper's recipe is for 512 px SD models).
# noise_offset 0.1: world-sd was trained with it (selma world train-sd), and its LoRAs match it, as `selma reproduce`.
TRAIN = {"name": "experts", "steps": 200, "rank": 8, "alpha": 8.0, "learning_rate": 1e-3, "batch_size": 16,
         "grad_accum": 1, "resolution": 64, "preset": "selma", "text_encoder_lora": False, "lr_schedule": "constant",
         "warmup_steps": 0, "min_snr_gamma": 0.0, "noise_offset": 0.1, "flip": "skill", "score_weighting": "none",
         "mixed_precision": "auto", "gradient_checkpointing": False, "checkpoint_every": 100, "validation_every": 100,
         "seed": 0, "resume": True, "overwrite": False}
MERGE = {"method": "svd", "weights": "", "rank": 0, "density": 0.5, "block_weights": "", "seed": 0, "name": "world-merged"}
EVAL = {"prompts_file": "", "heldout_count": 100, "heldout_seed": 1000, "max_per_skill": 0, "steps": 20, "cfg": 7.5,
        "width": 64, "height": 64, "scheduler": "dpmpp_2m", "seed": 0, "samples": 1, "batch_size": 32,
        "vqa_url": "", "vqa_model": "", "report_name": "eval"}
NO_LORA = {"lora_1": "(none)", "lora_2": "(none)", "lora_3": "(none)"}
EXPERTS = f"selma/experts/{SKILL_1}.safetensors\nselma/experts/{SKILL_2}.safetensors"  # what stage 4 writes
WORLD_MERGED = "selma/world-merged.safetensors"  # what stage 5 writes (merge name "world-merged")
# apply-experts: a merge of experts trained on the user's SD checkpoint (a world-sd merge patches only world-sd).
MERGED = "selma/merged.safetensors"


def _train(model: tuple, data: tuple, *more: tuple, prompts: str) -> dict:
    extra = {f"dataset_{k}": d for k, d in enumerate(more, start=2)}
    return {"model": model, "dataset": data, **extra, **TRAIN, "validation_prompts": prompts}


SPECS = {
    "selma_stage2_render": [
        (1, "SelmaSkill", {"skill_id": SKILL_1}, 0),
        (2, "SelmaGeneratePrompts", {"skill": (1, 0), "count": 20, "seed": 0, "project": "selma", **GEN}, 1),
        (3, "SelmaLoadModel", {"checkpoint": SELMA_MODEL, **LOAD}, 0),
        (4, "SelmaRenderDataset", {"model": (3, 0), "prompts": (2, 0), **RENDER}, 2),
        (5, "PreviewImage", {"images": (4, 1)}, 3),
        (6, "PreviewAny", {"source": (4, 2)}, 3),
    ],
    "selma_stage3_filter_review": [
        (1, "SelmaSkill", {"skill_id": SKILL_1}, 0),
        (2, "SelmaGeneratePrompts", {"skill": (1, 0), "count": 8, "seed": 0, "project": "selma", **GEN}, 1),
        (3, "SelmaLoadModel", {"checkpoint": SELMA_MODEL, **LOAD}, 0),
        (4, "SelmaRenderDataset", {"model": (3, 0), "prompts": (2, 0), **RENDER}, 2),
        (5, "SelmaLoadClip", CLIP, 2),
        (6, "SelmaFilterDataset", {"dataset": (4, 0), "clip": (5, 0), **FILTER}, 3),
        (7, "SelmaReviewDataset", {"dataset": (6, 0)}, 4),
        (8, "PreviewAny", {"source": (6, 1)}, 3),
    ],
    # ComfyUI's own sampler writing into a SELMA dataset: native nodes, so a real SD checkpoint (see NATIVE_MODEL).
    "selma_native_render": [
        (1, "CheckpointLoaderSimple", {"ckpt_name": NATIVE_MODEL}, 0),
        (2, "PrimitiveStringMultiline", {"value": "two ceramic mugs on a white background, product photo"}, 0),
        (3, "CLIPTextEncode", {"clip": (1, 1), "text": (2, 0)}, 1),
        (4, "CLIPTextEncode", {"clip": (1, 1), "text": "blurry, watermark"}, 1),
        (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 2}, 1),
        (6, "KSampler", {"model": (1, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0), "seed": 0,
                         "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}, 2),
        (7, "VAEDecode", {"samples": (6, 0), "vae": (1, 2)}, 3),
        (8, "SelmaSkill", {"skill_id": "product"}, 3),
        (9, "SelmaAppendToDataset", {"images": (7, 0), "prompt": (2, 0), "skill": (8, 0),
                                     "dataset_name": "native/product"}, 4),
    ],
    # Stages 1-6 in one graph: two skills -> prompts -> render -> filter -> two experts -> merge -> evaluate.
    "selma_full_pipeline": [
        (1, "SelmaSkill", {"skill_id": SKILL_1}, 0, "Skill 1"),
        (2, "SelmaSkill", {"skill_id": SKILL_2}, 0, "Skill 2"),
        (3, "SelmaGeneratePrompts", {"skill": (1, 0), "count": 200, "seed": 0, "project": "selma", **GEN}, 1,
         "Prompts: skill 1"),
        (4, "SelmaGeneratePrompts", {"skill": (2, 0), "count": 200, "seed": 0, "project": "selma", **GEN}, 1,
         "Prompts: skill 2"),
        (5, "SelmaLoadModel", {"checkpoint": SELMA_MODEL, **LOAD}, 2),
        (6, "SelmaRenderDataset", {"model": (5, 0), "prompts": (3, 0), **RENDER}, 2, "Render: skill 1"),
        (7, "SelmaRenderDataset", {"model": (5, 0), "prompts": (4, 0), **RENDER}, 2, "Render: skill 2"),
        (8, "SelmaLoadClip", CLIP, 3),
        (9, "SelmaFilterDataset", {"dataset": (6, 0), "clip": (8, 0), **FILTER}, 3, "Filter: skill 1"),
        (10, "SelmaFilterDataset", {"dataset": (7, 0), "clip": (8, 0), **FILTER}, 3, "Filter: skill 2"),
        (11, "SelmaTrainExperts", _train((5, 0), (9, 0), (10, 0), prompts="three red circles\n"
                                         "a yellow star to the left of a green triangle"), 4),
        (12, "PreviewImage", {"images": (11, 2)}, 5, "Loss curves"),
        (13, "PreviewAny", {"source": (11, 3)}, 5, "Training report"),
        (14, "SelmaMergeExperts", {"lora_names": "", **MERGE, "experts": (11, 0)}, 6),
        (15, "SelmaGeneratePrompts", {"skill": (2, 0), "count": 100, "seed": 1, "project": "selma", **GEN}, 7,
         "Evaluation prompts: skill 2 (other seed)"),
        (16, "SelmaEvaluate", {"model": (5, 0), "clip": (8, 0), **NO_LORA, **EVAL, "prompts": (15, 0),
                               "train_prompts": (3, 0), "loras": (14, 2)}, 7),
        (17, "PreviewAny", {"source": (16, 1)}, 8, "Evaluation table"),
        (18, "PreviewAny", {"source": (14, 0)}, 6, "Merged LoRA (for SELMA Apply Experts)"),
    ],
    # Stage 4 alone: one skill's data, one expert in models/loras/selma/experts/<skill>.safetensors.
    "selma_stage4_train": [
        (1, "SelmaSkill", {"skill_id": SKILL_1}, 0),
        (2, "SelmaGeneratePrompts", {"skill": (1, 0), "count": 200, "seed": 0, "project": "selma", **GEN}, 1),
        (3, "SelmaLoadModel", {"checkpoint": SELMA_MODEL, **LOAD}, 2),
        (4, "SelmaRenderDataset", {"model": (3, 0), "prompts": (2, 0), **RENDER}, 2),
        (5, "SelmaLoadClip", CLIP, 3),
        (6, "SelmaFilterDataset", {"dataset": (4, 0), "clip": (5, 0), **FILTER}, 3),
        (7, "SelmaTrainExperts", _train((3, 0), (6, 0), prompts="three red circles"), 4),
        (8, "PreviewImage", {"images": (7, 2)}, 5, "Loss curve"),
        (9, "PreviewAny", {"source": (7, 1)}, 5, "Expert file (for Load LoRA / merging)"),
        (10, "PreviewAny", {"source": (7, 3)}, 5, "Training report"),
    ],
    # Stage 5 alone: world experts listed by name -> one merged file in models/loras/selma/ with its error report.
    # (No native check against a checkpoint here: ComfyUI's CheckpointLoaderSimple cannot load world-sd.)
    "selma_stage5_merge": [
        (1, "SelmaMergeExperts", {"lora_names": EXPERTS, **MERGE}, 0),
        (2, "PreviewAny", {"source": (1, 1)}, 1, "Merge report"),
        (3, "PreviewAny", {"source": (1, 0)}, 1, "Merged LoRA (for SELMA Evaluate)"),
    ],
    # Stage 6 alone: base vs an expert vs the merge on held-out prompts of the training prompts' skill.
    "selma_stage6_evaluate": [
        (1, "SelmaSkill", {"skill_id": SKILL_1}, 0),
        (2, "SelmaGeneratePrompts", {"skill": (1, 0), "count": 200, "seed": 0, "project": "selma", **GEN}, 0,
         "Training prompts (same settings as stage 4)"),
        (3, "SelmaLoadModel", {"checkpoint": SELMA_MODEL, **LOAD}, 1),
        (4, "SelmaLoadClip", CLIP, 1),
        (5, "SelmaEvaluate", {"model": (3, 0), "clip": (4, 0), "lora_1": f"selma/experts/{SKILL_1}.safetensors",
                              "lora_2": WORLD_MERGED, "lora_3": "(none)", **EVAL, "train_prompts": (2, 0)}, 2),
        (6, "PreviewAny", {"source": (5, 1)}, 3, "Evaluation table"),
        (7, "PreviewAny", {"source": (5, 2)}, 3, "Report folder (open index.html)"),
    ],
    # Everyday use: your own SD checkpoint and sampler with a merged SELMA LoRA trained on it (native nodes:
    # they cannot load world-sd, so this one stays on a real SD 1.x checkpoint; see NATIVE_MODEL).
    "selma_apply_experts": [
        (1, "CheckpointLoaderSimple", {"ckpt_name": NATIVE_MODEL}, 0, "Your checkpoint"),
        (2, "SelmaApplyExperts", {"model": (1, 0), "clip": (1, 1), "lora_names": MERGED, "strength_model": 1.0,
                                  "strength_clip": 1.0, "strengths": ""}, 0),
        (3, "CLIPTextEncode", {"clip": (2, 1), "text": "three red apples to the left of a blue cup on a wooden table"},
         1, "Positive"),
        (4, "CLIPTextEncode", {"clip": (2, 1), "text": "blurry, watermark"}, 1, "Negative"),
        (5, "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, 1),
        (6, "KSampler", {"model": (2, 0), "positive": (3, 0), "negative": (4, 0), "latent_image": (5, 0), "seed": 0,
                         "steps": 25, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}, 2),
        (7, "VAEDecode", {"samples": (6, 0), "vae": (1, 2)}, 2),
        (8, "SaveImage", {"images": (7, 0), "filename_prefix": "selma/apply"}, 3),
        (9, "PreviewAny", {"source": (2, 2)}, 3, "Keys matched"),
    ],
}

#: Frames around each stage's nodes: (title, node ids, colour).
STAGE_COLOURS = ("#3f789e", "#8a6d3b", "#5a7f4f", "#7d4f7f", "#9e5a3f", "#3f8e8e")
GROUPS = {
    "selma_full_pipeline": [("1 · Skills and prompts", [1, 2, 3, 4], 0), ("2 · Render", [5, 6, 7], 1),
                            ("3 · Score and filter", [8, 9, 10], 2), ("4 · Train experts", [11, 12, 13], 3),
                            ("5 · Merge → models/loras/selma/", [14, 18], 4), ("6 · Evaluate", [15, 16, 17], 5)],
    "selma_stage4_train": [("1-3 · Data", [1, 2, 3, 4, 5, 6], 0), ("4 · Train an expert", [7, 8, 9, 10], 3)],
}

COLUMN_WIDTH, GAP, TOP, LEFT = 400, 80, 100, 60
SLOT_H, WIDGET_H, MULTILINE_H, TITLE_H = 22, 28, 120, 34
PROGRESS_H = 40  # the progress line web/js/selma_progress.js draws under a running SELMA node


def node_size(cls: str, info: dict) -> list[int]:
    """Roughly what the frontend draws: a title, input/output sockets side by side, then the widgets."""
    desc = describe(info[cls])
    widgets = [i for i in desc["inputs"] if i["type"] in WIDGET_TYPES and not i.get("force_input")]
    sockets = len(desc["inputs"]) - len(widgets)
    multiline = {n for sec in ("required", "optional") for n, v in info[cls]["input"].get(sec, {}).items()
                 if len(v) > 1 and isinstance(v[1], dict) and v[1].get("multiline")}
    height = TITLE_H + SLOT_H * max(sockets, len(desc["outputs"])) + sum(
        MULTILINE_H if w["name"] in multiline else WIDGET_H * (1 + int(bool(w.get("control_after_generate"))))
        for w in widgets)
    if cls in ("PreviewImage", "SaveImage", "PreviewAny"):
        height = max(height, 260)
    if cls.startswith("Selma"):
        height += PROGRESS_H
    return [COLUMN_WIDTH - GAP, height + 10]


def layout(spec: list, info: dict) -> dict[int, tuple[list[int], list[int]]]:
    """Node id -> (pos, size): each column a stack, columns left to right."""
    y = {}
    out = {}
    for nid, cls, _inputs, column, *_ in spec:
        size = node_size(cls, info)
        top = y.get(column, TOP)
        out[nid] = ([LEFT + column * COLUMN_WIDTH, top], size)
        y[column] = top + size[1] + GAP
    return out


def groups(name: str, placed: dict) -> list[dict]:
    frames = []
    for k, (title, ids, colour) in enumerate(GROUPS.get(name, []), start=1):
        x0 = min(placed[i][0][0] for i in ids) - 15
        y0 = min(placed[i][0][1] for i in ids) - 70
        x1 = max(placed[i][0][0] + placed[i][1][0] for i in ids) + 15
        y1 = max(placed[i][0][1] + placed[i][1][1] for i in ids) + 15
        frames.append({"id": k, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                       "color": STAGE_COLOURS[colour], "font_size": 24, "flags": {}})
    return frames


def build(name: str, spec: list, info: dict) -> tuple[dict, dict]:
    nodes, links, api = [], [], {}
    outputs_links: dict[tuple[int, int], list[int]] = {}
    placed = layout(spec, info)
    for nid, cls, inputs, _column, *title in spec:
        desc = describe(info[cls])
        ui_inputs, widgets = [], []
        for item in desc["inputs"]:
            name_ = item["name"]
            if name_ not in inputs:
                continue
            value = inputs[name_]
            linked = isinstance(value, tuple)
            is_widget = item["type"] in WIDGET_TYPES and not item.get("force_input")
            if linked:
                link_id = len(links) + 1
                src, slot = value
                links.append([link_id, src, slot, nid, len(ui_inputs), info[cls]["input"][item["section"]][name_][0]
                              if not is_widget else item["type"]])
                outputs_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name_, "type": links[-1][5], "link": link_id}
                if is_widget:
                    entry["widget"] = {"name": name_}
                ui_inputs.append(entry)
            if is_widget:
                widgets.append(None if linked else value)
                if item.get("control_after_generate"):
                    widgets.append("fixed")
        shown = title[0] if title else info[cls]["display_name"]
        api[str(nid)] = {"class_type": cls, "inputs": {k: ([str(v[0]), v[1]] if isinstance(v, tuple) else v)
                                                        for k, v in inputs.items()},
                         "_meta": {"title": shown}}
        pos, size = placed[nid]
        nodes.append({"id": nid, "type": cls, "pos": pos, "size": size, "flags": {}, "order": len(nodes),
                      "mode": 0, "inputs": ui_inputs, "outputs": [], "properties": {"Node name for S&R": cls},
                      "widgets_values": widgets, **({"title": title[0]} if title else {})})
    for node, (nid, cls, *_rest) in zip(nodes, spec, strict=True):
        node["outputs"] = [{"name": n, "type": t, "links": outputs_links.get((nid, i)) or None,
                            **({"shape": 6} if lst else {})}
                           for i, (n, t, lst) in enumerate(zip(info[cls]["output_name"], info[cls]["output"],
                                                                info[cls]["output_is_list"], strict=True))]
    ui = {"id": f"5e17a000-0000-4000-8000-{hashlib.sha256(name.encode()).hexdigest()[:12]}", "revision": 0,
          "last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
          "groups": groups(name, placed), "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}},
          "version": 0.4}
    return ui, api


THUMB = 512  # the template browser shows <name>.jpg beside <name>.json as the card picture
LINK_COLOURS = {"SELMA_MODEL": "#b39ddb", "SELMA_DATASET": "#81c784", "SELMA_PROMPTS": "#ffd54f",
                "SELMA_LORAS": "#ff8a65", "SELMA_CLIP": "#4fc3f7", "SELMA_SKILL": "#f06292"}


def thumbnail(ui: dict) -> Image.Image:
    """The graph drawn small: stage frames, nodes with their titles, links coloured by type."""
    boxes = {n["id"]: (*n["pos"], *n["size"]) for n in ui["nodes"]}
    frames = [g["bounding"] for g in ui["groups"]]
    x0 = min(b[0] for b in [*boxes.values(), *frames]) - 30
    y0 = min(b[1] for b in [*boxes.values(), *frames]) - 30
    x1 = max(b[0] + b[2] for b in [*boxes.values(), *frames]) + 30
    y1 = max(b[1] + b[3] for b in [*boxes.values(), *frames]) + 30
    k = THUMB / max(x1 - x0, y1 - y0)
    ox, oy = (THUMB - (x1 - x0) * k) / 2, (THUMB - (y1 - y0) * k) / 2

    def at(x: float, y: float) -> tuple[float, float]:
        return ox + (x - x0) * k, oy + (y - y0) * k

    img = Image.new("RGB", (THUMB, THUMB), "#1e1e1e")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(max(10, round(24 * k)))
    for g in ui["groups"]:
        x, y, w, h = g["bounding"]
        draw.rectangle([*at(x, y), *at(x + w, y + h)], fill=_dim(g["color"]), outline=g["color"])
        draw.text(at(x + 10, y + 8), _fit(g["title"], w * k - 8, font), fill="#e0e0e0", font=font)
    for _lid, src, slot, dst, dslot, type_ in ui["links"]:
        sx, sy, sw, _ = boxes[src]
        dx, dy, _, _ = boxes[dst]
        draw.line([at(sx + sw, sy + 50 + 22 * slot), at(dx, dy + 50 + 22 * dslot)],
                  fill=LINK_COLOURS.get(type_, "#9e9e9e"), width=max(1, round(4 * k)))
    for n in ui["nodes"]:
        x, y, w, h = boxes[n["id"]]
        ours = n["type"].startswith("Selma")
        draw.rounded_rectangle([*at(x, y), *at(x + w, y + h)], radius=max(2, round(12 * k)), fill="#353535",
                               outline="#7c4dff" if ours else "#616161", width=max(1, round(3 * k)))
        draw.rectangle([*at(x + 3, y + 3), *at(x + w - 3, y + 34)], fill="#4527a0" if ours else "#424242")
        draw.text(at(x + 12, y + 8), _fit(n.get("title") or n["type"].removeprefix("Selma"), w * k - 6, font),
                  fill="#ffffff", font=font)
    return img


def _fit(text: str, width: float, font: ImageFont.ImageFont) -> str:
    """``text`` cut to ``width`` pixels (the small font has no arrows: ASCII only)."""
    text = text.replace("→", "->")
    while text and font.getlength(text) > width:
        text = text[:-1]
    return text


def _dim(colour: str) -> str:
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"#{r // 3:02x}{g // 3:02x}{b // 3:02x}"


def main(object_info: str) -> None:
    info = json.loads(Path(object_info).read_text())
    for name, spec in SPECS.items():
        ui, api = build(name, spec, info)
        (OUT / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
        (OUT / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
        print("wrote", name)
    for path in sorted(OUT.glob("*.json")):  # every template, the hand-written ones too
        thumbnail(json.loads(path.read_text())).save(path.with_suffix(".jpg"), quality=85, optimize=True)


if __name__ == "__main__":
    main(sys.argv[1])
