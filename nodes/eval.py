"""Stage 6 node: evaluate the base model, each expert and the merged LoRA on held-out prompts."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..selma_backend.errors import invalid
from ..selma_backend.eval import EvalConfig, PromptSpec, evaluate, next_run_dir
from ..selma_backend.eval.prompts import skill_of_prompts
from ..selma_backend.paths import safe_join
from ..selma_backend.render.config import RenderConfig
from ..selma_backend.render.schedulers import scheduler_names
from .filter import Clip
from .glue import (
    CATEGORY,
    free_memory,
    input_dir,
    interrupted,
    io,
    model_names,
    model_path,
    output_dir,
    progress_callback,
    raise_if_interrupted,
    ui,
    user_dir,
)
from .prompts import Prompts
from .render import Model
from .skills import skills_dir

#: A list of absolute LoRA .safetensors paths (from SELMA's training and merge nodes).
Loras = io.Custom("SELMA_LORAS")
NONE = "(none)"
_R = RenderConfig.__dataclass_fields__


def _lora_choices() -> list[str]:
    return [NONE] + [n for n in model_names("loras") if n.lower().endswith((".safetensors", ".sft"))]


def _lora_input(name: str) -> io.Combo.Input:
    return io.Combo.Input(name, options=_lora_choices(), default=NONE,
                          tooltip="A LoRA from models/loras to compare with the base (an expert, a merge, any LoRA).")


def _lora_paths(names: list[str], wired: list[str] | None) -> list[str]:
    choices = _lora_choices()
    paths = []
    for field, name in zip(("lora_1", "lora_2", "lora_3"), names, strict=True):
        if name == NONE:
            continue
        if name not in choices:
            raise invalid(field, name, choices, "put the LoRA in models/loras and refresh")
        paths.append(str(model_path("loras", name)))
    return paths + [str(p) for p in (wired or [])]


def _grid_tensor(path: str) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _spec(prompts: dict | None, prompts_file: str, train_prompts: dict | None, heldout_count: int, heldout_seed: int,
          max_per_skill: int) -> PromptSpec:
    files = [prompts["path"]] if prompts else []
    if prompts_file.strip():
        files.append(str(safe_join(input_dir(), prompts_file.strip(), field="prompts_file")))
    heldout = ()
    if heldout_count:
        if not train_prompts:
            raise invalid("heldout_count", heldout_count, "0 without train_prompts",
                          "wire the training prompts: held-out prompts are written for their skill, kept apart from them")
        heldout = (skill_of_prompts(train_prompts["path"], train_prompts["skill"], skills_dir()),)
    return PromptSpec(files=tuple(files), heldout_skills=heldout, heldout_count=max(heldout_count, 1),
                      heldout_seed=heldout_seed, train_prompts=(train_prompts["path"],) if train_prompts else (),
                      max_per_skill=max_per_skill)


class SelmaEvaluate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaEvaluate", display_name="SELMA Evaluate", category=CATEGORY,
            description="Stage 6: render the base model and each LoRA (experts, merged) on held-out prompts with "
            "the same seeds, score every image with CLIP (and, with a vision-language endpoint, DSG-style yes/no "
            "questions), and compare with 95% bootstrap intervals. Writes a report (scores.json, charts, grids, "
            "index.html) to a new folder under output/selma/eval/.",
            inputs=[
                Model.Input("model", tooltip="From SELMA Load Model: the base checkpoint."),
                Clip.Input("clip", tooltip="From SELMA Load CLIP Scorer."),
                _lora_input("lora_1"), _lora_input("lora_2"), _lora_input("lora_3"),
                io.String.Input("prompts_file", default="", tooltip="A prompt list in ComfyUI's input folder: "
                                ".jsonl, .json, .csv, .tsv or .txt (e.g. DSG or TIFA prompts; column prompt/text/caption)."),
                io.Int.Input("heldout_count", default=0, min=0, max=10000, tooltip="Write this many new held-out "
                             "prompts for the training prompts' skill (0: none), none close to a training prompt."),
                io.Int.Input("heldout_seed", default=1000, min=0, max=2**31 - 1,
                             tooltip="Seed of the held-out prompts: must differ from the training prompts' seed."),
                io.Int.Input("max_per_skill", default=0, min=0, max=100000, tooltip="Evaluate the first N prompts "
                             "of each skill (0: all)."),
                io.Int.Input("steps", default=25, min=1, max=1000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=_R["cfg"].default, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale."),
                io.Int.Input("width", default=0, min=0, max=16384, step=8, tooltip="0: the model's default size."),
                io.Int.Input("height", default=0, min=0, max=16384, step=8, tooltip="0: the model's default size."),
                io.Combo.Input("scheduler", options=scheduler_names(), default=_R["scheduler"].default,
                               tooltip="The sampler/scheduler."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Render seed: image (prompt, sample) "
                             "gets the same noise for every model."),
                io.Int.Input("samples", default=1, min=1, max=64, tooltip="Images per prompt and model."),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip="Images per batch (prompts mixed)."),
                io.String.Input("vqa_url", default="", tooltip="OpenAI-compatible vision-language endpoint for the "
                                "DSG question score, e.g. http://127.0.0.1:11434/v1 (empty: CLIP only). The API key "
                                "comes from SELMA_LLM_API_KEY or user/selma/llm_api_key, never from here."),
                io.String.Input("vqa_model", default="", tooltip="The vision-language model's name on that endpoint."),
                io.String.Input("report_name", default="eval", tooltip="Folder under output/selma/eval/; each run "
                                "gets a new numbered folder, nothing is overwritten."),
                Prompts.Input("prompts", optional=True, tooltip="Evaluation prompts from SELMA Generate Prompts "
                              "(use another seed than for training)."),
                Prompts.Input("train_prompts", optional=True, tooltip="The training prompts: evaluation prompts that "
                              "nearly copy one are left out; held-out prompts are written for their skill."),
                Loras.Input("loras", optional=True, tooltip="More LoRA files, from SELMA's training or merge nodes."),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid", tooltip="Base | experts | merged, prompts as captions."),
                io.String.Output("table", display_name="table", tooltip="Per skill and model: mean [95% CI], "
                                 "difference to the base [95% CI] and whether it is better, worse or unclear."),
                io.String.Output("report_path", display_name="report", tooltip="The report folder (open index.html)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, lora_1: str, lora_2: str, lora_3: str, prompts_file: str, heldout_count: int,
                heldout_seed: int, max_per_skill: int, steps: int, cfg: float, width: int, height: int,
                scheduler: str, seed: int, samples: int, batch_size: int, vqa_url: str, vqa_model: str,
                report_name: str, prompts: dict | None = None, train_prompts: dict | None = None,
                loras: list[str] | None = None) -> io.NodeOutput:
        render = RenderConfig(images_per_prompt=samples, batch_size=batch_size, steps=steps, cfg=cfg, width=width,
                              height=height, scheduler=scheduler, seed=seed)
        config = EvalConfig(render=render, vqa_url=vqa_url, vqa_model=vqa_model)
        spec = _spec(prompts, prompts_file, train_prompts, heldout_count, heldout_seed, max_per_skill)
        target = safe_join(output_dir(), f"selma/eval/{report_name.strip() or 'eval'}", field="report_name")
        out = next_run_dir(target.parent, target.name)
        free_memory()  # ComfyUI's own models out of the way before ours load
        report = evaluate(model, _lora_paths([lora_1, lora_2, lora_3], loras), spec, clip, out, config,
                          progress=progress_callback(1, "eval"), should_stop=interrupted, user_dir=user_dir())
        raise_if_interrupted()
        grid = _grid_tensor(report.overview)
        shown = {**ui.PreviewImage(grid, cls=cls).as_dict(), "text": [report.table]}
        return io.NodeOutput(grid, report.table, report.out_dir, ui=shown)
