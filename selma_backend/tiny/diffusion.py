"""Tiny SD 1.x and SDXL diffusers pipeline folders (random weights, a few MB, milliseconds a step).

The architecture is the real one at toy width: the same block types, cross-attention, text
encoders, tokenizers (OpenAI CLIP's full 49408-token vocabulary) and beta schedule as
``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``, so code that
loads, renders, trains LoRAs on or converts those folders runs unchanged on these. The VAE keeps
SD's four levels (8x down-sampling), so a 64 px image is an 8x8 latent, as ``sample_size`` says.
Configs follow the tiny models of diffusers' own pipeline tests, written here as data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..clip_tokenizer import EOS, write_clip_tokenizer
from .common import publish_dir, seeded

PACKAGES = ("diffusers", "transformers")
LATENT_SIZE = 8  # 64 px / 8: the pipelines' default image size is 64 px

# SD 1.x: attention at the high-resolution level only (as SD's last level has none), 2 res blocks a level.
SD1_UNET = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,  # diffusers' legacy name: number of heads, as in SD 1.x's config
    "norm_num_groups": 32,
}
# SDXL: linear projections in the transformers, "text_time" added conditioning (pooled text + 6 size ints).
SDXL_TIME_EMBED_DIM = 8
SDXL_UNET = {
    "sample_size": LATENT_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
    "cross_attention_dim": 64,  # text_encoder hidden 32 + text_encoder_2 hidden 32, concatenated
    "norm_num_groups": 32,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 8 * LATENT_SIZE,
}
# CLIP text towers: OpenAI's vocabulary and context, toy width. ``quick_gelu`` as in CLIP ViT-L/14.
TEXT_ENCODER = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,  # SDXL reads the penultimate layer's output
    "num_attention_heads": 4,
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 1,
}
# SD's training schedule: "scaled_linear" betas 0.00085 -> 0.012 over 1000 steps.
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD1_SCHEDULER = {**SD_BETAS, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}  # PNDM, as SD 1.5
SDXL_SCHEDULER = {**SD_BETAS, "steps_offset": 1, "timestep_spacing": "leading", "interpolation_type": "linear"}  # Euler


def write_sd1(path: str | Path, seed: int = 0, *, force: bool = False) -> Path:
    """Write a tiny SD 1.x pipeline folder at ``path`` (loads with ``StableDiffusionPipeline``)."""
    return publish_dir(Path(path), "sd1", seed, PACKAGES, lambda tmp: _build_sd1(tmp, seed), force=force)


def write_sdxl(path: str | Path, seed: int = 0, *, force: bool = False) -> Path:
    """Write a tiny SDXL pipeline folder at ``path`` (loads with ``StableDiffusionXLPipeline``)."""
    return publish_dir(Path(path), "sdxl", seed, PACKAGES, lambda tmp: _build_sdxl(tmp, seed), force=force)


def _build_sd1(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    with seeded(seed):
        unet = UNet2DConditionModel(**SD1_UNET)
        vae = AutoencoderKL(**VAE, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / ".tok"), local_files_only=True)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler(**SD1_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    _save(pipe, out)
    _replace_tokenizer_files(out / "tokenizer", EOS)


def _build_sdxl(out: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    # The added embedding sees the pooled, projected text of encoder 2 and 6 time ids (sizes, crop).
    pooled_dim = TEXT_ENCODER["projection_dim"]
    with seeded(seed):
        unet = UNet2DConditionModel(**SDXL_UNET, projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + pooled_dim)
        vae = AutoencoderKL(**VAE, scaling_factor=0.13025)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / ".tok"), local_files_only=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=unet, scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False,
    )
    _save(pipe, out)
    _replace_tokenizer_files(out / "tokenizer", EOS)
    _replace_tokenizer_files(out / "tokenizer_2", "!")  # SDXL's second tokenizer pads with "!" (id 0), as open_clip


def _save(pipe: object, out: Path) -> None:
    """Save with diffusers' own writer (safetensors weights), then drop the scratch tokenizer folder."""
    pipe.save_pretrained(out, safe_serialization=True)  # type: ignore[attr-defined]
    shutil.rmtree(out / ".tok")


def _replace_tokenizer_files(folder: Path, pad_token: str) -> None:
    """Replace whatever the installed transformers saved with the plain CLIP files every version reads.

    transformers 5 saves a ``tokenizer.json`` only; older releases (and ComfyUI's own loaders) want
    ``vocab.json`` + ``merges.txt``, which is also what SD's published folders contain.
    """
    shutil.rmtree(folder)
    write_clip_tokenizer(folder, pad_token=pad_token)
