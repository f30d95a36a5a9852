"""``ModelConfig``: which checkpoint to load and how (dtype, device, attention, VAE memory savers).

One frozen dataclass, validated on construction, shared by the node, the CLI and the tests; the
loaded pipeline records it in ``LoadedPipeline.info["config"]``. Choices are data: the dropdowns
are built from ``DTYPES``, ``DEVICES``, ``PREDICTION_TYPES`` and the ``SCHEDULERS`` registry.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import invalid
from ..render.schedulers import SCHEDULERS

DTYPES = ("auto", "fp16", "bf16", "fp32")  # auto: fp16 on cuda/mps, fp32 on cpu
DEVICES = ("auto", "cuda", "mps", "cpu")  # auto: cuda, else mps, else cpu
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction")  # auto: what detect_architecture decided

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # torch pickles: refused unless allow_pickle


#: Used for single files when ``scheduler`` is empty: what the published SD 1.5 / 2.1 / SDXL-base
#: folders ship (their model_index.json). A diffusers folder keeps its own scheduler.
DEFAULT_SCHEDULER = {"sd1": "pndm", "sd2": "ddim", "sdxl": "euler"}


@dataclass(frozen=True)
class ModelConfig:
    """How to load a text-to-image checkpoint (see ``selma_backend.models.loader.load_pipeline``).

    path: a diffusers folder (with model_index.json) or a single-file checkpoint (.safetensors;
        .ckpt/.pt/.pth/.bin only with ``allow_pickle``).
    dtype / device: "auto" picks fp16 on cuda or mps and fp32 on cpu; cuda, else mps, else cpu.
    allow_pickle: opt in to torch pickle files, then read with ``torch.load(weights_only=True)``.
    compile: ``torch.compile`` the UNet in place (first render is slow, later ones faster).
    vae_slicing / vae_tiling: decode a batch one image at a time / in tiles (memory for big batches).
    prediction_type: override what the checkpoint is trained to predict (SD 2.x single files
        cannot always be told apart; see ``DetectedModel.prediction_reason``).
    scheduler: a name in ``SCHEDULERS``; empty keeps the folder's own or the architecture default.
    """

    path: str
    dtype: str = "auto"
    device: str = "auto"
    allow_pickle: bool = False
    compile: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    prediction_type: str = "auto"
    scheduler: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.path, os.PathLike):
            object.__setattr__(self, "path", os.fspath(self.path))
        if not isinstance(self.path, str) or not self.path.strip():
            raise invalid("path", self.path, "a diffusers folder or a .safetensors checkpoint",
                          "Pick a model from models/checkpoints or models/diffusers")
        for name, allowed in (("dtype", DTYPES), ("device", DEVICES), ("prediction_type", PREDICTION_TYPES)):
            if getattr(self, name) not in allowed:
                raise invalid(name, getattr(self, name), allowed)
        for f in fields(self):
            if f.type == "bool" and not isinstance(getattr(self, f.name), bool):
                raise invalid(f.name, getattr(self, f.name), [True, False])
        if self.scheduler and self.scheduler not in SCHEDULERS:
            raise invalid("scheduler", self.scheduler, ["", *SCHEDULERS.names()],
                          "Leave it empty to keep the model's own scheduler")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> str:
    """"auto" -> the best available device; an unavailable explicit choice is an error naming what is."""
    import torch

    available = ["cpu"]
    if torch.cuda.is_available():
        available.insert(0, "cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.insert(-1, "mps")
    if name == "auto":
        return available[0]
    if name not in available:
        raise invalid("device", name, ["auto", *available], f"This machine's torch ({torch.__version__}) has no {name}")
    return name


def resolve_dtype(name: str, device: str) -> Any:
    """"auto" -> fp16 on cuda/mps (half the memory, tensor cores), fp32 on cpu (fp16 kernels are slow there)."""
    import torch

    if name == "auto":
        name = "fp32" if device == "cpu" else "fp16"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]
