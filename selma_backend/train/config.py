"""``TrainConfig``: how one LoRA expert is trained (stage 4), shared by the CLI, the node and the tests.

Defaults are SELMA's recipe (paper, section 4 and appendix): rank = alpha = 128 on the UNet attention
projections, AdamW at 3e-4 constant without warmup, effective batch 64 (``batch_size x grad_accum``),
5,000 steps at 512 px for SD 1.x/2.x; SDXL at 1024 px, effective batch 32, 10,000 steps. The fields
left ``None`` take the architecture's default in :meth:`TrainConfig.resolved`. The config is written
into every checkpoint and into the exported LoRA's ``selma.provenance``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import invalid
from ..registry import Registry

#: LoRA target presets: leaf-name suffixes of the UNet modules that get a LoRA.
PRESETS: Registry[tuple[str, ...]] = Registry("preset")
PRESETS.add("selma", ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                      "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"))
PRESETS.add("attn+ff", (*PRESETS.get("selma"), "ff.net.0.proj", "ff.net.2"))
PRESETS.add("full", (*PRESETS.get("attn+ff"), "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj",
                     "conv_shortcut"))
#: Text-encoder LoRA targets (HF CLIPTextModel), used when ``text_encoder_lora`` is on.
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

#: Learning-rate schedules: our name -> diffusers.optimization.get_scheduler name (warm-up from ``warmup_steps``).
LR_SCHEDULE_REGISTRY: Registry[str] = Registry("lr_schedule")
for _name in ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial"):
    LR_SCHEDULE_REGISTRY.add(_name, _name)
LR_SCHEDULES = tuple(LR_SCHEDULE_REGISTRY.names())
OPTIMIZERS = ("adamw", "adamw8bit")  # implementations: loop.OPTIMIZER_REGISTRY
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # auto: bf16 on cuda if supported, else fp16 on cuda, no on cpu
AUTOCAST = ("auto", "on", "off")  # auto: off with bf16 weights (faster, same loss on an H200), on with fp16
MEMORY_FORMATS = ("contiguous", "channels_last")  # channels_last was slower on an H200 (2026-11-30)
FLIP_MODES = ("skill", "never", "allow", "swap_left_right")  # skill: each skill's own flip policy
SCORE_WEIGHTING = ("none", "clip")
EXPORT_FORMATS = ("kohya", "peft")

#: Architecture defaults for fields left ``None``: (resolution, steps, batch_size, grad_accum).
ARCH_DEFAULTS: dict[str, tuple[int, int, int, int]] = {
    "sd1": (512, 5000, 8, 8),
    "sd2": (512, 5000, 8, 8),
    "sdxl": (1024, 10000, 4, 8),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of one expert's training run (see the module doc for the defaults).

    rank / alpha / dropout: LoRA shape; scale = alpha / rank.
    preset: which UNet modules get a LoRA (``PRESETS``); text_encoder_lora: also the text encoder(s)
        (their outputs then cannot be cached).
    steps / batch_size / grad_accum / resolution: ``None`` -> the architecture default.
    lr / lr_schedule / warmup_steps / optimizer / weight_decay / max_grad_norm (0 = no clipping).
    min_snr_gamma: Min-SNR-gamma loss weighting (Hang et al. 2023; 5.0 is the paper's value), 0 = off.
    noise_offset: Crosslight's noise offset (0 = off; 0.05-0.1 typical).
    flip: horizontal-flip augmentation: each skill's policy, or forced for all datasets.
    score_weighting: ``clip`` weighs each sample's loss by its S3 CLIP score (normalised to mean 1).
    buckets: aspect-ratio buckets (images of other shapes keep their shape at about the same area).
    mixed_precision: base weights in fp16/bf16, LoRA weights and optimizer always fp32.
    autocast: with fp16/bf16 base weights, ``on`` runs the UNet under autocast (norms in fp32), ``off``
        in the base dtype throughout (the fp32 LoRA factors cast on use, their gradients fp32);
        ``auto`` is off with bf16 (12 % faster and 23 % less memory on an H200, the same loss curve)
        and on with fp16, whose narrow range the fp32 norms protect.
    memory_format: the UNet's activation layout while training.
    checkpoint_every / keep_checkpoints: resumable state every N optimizer steps, the last K kept.
    validation_every / validation_prompts: a grid of fixed prompts and seeds every N steps.
    """

    rank: int = 128
    alpha: float = 128.0
    dropout: float = 0.0
    preset: str = "selma"
    text_encoder_lora: bool = False
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    resolution: int | None = None
    lr: float = 3e-4
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    flip: str = "skill"
    score_weighting: str = "none"
    buckets: bool = True
    mixed_precision: str = "auto"
    autocast: str = "auto"
    memory_format: str = "contiguous"
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validation_every: int = 0
    validation_prompts: tuple[str, ...] = ()
    validation_steps: int = 20
    export_format: str = "kohya"

    def __post_init__(self) -> None:
        if isinstance(self.validation_prompts, list):
            object.__setattr__(self, "validation_prompts", tuple(self.validation_prompts))
        self._check_choices()
        self._check_numbers()

    def _check_choices(self) -> None:
        if self.preset not in PRESETS:
            raise invalid("preset", self.preset, PRESETS.names())
        for name, allowed in (("lr_schedule", LR_SCHEDULES), ("optimizer", OPTIMIZERS),
                              ("mixed_precision", MIXED_PRECISION), ("autocast", AUTOCAST),
                              ("memory_format", MEMORY_FORMATS), ("flip", FLIP_MODES),
                              ("score_weighting", SCORE_WEIGHTING), ("export_format", EXPORT_FORMATS)):
            if getattr(self, name) not in allowed:
                raise invalid(name, getattr(self, name), allowed)
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise invalid(f.name, getattr(self, f.name), [True, False])
        if not all(isinstance(p, str) and p.strip() for p in self.validation_prompts):
            raise invalid("validation_prompts", self.validation_prompts, "non-empty strings")

    def _check_numbers(self) -> None:
        positive_ints = ("rank", "steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                         "validation_steps")
        for name in positive_ints:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise invalid(name, value, "an integer >= 1" + (" or None (architecture default)"
                                                                if name in ("steps", "batch_size", "grad_accum") else ""))
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 64
                                            or self.resolution % 64):
            raise invalid("resolution", self.resolution, "a multiple of 64, >= 64, or None (512 SD 1.x/2.x, 1024 SDXL)")
        for name in ("warmup_steps", "validation_every", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise invalid(name, value, "an integer >= 0")
        for name in ("lr", "alpha"):
            if not float(getattr(self, name)) > 0:
                raise invalid(name, getattr(self, name), "a number > 0")
        for name in ("weight_decay", "max_grad_norm", "min_snr_gamma", "noise_offset"):
            if not float(getattr(self, name)) >= 0:
                raise invalid(name, getattr(self, name), "a number >= 0 (0 turns it off)")
        if not 0 <= self.dropout < 1:
            raise invalid("dropout", self.dropout, "0 <= dropout < 1")
        if self.validation_every and not self.validation_prompts:
            raise invalid("validation_prompts", self.validation_prompts, "at least one prompt when validation_every > 0")

    def resolved(self, arch: str) -> TrainConfig:
        """This config with every ``None`` replaced by the architecture's default."""
        if arch not in ARCH_DEFAULTS:
            raise invalid("arch", arch, list(ARCH_DEFAULTS))
        res, steps, batch, accum = ARCH_DEFAULTS[arch]
        return replace(self, resolution=self.resolution or res, steps=self.steps or steps,
                       batch_size=self.batch_size or batch, grad_accum=self.grad_accum or accum)

    @property
    def effective_batch(self) -> int:
        return (self.batch_size or 0) * (self.grad_accum or 0)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["validation_prompts"] = list(self.validation_prompts)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise invalid("train config keys", unknown, sorted(known))
        return cls(**data)
