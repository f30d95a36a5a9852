"""Configurations bundled with the pack, written from the published architecture numbers (never fetched).

- ``clip_l_text.json``: OpenAI CLIP ViT-L/14 text tower (SD 1.x ``text_encoder``, SDXL ``text_encoder``);
- ``openclip_h_text.json``: OpenCLIP ViT-H/14 text tower as SD 2.x uses it (23 of its 24 layers: the
  penultimate layer's output, as diffusers' SD 2 folders configure it);
- ``openclip_bigg_text.json``: OpenCLIP ViT-bigG/14 text tower with its projection (SDXL ``text_encoder_2``);
- ``vae_sd.json``: the SD / SDXL autoencoder (``AutoencoderKL``);
- ``scheduler_sd.json``: SD's training noise schedule (scaled_linear betas 0.00085 -> 0.012, 1000 steps).

Keys starting with ``_`` are notes for people, dropped by :func:`bundled_config`.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent


@cache
def _read(name: str) -> str:
    return (HERE / f"{name}.json").read_text(encoding="utf-8")


def bundled_config(name: str) -> dict[str, Any]:
    """A fresh copy of the bundled config ``name`` (file stem), without its ``_`` notes."""
    return {k: v for k, v in json.loads(_read(name)).items() if not k.startswith("_")}
