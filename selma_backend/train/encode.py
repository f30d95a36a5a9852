"""The frozen encoders of a pipeline as training needs them: captions -> text conditioning,
images -> scaled VAE latents. Used once per item by the cache, and every step when the text encoder
itself is trained (or by the reference loop the benchmark compares against)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def encode_text(pipe: Any, arch: str, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Conditioning for ``captions`` the way the pipeline renders: ``(B, 77, D)`` hidden states and,
    for SDXL, ``(B, P)`` pooled text embeddings (None otherwise). Gradients flow when enabled."""
    device = pipe.unet.device
    if arch == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=list(captions), device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, _ = pipe.encode_prompt(list(captions), device, 1, False)
    return embeds, None


@torch.no_grad()
def encode_images(pipe: Any, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """``pixels (B, 3, H, W)`` in [-1, 1] -> latents ``(B, 4, H/8, W/8)`` scaled as the UNet sees them.

    ``sample=False`` takes the posterior mean (what is cached, as kohya does); ``True`` draws from it
    (what diffusers' train_text_to_image_lora.py does every step)."""
    vae = pipe.vae
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    dtype = torch.float32 if upcast else vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        dist = vae.encode(pixels.to(vae.device, dtype)).latent_dist
        latents = dist.sample(generator) if sample else dist.mean
    finally:
        if upcast:
            vae.to(torch.float16)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()


def add_time_ids(sizes: Sequence[tuple[int, int]], device: Any) -> torch.Tensor:
    """SDXL's size conditioning per image: (original h, w, crop top, left, target h, w) -> ``(B, 6)``.
    Our images are cropped to their bucket from a cover-resize, so original = target, crop = (0, 0)."""
    return torch.tensor([[h, w, 0, 0, h, w] for (w, h) in sizes], dtype=torch.float32, device=device)
