"""LDM (original Stable Diffusion) tensor names -> diffusers / transformers names, one key at a time.

Adapted from diffusers ``loaders/single_file_utils.py`` (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_open_clip_checkpoint``, ``DIFFUSERS_TO_LDM_MAPPING``;
diffusers 0.42) and ComfyUI's ``comfy/utils.py`` ``clip_text_transformers_convert`` (0.3.75),
rewritten as pure per-key renames: each converter returns which file keys it used and which it
skipped on purpose (with the reason), so the loader can prove that every tensor found a home — a
key no rule maps is an error, never a silently dropped layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Where each component lives in an LDM / SGM single file.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."  # CLIP-L, HF CLIPTextModel names
SD2_TEXT = "cond_stage_model.model."  # OpenCLIP-H, open_clip names
SD2_TEXT_SGM = "conditioner.embedders.0.model."  # the same, as SD 2.x saved by SGM code
SDXL_TEXT_L = "conditioner.embedders.0.transformer."  # CLIP-L, HF names
SDXL_TEXT_G = "conditioner.embedders.1.model."  # OpenCLIP-bigG, open_clip names
#: Keys under these prefixes belong to a model component: each must be converted or skipped with a reason.
NAMESPACES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.")

Tensor = Any  # torch.Tensor; torch is imported by callers only


@dataclass
class Converted:
    """A component's diffusers state dict plus the accounting of the file keys it came from."""

    state: dict[str, Tensor] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)  # full file keys
    skipped: dict[str, str] = field(default_factory=dict)  # full file key -> why it is not loaded
    unmapped: list[str] = field(default_factory=list)  # full file keys no rule knows: an error upstream


# --- UNet ------------------------------------------------------------------------------------------------

_UNET_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
_RESNET = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
           ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut."))
_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.(?:(\d+)\.)?(.+)")


def _resnet(rest: str) -> str | None:
    return next((new + rest[len(old):] for old, new in _RESNET if rest.startswith(old)), None)


def unet_key(key: str, layers_per_block: int) -> str | None:
    """diffusers ``UNet2DConditionModel`` name of LDM UNet key ``key`` (file prefix removed), or None.

    LDM numbers blocks flat: input block ``i >= 1`` is level ``(i-1) // (L+1)``, slot ``(i-1) % (L+1)``,
    the last slot of a level being its down-sampler; output block ``i`` is up level ``i // (L+1)``.
    Inside a block, sub-module 0 is the ResBlock, 1 the SpatialTransformer (or the up-sampler where a
    level has no attention), 2 the up-sampler.
    """
    for old, new in _UNET_TOP.items():
        if key.startswith(old + ".") and "." not in key[len(old) + 1:]:
            return new + key[len(old):]
    m = _BLOCK.fullmatch(key)
    if m is None:
        return None
    kind, i, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    n = layers_per_block + 1
    if kind == "middle_block":  # ResBlock, SpatialTransformer, ResBlock
        rest = f"{sub}.{rest}" if sub is not None else rest
        if i == 1:
            return "mid_block.attentions.0." + rest
        renamed = _resnet(rest)
        return f"mid_block.resnets.{i // 2}.{renamed}" if i in (0, 2) and renamed else None
    if sub is None:
        return None
    if kind == "input_blocks":
        level, j = divmod(i - 1, n)
        if j == layers_per_block:  # the level's down-sampler: input_blocks.i.0.op
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if sub == "0" and rest.startswith("op.") else None
        return _in_block(f"down_blocks.{level}", j, sub, rest)
    level, j = divmod(i, n)
    if sub in ("1", "2") and rest.startswith("conv."):
        return f"up_blocks.{level}.upsamplers.0.conv.{rest[5:]}"
    return _in_block(f"up_blocks.{level}", j, sub, rest)


def _in_block(block: str, j: int, sub: str, rest: str) -> str | None:
    if sub == "0":
        renamed = _resnet(rest)
        return f"{block}.resnets.{j}.{renamed}" if renamed else None
    if sub == "1":  # SpatialTransformer and diffusers' Transformer2DModel use the same inner names
        return f"{block}.attentions.{j}.{rest}"
    return None


# --- VAE -------------------------------------------------------------------------------------------------

_VAE_BLOCK = re.compile(r"(encoder|decoder)\.(down|up)\.(\d+)\.(?:block\.(\d+)|(downsample|upsample))\.(.+)")
_VAE_ATTN = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}
_VAE_RESNET = (("norm1.", "norm1."), ("conv1.", "conv1."), ("norm2.", "norm2."), ("conv2.", "conv2."),
               ("nin_shortcut.", "conv_shortcut."))


def _vae_resnet(rest: str) -> str | None:
    return next((new + rest[len(old):] for old, new in _VAE_RESNET if rest.startswith(old)), None)


