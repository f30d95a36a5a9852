"""The base models a LoRA is made for: their UNet configs, and reading the base back from a LoRA file.

A LoRA file rarely carries its base model's UNet config, yet converting PEFT/diffusers or ComfyUI-native
names to kohya names needs one (SDXL's kohya names are LDM paths). ``BASE_UNET_CONFIGS`` holds the fields
:class:`~.names.LoraArch` and the shape helpers need, copied from the public ``unet/config.json`` of
SD 1.5, SD 2.x and SDXL base 1.0. Smaller test UNets of the same family are prefixes of these (same
block indices at the top levels), so their module names map through the same presets.

The base of a file comes from its metadata (kohya's ``ss_base_model_version``, SELMA's provenance) or,
without metadata, from its tensor shapes: the cross-attention width (768 / 1024 / 2048) and the text
encoder prefixes (``lora_te1_``/``lora_te2_`` only in SDXL files).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import invalid
from .names import BASE_VERSIONS, BaseVersion, LoraArch, NameMap

_SD_LEVELS = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
BASE_UNET_CONFIGS: dict[str, dict[str, Any]] = {
    "sd_v1": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "down_block_types": _SD_LEVELS,
              "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 768,
              "transformer_layers_per_block": 1},
    "sd_v2": {"block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2, "down_block_types": _SD_LEVELS,
              "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "cross_attention_dim": 1024,
              "transformer_layers_per_block": 1},
    "sdxl_base_v1-0": {"block_out_channels": (320, 640, 1280), "layers_per_block": 2,
                       "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                       "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                       "cross_attention_dim": 2048, "transformer_layers_per_block": (1, 2, 10)},
}
#: Cross-attention context width -> base (what ``attn2.to_k`` reads).
_CONTEXT_WIDTH = {768: "sd_v1", 1024: "sd_v2", 2048: "sdxl_base_v1-0"}
#: Text-encoder width (CLIP-L / OpenCLIP-H) of a ``lora_te_`` file -> base.
_TEXT_WIDTH = {768: "sd_v1", 1024: "sd_v2"}
#: Other spellings of the base seen in ``ss_base_model_version`` (kohya writes e.g. "sd_v1", "sd_v2_768_v").
_SDXL_TEXT = ("lora_te1_", "lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")
_CROSS_KEY = re.compile(r"attn2[._]to_k\.(lora_down|lora_A)\.weight$")
_TEXT_Q_KEY = re.compile(r"q_proj\.(lora_down|lora_A)\.weight$")
_ALIASES = {"sd_v2_768_v": "sd_v2", "sd_v2_512": "sd_v2", "sdxl_base_v0-9": "sdxl_base_v1-0", "sd_v1.5": "sd_v1"}


def base_arch(base: str, unet_names: str = "kohya") -> LoraArch:
    """The :class:`LoraArch` of a base model version (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``)."""
    if base not in BASE_UNET_CONFIGS:
        raise invalid("base", base, BASE_VERSIONS, "name the base model the LoRA was trained on")
    return LoraArch.from_unet_config(BASE_UNET_CONFIGS[base], base, unet_names)  # type: ignore[arg-type]


def base_names(base: str) -> NameMap:
    """Names of ``base``'s UNet, plus those of same-family UNets with attention at every level.

    Test and distilled UNets of a family (the mini SD 1.5 checkpoint: one level, with attention on the
    decoder side) keep the block indices of the full model's top levels but may have attention where it
    has none; their modules map by this table too, while every module of the real base keeps its own name.
    """
    real = base_arch(base)
    n = len(real.down_block_types)
    wide = LoraArch(real.base, ("CrossAttnDownBlock2D",) * n, ("CrossAttnUpBlock2D",) * n, real.layers_per_block,
                    real.transformer_depth, real.unet_names)
    return NameMap(real).extended(NameMap(wide))


def attention_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every ``attn1``/``attn2`` ``to_q/to_k/to_v/to_out.0`` of an SD-family UNet config.

    Keys are diffusers module names (``down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k``): the
    LoRA targets of SELMA's preset. Width of a level: ``block_out_channels[level]`` (decoder: reversed);
    ``attn2``'s keys and values read the text context (``cross_attention_dim``).
    """
    widths, ctx = tuple(config["block_out_channels"]), int(config["cross_attention_dim"])
    depth = config.get("transformer_layers_per_block", 1)
    depth = (depth,) * len(widths) if isinstance(depth, int) else tuple(depth)
    lpb = int(config["layers_per_block"])
    blocks: list[tuple[str, int, int]] = []  # (transformer path, width, depth)
    for x, kind in enumerate(config["down_block_types"]):
        if kind.startswith("CrossAttn"):
            blocks += [(f"down_blocks.{x}.attentions.{i}", widths[x], depth[x]) for i in range(lpb)]
    blocks.append(("mid_block.attentions.0", widths[-1], depth[-1]))
    for x, kind in enumerate(config["up_block_types"]):
        if kind.startswith("CrossAttn"):
            w, d = widths[::-1][x], depth[::-1][x]
            blocks += [(f"up_blocks.{x}.attentions.{i}", w, d) for i in range(lpb + 1)]
    shapes: dict[str, tuple[int, int]] = {}
    for path, c, d in blocks:
        for t in range(d):
            for attn, kv in (("attn1", c), ("attn2", ctx)):
                stem = f"{path}.transformer_blocks.{t}.{attn}"
                shapes.update({f"{stem}.to_q": (c, c), f"{stem}.to_k": (c, kv), f"{stem}.to_v": (c, kv),
                               f"{stem}.to_out.0": (c, c)})
    return shapes


def base_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The base named by a file's metadata: ``selma.provenance``'s ``base`` or kohya's ``ss_base_model_version``."""
    raw = metadata.get("selma.provenance")
    if raw:
        try:
            base = json.loads(raw).get("base")
        except (json.JSONDecodeError, AttributeError):
            base = None
        if base in BASE_VERSIONS:
            return base
    base = metadata.get("ss_base_model_version", "").strip()
    base = _ALIASES.get(base, base)
    return base if base in BASE_VERSIONS else None


def base_from_shapes(tensors: Mapping[str, torch.Tensor]) -> BaseVersion | None:
    """The base that LoRA tensors (any layout) fit, from shapes alone; None when they fit no full-size base."""
    if any(k.startswith(_SDXL_TEXT) for k in tensors):
        return "sdxl_base_v1-0"
    for key, t in tensors.items():
        if _CROSS_KEY.search(key) and t.dim() == 2:
            return _CONTEXT_WIDTH.get(int(t.shape[1]))  # type: ignore[return-value]
    for key, t in tensors.items():
        if _TEXT_Q_KEY.search(key) and t.dim() == 2:
            return _TEXT_WIDTH.get(int(t.shape[1]))  # type: ignore[return-value]
    return None
