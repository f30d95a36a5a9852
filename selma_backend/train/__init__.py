"""Stage 4: train one LoRA expert per skill (diffusers + PEFT), with cached latents and text
conditioning, resumable checkpoints, validation grids and export through ``selma_backend.lora``."""

from .config import ARCH_DEFAULTS, PRESETS, TrainConfig
from .loop import TrainingDiverged
from .run import ExpertResult, plan, train_experts

__all__ = ["ARCH_DEFAULTS", "PRESETS", "TrainConfig", "TrainingDiverged", "ExpertResult", "plan", "train_experts"]