def vae_key(key: str, num_levels: int) -> str | None:
    """diffusers ``AutoencoderKL`` name of LDM VAE key ``key`` (file prefix removed), or None.

    The decoder's levels are numbered in reverse in diffusers (LDM ``up.3`` is ``up_blocks.0``).
    """
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return key
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    if rest.startswith(("conv_in.", "conv_out.")):
        return key
    if rest.startswith("norm_out."):
        return f"{side}.conv_norm_out.{rest[len('norm_out.'):]}"
    if rest.startswith("mid."):
        return _vae_mid(side, rest[4:])
    m = _VAE_BLOCK.fullmatch(key)
    if m is None:
        return None
    _, way, level, j, sampler, tail = m.groups()
    index = int(level) if way == "down" else num_levels - 1 - int(level)
    block = f"{side}.{way}_blocks.{index}"
    if sampler:
        return f"{block}.{sampler}rs.0.{tail}" if tail.startswith("conv.") else None
    renamed = _vae_resnet(tail)
    return f"{block}.resnets.{j}.{renamed}" if renamed else None


def _vae_mid(side: str, rest: str) -> str | None:
    for old, new in (("block_1.", "resnets.0."), ("block_2.", "resnets.1.")):
        if rest.startswith(old):
            renamed = _vae_resnet(rest[len(old):])
            return f"{side}.mid_block.{new}{renamed}" if renamed else None
    if rest.startswith("attn_1."):
        inner = rest[len("attn_1."):]
        return next((f"{side}.mid_block.attentions.0.{new}{inner[len(old):]}"
                     for old, new in _VAE_ATTN.items() if inner.startswith(old)), None)
    return None


# --- converters over a whole file ---------------------------------------------------------------------------


def convert(keys: Iterable[str], prefix: str, rename: Callable[[str], str | None], get: Callable[[str], Tensor],
            skip: Callable[[str], str | None] = lambda _k: None) -> Converted:
    """Rename every file key under ``prefix``; ``skip(key)`` returns a reason for keys not to load."""
    out = Converted()
    for full in keys:
        if not full.startswith(prefix):
            continue
        key = full[len(prefix):]
        reason = skip(key)
        if reason:
            out.skipped[full] = reason
            continue
        new = rename(key)
        if new is None:
            out.unmapped.append(full)
            continue
        out.state[new] = get(full)
        out.used.add(full)
    return out


def squeeze_vae_attention(state: dict[str, Tensor]) -> None:
    """LDM's VAE attention uses 1x1 convolutions (out, in, 1, 1); diffusers uses Linear (out, in)."""
    for k, v in state.items():
        if ".mid_block.attentions.0.to_" in k and k.endswith(".weight") and v.ndim == 4:
            state[k] = v[:, :, 0, 0]


def clip_hf_key(key: str) -> str:
    """CLIP-L stored with HF names: drop the ``text_model.`` level some checkpoints keep, some don't."""
    return key.removeprefix("text_model.")


def clip_hf_skip(key: str) -> str | None:
    if key.endswith("embeddings.position_ids"):
        return "position ids buffer: rebuilt by transformers"
    return None


_OPENCLIP_TOP = {"token_embedding.weight": "embeddings.token_embedding.weight",
                 "positional_embedding": "embeddings.position_embedding.weight",
                 "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
                 "text_projection": "text_projection.weight"}
_OPENCLIP_LAYER = (("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("mlp.c_fc.", "mlp.fc1."),
                   ("mlp.c_proj.", "mlp.fc2."), ("attn.out_proj.", "self_attn.out_proj."))
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def openclip_key(key: str) -> str | None:
    """transformers CLIP name of an open_clip text-tower key (``in_proj`` handled by :func:`split_in_proj`)."""
    if key in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[key]
    m = _RESBLOCK.fullmatch(key)
    if m is None:
        return None
    layer, rest = m.groups()
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        return f"encoder.layers.{layer}.self_attn.in_proj.{rest.rsplit('_', 1)[1]}"
    renamed = next((new + rest[len(old):] for old, new in _OPENCLIP_LAYER if rest.startswith(old)), None)
    return f"encoder.layers.{layer}.{renamed}" if renamed else None


def openclip_skip(layers_kept: int, keep_projection: bool) -> Callable[[str], str | None]:
    """What an open_clip text tower has that the transformers model does not use.

    SD 2.x conditions on the penultimate layer: diffusers' SD 2 text encoder has 23 of the 24 layers,
    so the last layer and the projection (applied after it) are never computed.
    """
    def skip(key: str) -> str | None:
        if key == "logit_scale":
            return "CLIP's contrastive temperature: not used to condition the UNet"
        if key == "attn_mask":
            return "causal attention mask buffer: rebuilt by transformers"
        if key == "text_projection" and not keep_projection:
            return "projection after the last layer: SD 2.x reads the penultimate layer"
        m = _RESBLOCK.fullmatch(key)
        if m and int(m.group(1)) >= layers_kept:
            return "text layer after the penultimate: SD 2.x reads the penultimate layer"
        return None

    return skip


def split_in_proj(state: dict[str, Tensor]) -> None:
    """open_clip's fused attention input projection (3W, W) -> q, k, v (W, W) each, in that order;
    its ``text_projection`` (W, P) is applied as ``x @ P``, so transformers' Linear weight is its transpose."""
    for k in [k for k in state if ".self_attn.in_proj." in k]:
        fused = state.pop(k)
        head, kind = k.rsplit(".in_proj.", 1)
        for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3, dim=0), strict=True):
            state[f"{head}.{name}.{kind}"] = part.contiguous()
    if "text_projection.weight" in state:
        state["text_projection.weight"] = state["text_projection.weight"].T.contiguous()
