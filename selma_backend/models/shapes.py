"""Component configurations inferred from tensor shapes alone (a safetensors header is enough).

The UNet walk follows ComfyUI's ``comfy/model_detection.py`` ``detect_unet_config`` (0.3.75): input
blocks are read in order, a ``0.op`` down-sampler closes a level, each ResBlock's output width gives
the level's width and the number of ``transformer_blocks`` under it the transformer depth. What
shapes cannot tell is filled in by the convention of each architecture, as ComfyUI's
``supported_models`` and diffusers' published configs do: SD 1.x uses 8 heads per attention, SD 2.x
and SDXL 64 channels per head; every GroupNorm has 32 groups (LDM's ``GroupNorm32``).
Text towers whose shapes equal the published ones get the bundled config; others (tiny test
models) keep the bundled activation and norms with their own sizes and 64 channels per head.
"""

from __future__ import annotations

from typing import Any

from ..errors import SelmaError
from .configs import bundled_config

Shapes = dict[str, tuple[int, ...]]
GROUPS = 32  # LDM normalization(): GroupNorm32
HEAD_CHANNELS = 64  # SD 2.x / SDXL: num_head_channels 64
SD1_HEADS = 8  # SD 1.x: num_heads 8
VAE_SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def layout_error(what: str) -> SelmaError:
    return SelmaError(f"unsupported {what}; supported: SD 1.x, SD 2.x and SDXL base checkpoints in the "
                      "original (LDM) layout, or diffusers folders")


