"""Stage 4 node: train one LoRA expert per dataset on the SELMA model; files in models/loras/selma/."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..selma_backend.models.config import ModelConfig
from ..selma_backend.models.loader import load_pipeline
from ..selma_backend.paths import safe_join, slug
from ..selma_backend.train import PRESETS, TrainConfig, train_experts
from ..selma_backend.train.config import FLIP_MODES, LR_SCHEDULES, MIXED_PRECISION, SCORE_WEIGHTING
from ..selma_backend.train.plot import loss_plot
from .glue import (
    CATEGORY,
    free_memory,
    interrupted,
    io,
    loras_root,
    output_dir,
    preview_progress,
    raise_if_interrupted,
    send_event,
    ui,
    user_dir,
)
from .render import Dataset, Model

Loras = io.Custom("SELMA_LORAS")
_T = TrainConfig.__dataclass_fields__
EXTRA_DATASETS = 3  # dataset_2 .. dataset_4


def _image(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


class _Progress:
    """Progress bar with the live loss curve as its preview, throttled ``selma.progress`` events (stage "train",
    label = the expert, with the loss) and a ``selma.train`` event per step."""

    def __init__(self, steps: int) -> None:
        self.update = preview_progress(steps, "train")
        self.points: list[tuple[int, float]] = []
        self.last = 0.0

    def __call__(self, info: dict) -> None:
        self.points.append((info["step"], info["loss"]))
        now = time.monotonic()
        picture = None
        if now - self.last > 2.0 or info["step"] == info["steps"]:
            self.last = now
            picture = loss_plot([s for s, _ in self.points], [v for _, v in self.points], f"{info['expert']}: loss")
        self.update(info["step"], info["steps"], picture, label=info["expert"], loss=info["loss"])
        send_event("train", {"expert": info["expert"], "step": info["step"], "steps": info["steps"],
                             "loss": info["loss"], "lr": info["lr"]}, to_client=True)


class SelmaTrainExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaTrainExperts", display_name="SELMA Train Experts", category=CATEGORY,
            description="Stage 4: train one LoRA expert per dataset (one skill each) on the SELMA model, the base loaded "
            "once. Defaults are the paper's recipe (rank = alpha = 128, lr 3e-4, effective batch 64, 5,000 steps at "
            "512 px; SDXL 1024 px, batch 32, 10,000 steps). Files go to models/loras/selma/<name>/<skill>.safetensors "
            "(kohya layout, for Load LoRA, A1111/Forge, diffusers); checkpoints, loss.csv and validation grids to "
            "output/selma/train/<name>/. Cancel writes a checkpoint; queue again with resume on to continue.",
            inputs=[
                Model.Input("model", tooltip="From SELMA Load Model."),
                Dataset.Input("dataset", tooltip="A skill dataset (rendered, filtered, reviewed)."),
                *[Dataset.Input(f"dataset_{k}", optional=True, tooltip="Another skill's dataset: one more expert.")
                  for k in range(2, 2 + EXTRA_DATASETS)],
                io.String.Input("name", default="experts", tooltip="Folder under models/loras/selma/ for the expert files."),
                io.Int.Input("steps", default=0, min=0, max=1_000_000, tooltip="Optimizer steps; 0: 5,000 (SDXL 10,000)."),
                io.Int.Input("rank", default=_T["rank"].default, min=1, max=1024, tooltip="LoRA rank."),
                io.Float.Input("alpha", default=_T["alpha"].default, min=0.01, max=4096.0, step=0.01,
                               tooltip="LoRA alpha; the update is scaled by alpha / rank."),
                io.Float.Input("learning_rate", default=_T["lr"].default, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate."),
                io.Int.Input("batch_size", default=0, min=0, max=1024, tooltip="Images per micro-batch; 0: 8 (SDXL 4)."),
                io.Int.Input("grad_accum", default=0, min=0, max=1024,
                             tooltip="Micro-batches per step (effective batch = batch × this); 0: 8."),
                io.Int.Input("resolution", default=0, min=0, max=4096, step=64, tooltip="Training size; 0: 512 (SDXL 1024)."),
                io.Combo.Input("preset", options=PRESETS.names(), default=_T["preset"].default,
                               tooltip="selma: UNet attention q/k/v/out (the paper); attn+ff adds feed-forward; full adds convolutions."),
                io.Boolean.Input("text_encoder_lora", default=False, tooltip="Also train the text encoder(s) (no text cache then)."),
                io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default=_T["lr_schedule"].default,
                               tooltip="Learning-rate schedule."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100_000, tooltip="Warm-up steps of the schedule."),
                io.Float.Input("min_snr_gamma", default=0.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Min-SNR-γ loss weighting; 0: off, 5: the paper's value."),
                io.Float.Input("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Noise offset; 0: off."),
                io.Combo.Input("flip", options=list(FLIP_MODES), default=_T["flip"].default,
                               tooltip="Horizontal flips: skill = each skill's policy (spatial skills swap left/right in the caption)."),
                io.Combo.Input("score_weighting", options=list(SCORE_WEIGHTING), default=_T["score_weighting"].default,
                               tooltip="clip: weigh each image's loss by its CLIP score from the filter."),
                io.Combo.Input("mixed_precision", options=list(MIXED_PRECISION), default=_T["mixed_precision"].default,
                               tooltip="Base weights in bf16/fp16 (LoRA weights stay fp32); auto: bf16 or fp16 on GPU, off on CPU."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Less memory, about 30% slower."),
                io.Int.Input("checkpoint_every", default=_T["checkpoint_every"].default, min=1, max=100_000,
                             tooltip="Write a resumable checkpoint every N steps."),
                io.Int.Input("validation_every", default=0, min=0, max=100_000,
                             tooltip="Render the validation prompts every N steps (0: never)."),
                io.String.Input("validation_prompts", multiline=True, default="",
                                tooltip="One prompt per line, rendered with fixed seeds into a grid."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Training seed (LoRA init, noise, data order)."),
                io.Boolean.Input("resume", default=True, tooltip="Continue an unfinished run from its last checkpoint; "
                                 "finished experts are skipped."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace existing expert files (off: an error instead)."),
            ],
            outputs=[Loras.Output("experts", display_name="experts", tooltip="The expert files, for merging and evaluation."),
                     io.String.Output("lora_names", display_name="lora_names",
                                      tooltip="Their names in the loras list (one per line), for Load LoRA."),
                     io.Image.Output("loss_plot", display_name="loss_plot", tooltip="The loss curve of each expert."),
                     io.String.Output("report", display_name="report", tooltip="Steps, final loss, speed, files.")],
        )

    @classmethod
    def execute(cls, model: ModelConfig, dataset: dict, name: str, steps: int, rank: int, alpha: float,
                learning_rate: float, batch_size: int, grad_accum: int, resolution: int, preset: str,
                text_encoder_lora: bool, lr_schedule: str, warmup_steps: int, min_snr_gamma: float, noise_offset: float,
                flip: str, score_weighting: str, mixed_precision: str, gradient_checkpointing: bool,
                checkpoint_every: int, validation_every: int, validation_prompts: str, seed: int, resume: bool,
                overwrite: bool, **more: dict) -> io.NodeOutput:
        config = TrainConfig(
            rank=rank, alpha=alpha, lr=learning_rate, steps=steps or None, batch_size=batch_size or None,
            grad_accum=grad_accum or None, resolution=resolution or None, preset=preset, text_encoder_lora=text_encoder_lora,
            lr_schedule=lr_schedule, warmup_steps=warmup_steps, min_snr_gamma=min_snr_gamma, noise_offset=noise_offset,
            flip=flip, score_weighting=score_weighting, mixed_precision=mixed_precision,
            gradient_checkpointing=gradient_checkpointing, checkpoint_every=checkpoint_every,
            validation_every=validation_every, seed=seed,
            validation_prompts=tuple(p.strip() for p in validation_prompts.splitlines() if p.strip()))
        datasets = [dataset["path"]] + [more[f"dataset_{k}"]["path"] for k in range(2, 2 + EXTRA_DATASETS)
                                        if more.get(f"dataset_{k}")]
        folder = slug(name)
        out = safe_join(loras_root() / "selma", folder, field="name")
        work = safe_join(output_dir() / "selma" / "train", folder, field="name")
        free_memory()  # ComfyUI's own models out of the way before ours loads
        with load_pipeline(model) as lp:
            results = train_experts(lp, datasets, out, config, work_root=work, resume=resume, overwrite=overwrite,
                                    on_log=_Progress(config.resolved(lp.arch).steps * len(datasets)),
                                    should_stop=interrupted, user_dir=user_dir())
        raise_if_interrupted()
        return cls._outputs(results, out)

    @classmethod
    def _outputs(cls, results: list, out: Path) -> io.NodeOutput:
        paths = [r.path for r in results if r.path]
        names = "\n".join(Path(p).relative_to(loras_root()).as_posix() for p in paths)
        plots = [Image.open(r.loss_plot) for r in results if r.loss_plot]
        image = torch.cat([_image(p) for p in plots]) if plots else torch.zeros(1, 64, 64, 3)
        lines = []
        for r in results:
            state = "already trained, skipped" if r.skipped else f"{r.steps} steps, final loss {r.final_loss:.4f}, " \
                    f"{r.samples_per_s:.2f} samples/s"
            lines.append(f"{r.name}: {r.samples} images, {state} → {r.path}")
        text = "\n".join(lines)
        return io.NodeOutput(paths, names, image, text, ui=ui.PreviewText(text))
