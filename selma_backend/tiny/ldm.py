"""``mini-sd15.safetensors``: a single-file checkpoint in the original SD (LDM) key layout.

ComfyUI (``comfy/model_detection.py`` ``detect_unet_config``, ``comfy/supported_models.py`` ``SD15``,
read at 0.3.75) recognises SD 1.5 by: ``input_blocks.0.0.weight`` with 320 output channels, a
spatial transformer in an input block whose ``attn2.to_k`` reads a 768-wide context, conv (not
linear) ``proj_in``, no ``label_emb`` and no temporal layers. Heads (8) and the text encoder /
VAE configuration are fixed by that class, not read from the file, so the CLIP-L text tower
(12 layers, width 768) and the SD VAE (128 channels, mult 1-2-4-4) must be full size, and every
tensor they declare must be present: ComfyUI's modules skip initialisation and would compute on
whatever memory held (NaN).

The UNet is SD's with ONE level (channel_mult [1], one res block, transformer depth 1) plus SD's
middle block, about 26M parameters. Keys and shapes are generated from the layer shapes of
CompVis' ``ldm`` modules (``openaimodel.UNetModel``, ``autoencoder.AutoencoderKL``) and
HF ``CLIPTextModel``; nothing is instantiated. Weights: N(0, 0.02), norms' scales 1 and offsets 0.
Saved in fp16 (ComfyUI casts on load), about 465 MB.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from .common import header_metadata, publish_file

Shape = tuple[int, ...]
Param = tuple[str, Shape, str]  # (key, shape, init: "normal" | "ones" | "zeros")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
CH = 320  # model_channels: SD15 detection requires 320
TIME_DIM = 4 * CH
CONTEXT = 768  # context_dim: CLIP-L's width; SD15 detection requires 768
CLIP_LAYERS, CLIP_WIDTH, CLIP_FF, CLIP_VOCAB, CLIP_POSITIONS = 12, 768, 3072, 49408, 77
VAE_CH, VAE_MULT, VAE_RES_BLOCKS, Z = 128, (1, 2, 4, 4), 2, 4
INIT_STD = 0.02


def write_mini_sd15(path: str | Path, seed: int = 0, *, force: bool = False) -> Path:
    """Write the mini SD 1.5 checkpoint to ``path`` (fp16 safetensors, provenance in the header)."""
    from safetensors.torch import save_file

    def build(tmp: Path) -> None:
        save_file(mini_sd15_state_dict(seed), str(tmp), metadata=header_metadata("mini-sd15", seed))

    return publish_file(Path(path), build, force=force)


def mini_sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, drawn in key order from one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape, init in mini_sd15_params():
        if init == "normal":
            t = torch.randn(shape, generator=gen).mul_(INIT_STD)
        else:
            t = torch.ones(shape) if init == "ones" else torch.zeros(shape)
        out[key] = t.to(dtype)
    return out


def mini_sd15_params() -> list[Param]:
    """(key, shape, init) of every tensor, in the checkpoint's three LDM namespaces."""
    params = [(UNET + k, s, i) for k, s, i in _unet()]
    params += [(VAE + k, s, i) for k, s, i in _vae()]
    params += [(CLIP + k, s, i) for k, s, i in _clip_text()]
    return params


# --- building blocks: each yields (key relative to its prefix, shape, init) ---------------------------


def _linear(name: str, n_out: int, n_in: int, bias: bool = True) -> Iterator[Param]:
    yield f"{name}.weight", (n_out, n_in), "normal"
    if bias:
        yield f"{name}.bias", (n_out,), "normal"


def _conv(name: str, n_out: int, n_in: int, k: int) -> Iterator[Param]:
    yield f"{name}.weight", (n_out, n_in, k, k), "normal"
    yield f"{name}.bias", (n_out,), "normal"


def _norm(name: str, ch: int) -> Iterator[Param]:
    yield f"{name}.weight", (ch,), "ones"
    yield f"{name}.bias", (ch,), "zeros"


def _prefixed(prefix: str, params: Iterator[Param]) -> Iterator[Param]:
    for key, shape, init in params:
        yield f"{prefix}.{key}", shape, init


# --- UNet (ldm openaimodel.UNetModel, SD 1.x options) --------------------------------------------------


def _unet() -> Iterator[Param]:
    yield from _linear("time_embed.0", TIME_DIM, CH)
    yield from _linear("time_embed.2", TIME_DIM, TIME_DIM)
    yield from _conv("input_blocks.0.0", CH, 4, 3)
    yield from _prefixed("input_blocks.1.0", _res_block(CH, CH))
    yield from _prefixed("input_blocks.1.1", _spatial_transformer(CH))
    yield from _prefixed("middle_block.0", _res_block(CH, CH))
    yield from _prefixed("middle_block.1", _spatial_transformer(CH))
    yield from _prefixed("middle_block.2", _res_block(CH, CH))
    # Decoder side: num_res_blocks + 1 blocks, each concatenating one skip (conv_in's, input_blocks.1's).
    for i in range(2):
        yield from _prefixed(f"output_blocks.{i}.0", _res_block(2 * CH, CH))
        yield from _prefixed(f"output_blocks.{i}.1", _spatial_transformer(CH))
    yield from _norm("out.0", CH)
    yield from _conv("out.2", 4, CH, 3)