def sub_shapes(shapes: Shapes, prefix: str) -> Shapes:
    """The shapes under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def indices(s: Shapes, prefix: str) -> list[int]:
    """Sorted distinct integers that follow ``prefix`` in the keys (block numbers); must be 0..n-1."""
    found = sorted({int(k[len(prefix):].split(".", 1)[0]) for k in s
                    if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()})
    if found != list(range(len(found))):
        raise layout_error(f"numbering under {prefix!r}: {found[:12]}")
    return found


def _shape(s: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in s:
        raise layout_error(f"{what}: tensor {key!r} is missing")
    return s[key]


# --- UNet ------------------------------------------------------------------------------------------------


def _depth(s: Shapes, block: str) -> int:
    """Transformer depth of the SpatialTransformer at ``block`` (e.g. ``input_blocks.4.1.``); 0 if none."""
    return len(indices(s, block + "transformer_blocks."))


def _down_levels(s: Shapes) -> tuple[list[int], list[list[int]]]:
    """(width of each level, transformer depth of each ResBlock of each level) from the input blocks."""
    widths: list[int] = []
    levels: list[list[int]] = [[]]
    for i in indices(s, "input_blocks.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in s:  # a down-sampler closes the level
            levels.append([])
            continue
        width = _shape(s, f"input_blocks.{i}.0.out_layers.3.weight", "UNet input block")[0]
        if not levels[-1]:
            widths.append(width)
        elif width != widths[-1]:
            raise layout_error(f"UNet: widths {widths[-1]} and {width} within one level")
        levels[-1].append(_depth(s, f"input_blocks.{i}.1."))
    if len(widths) != len(levels) or not widths:
        raise layout_error("UNet: a level without ResBlocks")
    return widths, levels


def _up_depths(s: Shapes, n_levels: int, layers: int) -> list[int]:
    """Transformer depth of each up level (diffusers' order: deepest first) from the output blocks."""
    found = indices(s, "output_blocks.")
    if len(found) != n_levels * (layers + 1):
        raise layout_error(f"UNet: {len(found)} output blocks for {n_levels} levels of {layers} ResBlocks")
    depths = []
    for level in range(n_levels):
        per = {_depth(s, f"output_blocks.{level * (layers + 1) + j}.1.") for j in range(layers + 1)}
        if len(per) != 1:
            raise layout_error(f"UNet: transformer depths {sorted(per)} within up level {level}")
        depths.append(per.pop())
    return depths


def unet_config(s: Shapes, arch: str, pooled_dim: int | None, sample_size: int) -> tuple[dict[str, Any], list[str]]:
    """diffusers ``UNet2DConditionModel`` kwargs from the shapes of an LDM UNet (keys without the file prefix).

    ``pooled_dim`` is the width of SDXL's pooled text embedding (text_encoder_2's projection), which
    with the 6 size/crop numbers makes up ``label_emb``'s input: ``adm_in = pooled + 6 * time_embed``.
    Returns (config, notes about conventions applied).
    """
    conv_in = _shape(s, "input_blocks.0.0.weight", "UNet")
    widths, levels = _down_levels(s)
    layers = len(levels[0])
    if any(len(lv) != layers for lv in levels) or any(len(set(lv)) != 1 for lv in levels):
        raise layout_error(f"UNet: ResBlocks / transformer depths per level {levels} are not uniform")
    down = [lv[0] for lv in levels]
    up = _up_depths(s, len(widths), layers)
    if "middle_block.1.proj_in.weight" not in s:
        raise layout_error("UNet: no attention in the middle block")
    mid = _depth(s, "middle_block.1.")
    if conv_in[0] != widths[0] or any(w % GROUPS for w in widths):
        raise layout_error(f"UNet widths {widths} (conv_in {conv_in[0]}; each must be a multiple of {GROUPS})")
    per_level = [d or (mid if i == len(down) - 1 else 1) for i, d in enumerate(down)]
    if per_level[-1] != mid:  # diffusers' middle block takes the last level's depth
        raise layout_error(f"UNet: middle depth {mid} differs from the last level's {per_level[-1]}")
    heads = [SD1_HEADS if arch == "sd1" else max(1, w // HEAD_CHANNELS) for w in widths]
    config: dict[str, Any] = {
        "sample_size": sample_size,
        "in_channels": conv_in[1],
        "out_channels": _shape(s, "out.2.weight", "UNet")[0],
        "block_out_channels": widths,
        "layers_per_block": layers,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up],
        "transformer_layers_per_block": per_level,
        "cross_attention_dim": _shape(s, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "UNet")[1],
        "attention_head_dim": SD1_HEADS if arch == "sd1" else heads,  # diffusers' legacy name: number of heads
        "use_linear_projection": len(s["middle_block.1.proj_in.weight"]) == 2,
        "norm_num_groups": GROUPS,
        "upcast_attention": arch == "sd2",  # SD 2.x attention overflows in fp16; ComfyUI runs it in fp32
    }
    if up != down[::-1]:
        config["reverse_transformer_layers_per_block"] = [d or 1 for d in up]
    time_dim = _shape(s, "time_embed.0.weight", "UNet")[0]
    if time_dim != 4 * widths[0]:
        config["time_embedding_dim"] = time_dim
    if "label_emb.0.0.weight" in s:
        config.update(_sdxl_added_embedding(s["label_emb.0.0.weight"][1], pooled_dim))
    notes = [f"UNet attention heads per level {heads} by the {arch} convention "
             f"({'8 heads' if arch == 'sd1' else '64 channels per head'}): shapes do not store them"]
    return config, notes


def _sdxl_added_embedding(adm_in: int, pooled_dim: int | None) -> dict[str, Any]:
    time_embed, rest = divmod(adm_in - (pooled_dim or 0), 6)
    if pooled_dim is None or rest or time_embed <= 0:
        raise layout_error(f"SDXL added embedding: label_emb reads {adm_in} values, text pooled width {pooled_dim}")
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": time_embed,
            "projection_class_embeddings_input_dim": adm_in}


# --- VAE -------------------------------------------------------------------------------------------------


def vae_config(s: Shapes, arch: str, sample_size: int) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` kwargs from LDM VAE shapes (keys without ``first_stage_model.``)."""
    conv_in = _shape(s, "encoder.conv_in.weight", "VAE")
    levels = indices(s, "encoder.down.")
    widths = [_shape(s, f"encoder.down.{i}.block.0.conv2.weight", "VAE")[0] for i in levels]
    layers = len(indices(s, "encoder.down.0.block."))
    if len(indices(s, "decoder.up.")) != len(levels) or len(indices(s, "decoder.up.0.block.")) != layers + 1:
        raise layout_error("VAE: decoder levels do not mirror the encoder's")
    if not widths or any(w % GROUPS for w in widths):
        raise layout_error(f"VAE widths {widths} (each must be a multiple of {GROUPS})")
    config = bundled_config("vae_sd")
    config.update({
        "in_channels": conv_in[1],
        "out_channels": _shape(s, "decoder.conv_out.weight", "VAE")[0],
        "latent_channels": _shape(s, "decoder.conv_in.weight", "VAE")[1],
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "layers_per_block": layers,
        "scaling_factor": VAE_SCALING[arch],
        "sample_size": sample_size,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in s,
    })
    return config


# --- text encoders -----------------------------------------------------------------------------------------


def _text_config(bundled: str, width: int, sizes: dict[str, int], notes: list[str], what: str) -> dict[str, Any]:
    """The bundled config if the shapes are the published ones; else its sizes replaced, 64 channels a head."""
    config = bundled_config(bundled)
    published = all(config[k] == v for k, v in sizes.items()) and config["hidden_size"] == width
    config.update(sizes, hidden_size=width)
    if not published:
        config["num_attention_heads"] = max(1, width // HEAD_CHANNELS)
        notes.append(f"{what}: not the published size; heads {config['num_attention_heads']} "
                     f"({HEAD_CHANNELS} channels per head) assumed")
    return config


def clip_hf_config(s: Shapes, notes: list[str]) -> dict[str, Any]:
    """CLIPTextConfig kwargs for a CLIP-L text tower stored with transformers names (``text_model.`` removed)."""
    s = {k.removeprefix("text_model."): v for k, v in s.items()}
    vocab, width = _shape(s, "embeddings.token_embedding.weight", "CLIP text encoder")
    sizes = {"vocab_size": vocab,
             "max_position_embeddings": _shape(s, "embeddings.position_embedding.weight", "CLIP text encoder")[0],
             "num_hidden_layers": len(indices(s, "encoder.layers.")),
             "intermediate_size": _shape(s, "encoder.layers.0.mlp.fc1.weight", "CLIP text encoder")[0]}
    return _text_config("clip_l_text", width, sizes, notes, "CLIP-L text encoder")


def openclip_config(s: Shapes, bundled: str, drop_last: bool, notes: list[str]) -> dict[str, Any]:
    """CLIPTextConfig kwargs for an open_clip text tower; ``drop_last``: keep layers up to the penultimate (SD 2.x)."""
    vocab, width = _shape(s, "token_embedding.weight", "OpenCLIP text encoder")
    layers = len(indices(s, "transformer.resblocks."))
    sizes = {"vocab_size": vocab,
             "max_position_embeddings": _shape(s, "positional_embedding", "OpenCLIP text encoder")[0],
             "num_hidden_layers": layers - 1 if drop_last else layers,
             "intermediate_size": _shape(s, "transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP text encoder")[0]}
    if "text_projection" in s:
        sizes["projection_dim"] = s["text_projection"][1]
    return _text_config(bundled, width, sizes, notes, f"OpenCLIP text encoder ({bundled})")
