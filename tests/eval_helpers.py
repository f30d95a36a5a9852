"""Helpers for the stage-6 tests: random kohya LoRA files for the tiny SD1 model (B non-zero)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from selma_backend.lora import LoraArch, kohya_metadata, peft_to_kohya, save_lora

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def random_lora(sd1: Path, out: Path, *, seed: int, rank: int = 4, alpha: float = 8.0, gain: float = 1.0,
                provenance: dict[str, Any] | None = None, text_encoder: bool = False) -> Path:
    """A kohya-layout LoRA for the tiny SD1 UNet (and optionally its text encoder), B not zero.

    ``gain`` multiplies every up (B) factor, so a test can make the LoRA's effect as large as it needs.
    """
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(sd1 / "unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False))
    state = {k: (v * gain if "lora_B" in k else v).detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder:
        gen = torch.Generator().manual_seed(seed)
        # Every projection kohya trains: diffusers (0.42) cannot infer the layout of a text-encoder LoRA
        # that has neither out_proj nor mlp modules ("Could not automatically infer state dict type").
        shapes = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (32, 32), "self_attn.v_proj": (32, 32),
                  "self_attn.out_proj": (32, 32), "mlp.fc1": (37, 32), "mlp.fc2": (32, 37)}  # (out, in)
        for layer in range(2):  # the tiny text encoder: hidden 32, MLP 37, 2 layers
            for leaf, (n_out, n_in) in shapes.items():
                m = f"text_encoder.text_model.encoder.layers.{layer}.{leaf}"
                state[f"{m}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) * 0.1
                state[f"{m}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.1 * gain
    arch = LoraArch.from_unet_config(unet.config, "sd_v1")
    kohya = peft_to_kohya(state, arch=arch, alpha_by_module=alpha)
    meta = kohya_metadata(arch=arch, rank=rank, alpha=alpha, provenance=provenance)
    return save_lora(out, kohya, meta)
