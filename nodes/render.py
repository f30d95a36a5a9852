"""Stage 2 nodes: choose the checkpoint, render a dataset in batches, or append ComfyUI's own
renders (any model, any sampler) to a SELMA dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..selma_backend.errors import invalid
from ..selma_backend.fsio import read_jsonl
from ..selma_backend.models.config import DEVICES, DTYPES, PREDICTION_TYPES, ModelConfig
from ..selma_backend.models.detect import detect_architecture
from ..selma_backend.models.loader import load_pipeline
from ..selma_backend.paths import safe_join, slug
from ..selma_backend.render.config import RenderConfig
from ..selma_backend.render.dataset import append_images
from ..selma_backend.render.render import render_dataset
from ..selma_backend.render.schedulers import scheduler_names
from .glue import (
    CATEGORY,
    folder_model_path,
    folder_models,
    free_memory,
    interrupted,
    io,
    model_names,
    model_path,
    output_dir,
    progress_callback,
    raise_if_interrupted,
    send_event,
    ui,
)
from .prompts import Prompts, Skill

Model = io.Custom("SELMA_MODEL")
Dataset = io.Custom("SELMA_DATASET")
_RENDER = RenderConfig.__dataclass_fields__
_DIFFUSERS_PREFIX = "diffusers/"
_PREVIEW = 8  # images shown in the IMAGE preview


def _model_choices() -> list[str]:
    files = [n for n in model_names("checkpoints") if n.lower().endswith((".safetensors", ".sft", ".ckpt", ".pt", ".pth"))]
    folders = [_DIFFUSERS_PREFIX + n for n in folder_models("diffusers", "model_index.json")]
    return files + folders or ["(no checkpoints found)"]


def _model_path(name: str) -> str:
    """Only names the dropdown offers (model folders are often symlinks to big disks, so membership in
    the listing, not path resolution, keeps a typed value from reaching elsewhere)."""
    choices = _model_choices()
    if name not in choices:
        raise invalid("checkpoint", name, choices, "put the model in models/checkpoints or models/diffusers and refresh")
    if name.startswith(_DIFFUSERS_PREFIX):
        return str(folder_model_path("diffusers", name[len(_DIFFUSERS_PREFIX):], "model_index.json"))
    return str(model_path("checkpoints", name))


def dataset_dir(name: str) -> Path:
    """A dataset folder under output/selma/ (a name from a widget cannot escape it)."""
    return safe_join(output_dir() / "selma", name, field="dataset")


def _to_pil(images: list[torch.Tensor]) -> list[Image.Image]:
    """ComfyUI IMAGE batches ([B, H, W, C] floats in 0..1) → PIL images, in order."""
    out = []
    for batch in images:
        for img in batch if batch.ndim == 4 else batch[None]:
            out.append(Image.fromarray(np.clip(img.cpu().numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)))
    return out


def _to_tensor(paths: list[Path]) -> torch.Tensor | None:
    imgs = [np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255.0 for p in paths]
    if not imgs or any(i.shape != imgs[0].shape for i in imgs):
        imgs = imgs[:1]
    return torch.from_numpy(np.stack(imgs)) if imgs else None


class SelmaLoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaLoadModel", display_name="SELMA Load Model", category=CATEGORY,
            description="Choose the text-to-image checkpoint SELMA renders with and trains on: a single-file "
            ".safetensors in models/checkpoints or a diffusers folder in models/diffusers (SD 1.x, SD 2.x, SDXL). "
            "Loaded offline when a stage needs it and released afterwards.",
            inputs=[
                io.Combo.Input("checkpoint", options=_model_choices(), tooltip="The checkpoint or diffusers folder."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto", tooltip="auto: fp16 on GPU, fp32 on CPU."),
                io.Combo.Input("device", options=list(DEVICES), default="auto", tooltip="auto: cuda, else mps, else cpu."),
                io.Combo.Input("prediction_type", options=list(PREDICTION_TYPES), default="auto",
                               tooltip="auto: what the checkpoint says; set v_prediction for SD 2.x 768-v files."),
                io.Boolean.Input("vae_slicing", default=False, tooltip="Decode one image at a time (less memory)."),
                io.Boolean.Input("vae_tiling", default=False, tooltip="Decode in tiles (large images, less memory)."),
                io.Boolean.Input("allow_pickle", default=False,
                                 tooltip="Allow .ckpt/.pt pickle files (read with weights_only=True). Off: safetensors only."),
            ],
            outputs=[Model.Output("model", display_name="model", tooltip="The model, for rendering and training."),
                     io.String.Output("info", display_name="info", tooltip="Detected architecture and prediction type.")],
        )

    @classmethod
    def execute(cls, checkpoint: str, dtype: str, device: str, prediction_type: str, vae_slicing: bool,
                vae_tiling: bool, allow_pickle: bool) -> io.NodeOutput:
        config = ModelConfig(path=_model_path(checkpoint), dtype=dtype, device=device, prediction_type=prediction_type,
                             vae_slicing=vae_slicing, vae_tiling=vae_tiling, allow_pickle=allow_pickle)
        det = detect_architecture(config.path, allow_pickle=allow_pickle)  # fail here, before any GPU minute
        info = f"{checkpoint}: {det.arch}, {det.prediction_type}"
        return io.NodeOutput(config, info, ui=ui.PreviewText(info))


class SelmaRenderDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaRenderDataset", display_name="SELMA Render Dataset", category=CATEGORY,
            description="Stage 2: render every prompt (several prompts per batch, k images each) into a dataset "
            "under output/selma/<dataset>: PNGs, captions, metadata.jsonl, dataset.json. Resumable: a re-run renders "
            "only what is missing; Cancel keeps every finished image.",
            inputs=[
                Model.Input("model", tooltip="From SELMA Load Model."),
                Prompts.Input("prompts", tooltip="From SELMA Generate Prompts."),
                io.String.Input("dataset_name", default="", tooltip="Folder under output/selma/; empty: "
                                "<project>/datasets/<prompt file name>."),
                io.Int.Input("images_per_prompt", default=_RENDER["images_per_prompt"].default, min=1, max=64,
                             tooltip="k images per prompt (filtering keeps the best)."),
                io.Int.Input("batch_size", default=_RENDER["batch_size"].default, min=1, max=256,
                             tooltip="Images per batch (prompts mixed); halved automatically on out-of-memory."),
                io.Int.Input("steps", default=_RENDER["steps"].default, min=1, max=1000, tooltip="Denoising steps."),
                io.Float.Input("cfg", default=_RENDER["cfg"].default, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale."),
                io.Int.Input("width", default=0, min=0, max=16384, step=8, tooltip="0: the model's default size."),
                io.Int.Input("height", default=0, min=0, max=16384, step=8, tooltip="0: the model's default size."),
                io.Combo.Input("scheduler", options=scheduler_names(), default=_RENDER["scheduler"].default,
                               tooltip="The sampler/scheduler."),
                io.String.Input("negative", multiline=True, default="", tooltip="Negative prompt for every image."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="Run seed: each image's seed derives from it, the prompt id and the sample."),
            ],
            outputs=[Dataset.Output("dataset", display_name="dataset", tooltip="The dataset, for filtering and training."),
                     io.Image.Output("preview", display_name="preview", tooltip=f"Up to {_PREVIEW} rendered images."),
                     io.String.Output("report", display_name="report", tooltip="Rendered, existing, speed, warnings.")],
        )

    @classmethod
    def execute(cls, model: ModelConfig, prompts: dict, images_per_prompt: int, batch_size: int,
                steps: int, cfg: float, width: int, height: int, scheduler: str, negative: str, seed: int,
                dataset_name: str = "") -> io.NodeOutput:
        config = RenderConfig(images_per_prompt=images_per_prompt, batch_size=batch_size, steps=steps, cfg=cfg,
                              width=width, height=height, scheduler=scheduler, negative=negative, seed=seed)
        source = Path(prompts["path"])
        out = dataset_dir(dataset_name) if dataset_name.strip() else source.parent.parent / "datasets" / slug(source.stem)
        shown: list[Path] = []
        free_memory()  # ComfyUI's own models out of the way before ours loads
        with load_pipeline(model) as lp:
            report = render_dataset(lp, source, out, config, progress=progress_callback(1, "render", prompts.get("skill")),
                                    should_stop=interrupted,
                                    on_image=lambda path, _row: len(shown) < _PREVIEW and shown.append(path),
                                    warn=lambda msg: send_event("status", {"level": "warning", "title": "SELMA render",
                                                                           "text": msg}))
        raise_if_interrupted()
        if not shown:  # nothing new this run (a re-run of a complete dataset): preview what is there
            shown = [out / r["file_name"] for r in read_jsonl(out / "metadata.jsonl")[:_PREVIEW]]
        text = (f"{report.status}: {report.rendered} rendered, {report.existing} already there, "
                f"{report.images_per_s:.2f} images/s, batch {report.batch_size} → {out}")
        text += "".join(f"\nwarning: {w}" for w in report.warnings)
        return io.NodeOutput({"path": str(out), "skill": prompts.get("skill")}, _to_tensor(shown), text,
                             ui=ui.PreviewText(text))


class SelmaAppendToDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaAppendToDataset", display_name="SELMA Append Images to Dataset", category=CATEGORY,
            description="The native path: render with any model and sampler ComfyUI has, then add the images with "
            "their prompts to a SELMA dataset (same format as SELMA Render Dataset). One prompt for all images, or "
            "one per image. Re-running does not duplicate images.",
            inputs=[
                io.Image.Input("images", tooltip="An IMAGE batch or a list of them."),
                io.String.Input("prompt", multiline=True, default="", force_input=False,
                                tooltip="The prompt(s) the images were made from: one, or one per image (a list)."),
                Skill.Input("skill", tooltip="The skill these images teach."),
                io.String.Input("dataset_name", default="native/dataset", tooltip="Folder under output/selma/."),
            ],
            outputs=[Dataset.Output("dataset", display_name="dataset", tooltip="The dataset, for filtering and training."),
                     io.String.Output("report", display_name="report", tooltip="How many images were added.")],
            is_input_list=True, is_output_node=True,
        )

    @classmethod
    def execute(cls, images: list, prompt: list[str], skill: list, dataset_name: list[str]) -> io.NodeOutput:
        pil = _to_pil(images)
        texts = list(prompt)
        if len(texts) == 1:
            texts = texts * len(pil)
        if len(texts) != len(pil):
            raise ValueError(f"prompt: got {len(texts)} prompts for {len(pil)} images; give one, or one per image")
        out = dataset_dir(dataset_name[0])
        rows = append_images(out, pil, texts, skill[0].id, source="comfyui")
        text = f"{len(rows)} images in {out}"
        return io.NodeOutput({"path": str(out), "skill": skill[0].id}, text, ui=ui.PreviewText(text))
