"""What a loaded text-to-image model is, for every stage that uses one.

``selma_backend.models.loader.load_pipeline(ModelConfig) -> LoadedPipeline`` builds it from a
diffusers folder or a single-file checkpoint; render (S2), train (S4) and eval (S6) take it.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Literal

Arch = Literal["sd1", "sd2", "sdxl"]
ARCHS: tuple[str, ...] = ("sd1", "sd2", "sdxl")


@dataclass
class LoadedPipeline:
    """A diffusers pipeline plus the facts every stage records about the model it came from."""

    pipe: Any  # diffusers StableDiffusionPipeline | StableDiffusionXLPipeline
    arch: Arch
    prediction_type: Literal["epsilon", "v_prediction"]
    model_hash: str  # sha256 of the weights file(s): recorded in dataset.json and LoRA metadata
    source: str  # the path it was loaded from
    info: dict[str, Any] = field(default_factory=dict)  # anything else worth recording (dtype, device, …)

    def release(self) -> None:
        """Drop the pipeline and return its memory (heavy models are released between stages)."""
        self.pipe = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover - torch is always there in practice
            pass

    def __enter__(self) -> LoadedPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
