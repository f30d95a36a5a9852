"""Stage 3 nodes: choose the CLIP scorer, score and filter a dataset, review it by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..selma_backend.errors import invalid
from ..selma_backend.filter import MODES, FilterConfig, ScorerConfig, filter_dataset, load_scorer
from ..selma_backend.filter.config import parse_per_skill
from ..selma_backend.models.config import DEVICES, DTYPES
from .glue import (
    CATEGORY,
    folder_model_path,
    folder_models,
    interrupted,
    io,
    model_names,
    model_path,
    output_dir,
    progress_callback,
    raise_if_interrupted,
    ui,
)
from .render import Dataset

Clip = io.Custom("SELMA_CLIP")
_FILTER = FilterConfig.__dataclass_fields__


def _clip_choices() -> list[str]:
    folders = folder_models("clip", "open_clip_config.json")
    files = [n for n in model_names("clip") if n.lower().endswith((".safetensors", ".sft"))]
    return folders + files or ["(no CLIP models in models/clip)"]


def _clip_path(name: str) -> str:
    """Only names the dropdown offers: an open_clip folder or a weights file in models/clip."""
    choices = _clip_choices()
    if name not in choices:
        raise invalid("clip_model", name, choices, "put an open_clip folder or weights file in models/clip and refresh")
    if name in folder_models("clip", "open_clip_config.json"):
        return str(folder_model_path("clip", name, "open_clip_config.json"))
    return str(model_path("clip", name))


def _image(path: str) -> torch.Tensor:
    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img)[None]


def dataset_key(path: str | Path) -> str:
    """The dataset's path relative to the output folder: what the review routes take."""
    return Path(path).resolve().relative_to(output_dir().resolve()).as_posix()


class SelmaLoadClip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaLoadClip", display_name="SELMA Load CLIP Scorer", category=CATEGORY,
            description="Choose the open_clip model that scores image–caption agreement: a folder in models/clip "
            "(open_clip_config.json + weights, as hubs publish them) or a weights file with its architecture name. "
            "Missing or mismatched weights are an error, never random weights.",
            inputs=[
                io.Combo.Input("clip_model", options=_clip_choices(), tooltip="An open_clip folder or weights file."),
                io.String.Input("arch", default="", tooltip="For a bare weights file: the open_clip architecture, "
                                "e.g. ViT-B-32. Empty for a folder."),
                io.Combo.Input("device", options=list(DEVICES), default="auto", tooltip="auto: cuda, else mps, else cpu."),
                io.Combo.Input("dtype", options=list(DTYPES), default="auto", tooltip="auto: fp16 on GPU, fp32 on CPU."),
                io.Int.Input("batch_size", default=64, min=1, max=4096, tooltip="Images scored per batch."),
            ],
            outputs=[Clip.Output("clip", display_name="clip", tooltip="The scorer, for filtering and evaluation.")],
        )

    @classmethod
    def execute(cls, clip_model: str, arch: str, device: str, dtype: str, batch_size: int) -> io.NodeOutput:
        return io.NodeOutput(ScorerConfig(path=_clip_path(clip_model), arch=arch.strip(), device=device, dtype=dtype,
                                          batch_size=batch_size))


class SelmaFilterDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaFilterDataset", display_name="SELMA Score & Filter Dataset", category=CATEGORY,
            description="Stage 3: score every image against its caption with CLIP, drop broken, blank, "
            "near-duplicate and badly matching images, and write clip_score and keep into metadata.jsonl. "
            "Embeddings are cached, so trying another threshold is instant. Your review choices always win.",
            inputs=[
                Dataset.Input("dataset", tooltip="From SELMA Render Dataset or SELMA Append Images."),
                Clip.Input("clip", tooltip="From SELMA Load CLIP Scorer."),
                io.Combo.Input("mode", options=MODES.names(), default="threshold",
                               tooltip="threshold | keep_fraction (best share per skill) | top_k_per_prompt "
                               "(best-of-n) | per_skill (a threshold per skill)."),
                io.Float.Input("threshold", default=0.28, min=-1.0, max=1.0, step=0.005,
                               tooltip="Cosine to keep (LAION used 0.28 with ViT-B/32). Also per_skill's default."),
                io.Float.Input("keep_fraction", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="keep_fraction: the share of each skill to keep."),
                io.Int.Input("top_k", default=1, min=1, max=64, tooltip="top_k_per_prompt: images kept per prompt."),
                io.Float.Input("floor", default=-1.0, min=-1.0, max=1.0, step=0.005,
                               tooltip="In every mode, drop scores below this (-1: no floor)."),
                io.String.Input("per_skill", default="", tooltip="per_skill: e.g. 'spatial=0.3, countbench=0.25'."),
                io.Float.Input("dedup_cosine", default=_FILTER["dedup_cosine"].default, min=0.0, max=1.0, step=0.005,
                               tooltip="Two images of a skill closer than this are near-duplicates (0: off)."),
                io.Float.Input("min_pixel_std", default=_FILTER["min_pixel_std"].default, min=0.0, max=255.0,
                               tooltip="Images flatter than this (grey-level std) are blank."),
            ],
            outputs=[Dataset.Output("dataset_out", display_name="dataset", tooltip="The same dataset, now filtered."),
                     io.String.Output("stats", display_name="stats", tooltip="Kept and dropped, per skill and reason."),
                     io.Image.Output("histogram", display_name="histogram", tooltip="Score histogram.")],
        )

    @classmethod
    def execute(cls, dataset: dict, clip: ScorerConfig, mode: str, threshold: float, keep_fraction: float, top_k: int,
                floor: float, per_skill: str, dedup_cosine: float, min_pixel_std: float) -> io.NodeOutput:
        config = FilterConfig(mode=mode, threshold=threshold, keep_fraction=keep_fraction, top_k=top_k,
                              floor=None if floor <= -1.0 else floor, per_skill=parse_per_skill(per_skill),
                              dedup_cosine=dedup_cosine, min_pixel_std=min_pixel_std)
        with load_scorer(clip) as scorer:
            report = filter_dataset(dataset["path"], scorer, config, progress=progress_callback(1, "filter"),
                                    should_stop=interrupted)
        raise_if_interrupted()
        lines = [f"kept {report.kept} of {report.total}; dropped {report.dropped} {report.reasons}"]
        lines += [f"{skill}: kept {s['kept']}/{s['total']} {s['dropped']}" for skill, s in report.per_skill.items()]
        if report.score_stats:
            lines.append("scores min {min:.3f} mean {mean:.3f} max {max:.3f}".format(**report.score_stats))
        text = "\n".join(lines + [f"warning: {w}" for w in report.warnings])
        return io.NodeOutput(dataset, text, _image(report.histogram), ui=ui.PreviewText(text))


class SelmaReviewDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaReviewDataset", display_name="SELMA Review Dataset", category=CATEGORY,
            description="Opens the dataset as a gallery inside the editor: thumbnail, caption, CLIP score, keep state. "
            "Click an image to keep or reject it; your choice is saved in metadata.jsonl (review) and training "
            "follows it over the filter.",
            inputs=[Dataset.Input("dataset", tooltip="A SELMA dataset, usually after SELMA Score & Filter Dataset.")],
            outputs=[Dataset.Output("dataset_out", display_name="dataset", tooltip="The same dataset, for training.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, dataset: dict) -> str:
        meta = Path(dataset["path"]) / "metadata.jsonl"
        return f"{dataset['path']}|{meta.stat().st_mtime_ns if meta.exists() else 0}"

    @classmethod
    def execute(cls, dataset: dict) -> io.NodeOutput:
        # The web extension (web/js/selma_review.js) draws the gallery from this ui entry.
        return io.NodeOutput(dataset, ui={"selma_review": [dataset_key(dataset["path"])]})