def _res_block(c_in: int, c_out: int) -> Iterator[Param]:
    """openaimodel.ResBlock: GroupNorm-SiLU-conv, time embedding added, GroupNorm-SiLU-conv, 1x1 skip if widths differ."""
    yield from _norm("in_layers.0", c_in)
    yield from _conv("in_layers.2", c_out, c_in, 3)
    yield from _linear("emb_layers.1", c_out, TIME_DIM)
    yield from _norm("out_layers.0", c_out)
    yield from _conv("out_layers.3", c_out, c_out, 3)
    if c_in != c_out:
        yield from _conv("skip_connection", c_out, c_in, 1)


def _spatial_transformer(ch: int) -> Iterator[Param]:
    """attention.SpatialTransformer, SD 1.x form: conv 1x1 proj_in/out, one block, GEGLU feed-forward (4x)."""
    yield from _norm("norm", ch)
    yield from _conv("proj_in", ch, ch, 1)
    block = "transformer_blocks.0"
    for attn, ctx in (("attn1", ch), ("attn2", CONTEXT)):
        yield from _linear(f"{block}.{attn}.to_q", ch, ch, bias=False)
        yield from _linear(f"{block}.{attn}.to_k", ch, ctx, bias=False)
        yield from _linear(f"{block}.{attn}.to_v", ch, ctx, bias=False)
        yield from _linear(f"{block}.{attn}.to_out.0", ch, ch)
    yield from _linear(f"{block}.ff.net.0.proj", 2 * 4 * ch, ch)  # GEGLU: value and gate halves
    yield from _linear(f"{block}.ff.net.2", ch, 4 * ch)
    for n in (1, 2, 3):
        yield from _norm(f"{block}.norm{n}", ch)
    yield from _conv("proj_out", ch, ch, 1)


# --- VAE (ldm AutoencoderKL: Encoder/Decoder of diffusionmodules.model) --------------------------------


def _vae() -> Iterator[Param]:
    top = VAE_CH * VAE_MULT[-1]
    yield from _conv("encoder.conv_in", VAE_CH, 3, 3)
    c_in = VAE_CH
    for level, mult in enumerate(VAE_MULT):
        for j in range(VAE_RES_BLOCKS):
            yield from _prefixed(f"encoder.down.{level}.block.{j}", _resnet(c_in, VAE_CH * mult))
            c_in = VAE_CH * mult
        if level != len(VAE_MULT) - 1:
            yield from _conv(f"encoder.down.{level}.downsample.conv", c_in, c_in, 3)
    yield from _prefixed("encoder.mid", _vae_mid(top))
    yield from _norm("encoder.norm_out", top)
    yield from _conv("encoder.conv_out", 2 * Z, top, 3)  # mean and log-variance
    yield from _conv("quant_conv", 2 * Z, 2 * Z, 1)
    yield from _conv("post_quant_conv", Z, Z, 1)
    yield from _conv("decoder.conv_in", top, Z, 3)
    yield from _prefixed("decoder.mid", _vae_mid(top))
    c_in = top
    for level in reversed(range(len(VAE_MULT))):
        for j in range(VAE_RES_BLOCKS + 1):
            yield from _prefixed(f"decoder.up.{level}.block.{j}", _resnet(c_in, VAE_CH * VAE_MULT[level]))
            c_in = VAE_CH * VAE_MULT[level]
        if level != 0:
            yield from _conv(f"decoder.up.{level}.upsample.conv", c_in, c_in, 3)
    yield from _norm("decoder.norm_out", VAE_CH)
    yield from _conv("decoder.conv_out", 3, VAE_CH, 3)


def _resnet(c_in: int, c_out: int) -> Iterator[Param]:
    yield from _norm("norm1", c_in)
    yield from _conv("conv1", c_out, c_in, 3)
    yield from _norm("norm2", c_out)
    yield from _conv("conv2", c_out, c_out, 3)
    if c_in != c_out:
        yield from _conv("nin_shortcut", c_out, c_in, 1)


def _vae_mid(ch: int) -> Iterator[Param]:
    yield from _prefixed("block_1", _resnet(ch, ch))
    yield from _norm("attn_1.norm", ch)
    for name in ("q", "k", "v", "proj_out"):
        yield from _conv(f"attn_1.{name}", ch, ch, 1)
    yield from _prefixed("block_2", _resnet(ch, ch))


# --- CLIP ViT-L/14 text tower (HF CLIPTextModel names, as SD 1.x checkpoints store it) -------------------


def _clip_text() -> Iterator[Param]:
    yield "embeddings.token_embedding.weight", (CLIP_VOCAB, CLIP_WIDTH), "normal"
    yield "embeddings.position_embedding.weight", (CLIP_POSITIONS, CLIP_WIDTH), "normal"
    for i in range(CLIP_LAYERS):
        layer = f"encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield from _linear(f"{layer}.self_attn.{proj}", CLIP_WIDTH, CLIP_WIDTH)
        yield from _norm(f"{layer}.layer_norm1", CLIP_WIDTH)
        yield from _linear(f"{layer}.mlp.fc1", CLIP_FF, CLIP_WIDTH)
        yield from _linear(f"{layer}.mlp.fc2", CLIP_WIDTH, CLIP_FF)
        yield from _norm(f"{layer}.layer_norm2", CLIP_WIDTH)
    yield from _norm("final_layer_norm", CLIP_WIDTH)
