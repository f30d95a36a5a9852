"""The world's text-to-image model: a small Stable Diffusion (UNet + VAE + CLIP text encoder + tokenizer).

The parts are diffusers' and transformers' own classes at small width, saved as a diffusers
``StableDiffusionPipeline`` folder that :func:`selma_backend.models.loader.load_pipeline` opens like
any SD 1.x folder, so every SELMA stage (render, filter, train, merge, evaluate) runs on it unchanged.

- Text encoder: the text tower of the shipped world CLIP (:data:`.clip_eval.WORLD_CLIP`), converted
  from open_clip's layout to transformers' ``CLIPTextModel`` (the conversion SD 2's checkpoints use)
  and frozen, as SD's text encoder is. Its context is 32 tokens (the tokenizer says so).
- VAE: ``AutoencoderKL`` with three levels, so a 64 px image is a 4 x 16 x 16 latent (``vae_scale_factor`` 4);
  one normalisation group (per-channel groups normalise a flat colour away) and no mid-block attention.
- UNet: ``UNet2DConditionModel`` with cross-attention at the two finer levels; the attention projections
  are named as SD's, so SELMA's ``selma`` LoRA preset targets them.
- Scheduler: SD's training betas (``scaled_linear`` 0.00085 -> 0.012, 1000 steps), epsilon prediction.

Presets (:data:`SD_PRESETS`): ``large`` (the shipped ``world-sd``), ``small`` (``world-sd-small``, the
weak model of the weak-to-strong experiment) and ``tiny`` (tests: seconds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..clip_tokenizer import write_clip_tokenizer
from ..errors import invalid

ASSETS = Path(__file__).parent / "assets"
WORLD_SD = ASSETS / "world-sd"
WORLD_SD_SMALL = ASSETS / "world-sd-small"
RESOLUTION = 64  # pixels: the world's native size and the pipelines' default (unet sample_size x 4)
LATENT = RESOLUTION // 4
CONTEXT = 32  # tokens: the world CLIP's context length
RECORD_FILE = "world_sd.json"
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _unet(widths: tuple[int, ...], layers: int, heads: int, text_width: int) -> dict[str, Any]:
    n = len(widths)
    return {"sample_size": LATENT, "in_channels": 4, "out_channels": 4, "block_out_channels": widths,
            "layers_per_block": layers,
            "down_block_types": ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            "cross_attention_dim": text_width, "attention_head_dim": heads, "norm_num_groups": 32}


def _vae(widths: tuple[int, ...]) -> dict[str, Any]:
    n = len(widths)
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": widths,
            "down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n,
            "layers_per_block": 1, "norm_num_groups": 1, "mid_block_add_attention": False, "sample_size": RESOLUTION}


#: name -> (UNet config, VAE config). ``heads`` is diffusers' legacy ``attention_head_dim`` (= heads, SD 1.x).
SD_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "large": (_unet((64, 128, 128), 1, 4, 64), _vae((16, 32, 64))),
    "small": (_unet((32, 64, 64), 1, 2, 64), _vae((16, 32, 64))),
    "tiny": (_unet((32, 32, 32), 1, 2, 64), _vae((16, 16, 16))),
}


def text_config(clip_cfg: dict[str, Any]) -> Any:
    """transformers ``CLIPTextConfig`` equal to an open_clip text tower config (``model_cfg['text_cfg']``)."""
    from transformers import CLIPTextConfig

    t = clip_cfg["text_cfg"]
    return CLIPTextConfig(vocab_size=t["vocab_size"], max_position_embeddings=t["context_length"],
                          hidden_size=t["width"], intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
                          num_hidden_layers=t["layers"], num_attention_heads=t["heads"],
                          projection_dim=clip_cfg["embed_dim"], hidden_act="gelu", layer_norm_eps=1e-5,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


def convert_text_tower(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """open_clip text-tower tensors -> ``CLIPTextModel`` state dict (names as diffusers' SD 2 converter).

    open_clip packs q, k, v in one ``in_proj``; transformers keeps three linears. The pooled projection
    (``text_projection``) is not part of ``CLIPTextModel`` and is dropped: SD reads the hidden states.
    """
    out = {"text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
           "text_model.final_layer_norm.weight": state["ln_final.weight"],
           "text_model.final_layer_norm.bias": state["ln_final.bias"]}
    pairs = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(layers):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for a, b in pairs.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.in_proj_{p}"].chunk(3), strict=True):
                out[f"{dst}self_attn.{name}.{p}"] = part
    return {k: v.float().contiguous() for k, v in out.items()}


def load_text_encoder(clip_folder: str | os.PathLike[str]) -> Any:
    """The world CLIP's text tower as a frozen fp32 ``CLIPTextModel`` (eval mode)."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    folder = Path(clip_folder)
    cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))["model_cfg"]
    model = CLIPTextModel(text_config(cfg))
    state = load_file(str(folder / "open_clip_model.safetensors"))
    converted = convert_text_tower(state, cfg["text_cfg"]["layers"])
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 drops the prefix
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if unexpected or [k for k in missing if "position_ids" not in k]:
        raise RuntimeError(f"text tower conversion: missing {missing}, unexpected {unexpected}")
    return model.eval().requires_grad_(False)


def write_tokenizer(folder: Path) -> Path:
    """SD 1.x's CLIP tokenizer files with a ``CONTEXT``-token window (pads with ``!``, id 0, as open_clip)."""
    write_clip_tokenizer(folder, pad_token="!")
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["model_max_length"] = CONTEXT
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return folder


def build_unet(preset: str) -> Any:
    from diffusers import UNet2DConditionModel

    if preset not in SD_PRESETS:
        raise invalid("preset", preset, list(SD_PRESETS))
    return UNet2DConditionModel(**SD_PRESETS[preset][0])


def build_vae(preset: str) -> Any:
    from diffusers import AutoencoderKL

    if preset not in SD_PRESETS:
        raise invalid("preset", preset, list(SD_PRESETS))
    return AutoencoderKL(**SD_PRESETS[preset][1])


def save_pipeline(out: Path, unet: Any, vae: Any, text_encoder: Any) -> Path:
    """Write the parts as a diffusers SD folder (fp16 safetensors; diffusers casts up when loading in fp32)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    tok_dir = write_tokenizer(out / ".tok")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    scheduler = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    for part in ("unet", "vae"):  # a reused part (train-sd --vae-from) records the path this machine read it from
        config_file = out / part / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.pop("_name_or_path", None) is not None:
            config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    pipe.to(torch.float32)
    import shutil

    shutil.rmtree(out / "tokenizer")
    shutil.move(str(tok_dir), str(out / "tokenizer"))
    return out
