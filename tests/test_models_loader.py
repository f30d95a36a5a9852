"""S2 model loading: offline loads that render, single files whose every tensor lands where the file
says (mini-sd15, SD 1.x / SDXL round trips from the tiny folders, an in-test SD 2.x), strictness,
pickles, options.

The LDM-layout files are written here by an independent reverse mapping (diffusers -> LDM, after
diffusers' ``scripts/convert_diffusers_to_original_sdxl.py``, generalised to any level count), so the
loader's forward mapping is checked against something it did not produce. The SD 2.x text tower is
open_clip's own ``TextTransformer``: the loaded encoder must compute what SD 2.x computes with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from selma_backend.errors import SelmaError
from selma_backend.models.config import ModelConfig
from selma_backend.models.detect import detect_architecture
from selma_backend.models.loader import file_sha256, load_pipeline
from selma_backend.tiny_models import write_tiny_models

REPO = Path(__file__).resolve().parents[1]
UNET, VAE = "model.diffusion_model.", "first_stage_model."


# --- offline, end to end ------------------------------------------------------------------------------------

OFFLINE_RUN = r"""
import json, sys, numpy as np, torch
from selma_backend.models.config import ModelConfig
from selma_backend.models.loader import load_pipeline
out = {}
for name, path in json.loads(sys.argv[1]).items():
    lp = load_pipeline(ModelConfig(path))
    img = lp.pipe("a red cube on a wooden table", num_inference_steps=1, height=64, width=64, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    out[name] = {"arch": lp.arch, "pipe": type(lp.pipe).__name__, "shape": list(img.shape), "hash": lp.model_hash,
                 "finite": bool(np.isfinite(img).all()), "std": float(img.std()), "format": lp.info["format"]}
    lp.release()
print(json.dumps(out))
"""


@dataclass
class Tiny:
    paths: dict[str, Path]
    offline: subprocess.Popen  # OFFLINE_RUN on the three models, running beside the in-process tests
    hf_home: Path
    log: Path  # its stderr (a file: a full pipe would stall it)

    def __getitem__(self, name: str) -> Path:
        return self.paths[name]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    """sd1/, sdxl/ and mini-sd15.safetensors, written once per session (test_models_detect shares the folder);
    the offline check starts at once in its own process (imports and three loads: ~30 s on 2 cores)."""
    paths = write_tiny_models(tmp_path_factory.getbasetemp() / "s2-tiny-models", seed=0,
                              only=["sd1", "sdxl", "mini-sd15"])
    scratch = tmp_path_factory.mktemp("offline")
    hf_home = scratch / "hf-home"
    hf_home.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"), "SELMA_CACHE_DIR": str(scratch / "cache")}
    log = scratch / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", OFFLINE_RUN, json.dumps({k: str(v) for k, v in paths.items()})],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    yield Tiny(paths, proc, hf_home, log)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module", autouse=True)
def hash_cache(tmp_path_factory):
    """Keep model-hash cache entries out of the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELMA_CACHE_DIR", str(tmp_path_factory.mktemp("selma-cache")))
        yield


def _render(pipe, steps: int = 1, size: int = 64):
    return pipe("a red cube on a wooden table", num_inference_steps=steps, height=size, width=size, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


# --- mini-sd15: the tensors land where the file says --------------------------------------------------------


@pytest.fixture(scope="module")
def mini(tiny):
    loaded = load_pipeline(ModelConfig(str(tiny["mini-sd15"]), device="cpu"))
    yield loaded
    loaded.release()


def test_mini_sd15_config_follows_the_tensors_not_a_fixed_sd15_config(mini):
    unet = mini.pipe.unet.config
    assert list(unet.block_out_channels) == [320] and unet.layers_per_block == 1
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] and list(unet.up_block_types) == ["CrossAttnUpBlock2D"]
    assert unet.cross_attention_dim == 768 and unet.use_linear_projection is False and unet.attention_head_dim == 8
    assert list(mini.pipe.vae.config.block_out_channels) == [128, 256, 512, 512]
    assert mini.pipe.vae.config.scaling_factor == 0.18215
    assert mini.pipe.text_encoder.config.num_hidden_layers == 12 and mini.pipe.text_encoder.config.hidden_act == "quick_gelu"
    assert (mini.arch, mini.prediction_type) == ("sd1", "epsilon")
    assert mini.info["dtype"] == "float32" and mini.info["device"] == "cpu" and mini.info["attention"] == "sdpa"
    assert mini.pipe.safety_checker is None and mini.pipe.tokenizer.pad_token == "<|endoftext|>"


def test_mini_sd15_weights_equal_the_file_tensors(mini, tiny):
    file = load_file(str(tiny["mini-sd15"]))
    pipe = mini.pipe
    pairs = {  # LDM name in the file -> the loaded tensor it must equal
        UNET + "input_blocks.1.0.in_layers.2.weight": pipe.unet.down_blocks[0].resnets[0].conv1.weight,
        UNET + "input_blocks.1.1.proj_in.weight": pipe.unet.down_blocks[0].attentions[0].proj_in.weight,
        UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight":
            pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.weight,
        UNET + "middle_block.2.emb_layers.1.bias": pipe.unet.mid_block.resnets[1].time_emb_proj.bias,
        UNET + "output_blocks.1.0.skip_connection.weight": pipe.unet.up_blocks[0].resnets[1].conv_shortcut.weight,
        UNET + "output_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight":
            pipe.unet.up_blocks[0].attentions[1].transformer_blocks[0].ff.net[0].proj.weight,
        UNET + "time_embed.2.weight": pipe.unet.time_embedding.linear_2.weight,
        UNET + "out.2.bias": pipe.unet.conv_out.bias,
        VAE + "decoder.up.0.block.0.nin_shortcut.weight": pipe.vae.decoder.up_blocks[3].resnets[0].conv_shortcut.weight,
        VAE + "encoder.down.2.downsample.conv.weight": pipe.vae.encoder.down_blocks[2].downsamplers[0].conv.weight,
        VAE + "quant_conv.bias": pipe.vae.quant_conv.bias,
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight":
            pipe.text_encoder.state_dict()[_clip_key(pipe.text_encoder, "encoder.layers.11.mlp.fc2.weight")],
    }
    for name, tensor in pairs.items():
        assert torch.equal(file[name].float(), tensor), name  # exact: fp16 -> fp32 is lossless
    q = file[VAE + "encoder.mid.attn_1.q.weight"]  # a 1x1 conv in LDM, a Linear in diffusers
    assert q.shape[2:] == (1, 1) and torch.equal(q[:, :, 0, 0].float(), pipe.vae.encoder.mid_block.attentions[0].to_q.weight)
    counts = {p: sum(k.startswith(p) for k in file) for p in (UNET, VAE, "cond_stage_model.")}
    assert len(pipe.unet.state_dict()) == counts[UNET] == 168
    assert len(pipe.vae.state_dict()) == counts[VAE]
    assert len(pipe.text_encoder.state_dict()) == counts["cond_stage_model."]
    assert mini.info["keys"] == {"loaded": len(file), "skipped": {}, "outside_model": {"count": 0, "examples": []}}


def _clip_key(model, key: str) -> str:
    return key if key in model.state_dict() else f"text_model.{key}"


# --- round trips: tiny diffusers folders -> LDM single files -> load_pipeline ----------------------------------

_RESNET_TO_LDM = (("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."),
                  ("conv2.", "out_layers.3."), ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection."))
_TOP_TO_LDM = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
               "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
               "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}


def _resnet_to_ldm(rest: str) -> str:
    return next(new + rest[len(old):] for old, new in _RESNET_TO_LDM if rest.startswith(old))


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """diffusers UNet -> LDM ``model.diffusion_model.*`` (after diffusers' convert_diffusers_to_original_sdxl.py)."""
    n = unet.config.layers_per_block + 1
    with_attention = [t.startswith("CrossAttn") for t in unet.config.up_block_types]
    out = {}
    for k, v in unet.state_dict().items():
        top = next((new + k[len(old):] for old, new in _TOP_TO_LDM.items() if k.startswith(old)), None)
        if top:
            name = top
        elif k.startswith("mid_block.resnets."):
            j, rest = k[len("mid_block.resnets."):].split(".", 1)
            name = f"middle_block.{2 * int(j)}.{_resnet_to_ldm(rest)}"
        elif k.startswith("mid_block.attentions.0."):
            name = "middle_block.1." + k[len("mid_block.attentions.0."):]
        else:
            name = _block_to_ldm(k, n, with_attention)
        out[UNET + name] = v.clone()
    return out


def _block_to_ldm(key: str, n: int, with_attention: list[bool]) -> str:
    """down_blocks / up_blocks names -> LDM's flat input_blocks / output_blocks numbering (n = layers + 1)."""
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    way, i, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
    if way == "down":
        if part == "downsamplers":
            return f"input_blocks.{(i + 1) * n}.0.op.{rest.removeprefix('conv.')}"
        block = f"input_blocks.{1 + i * n + j}"
    else:
        if part == "upsamplers":
            return f"output_blocks.{i * n + n - 1}.{2 if with_attention[i] else 1}.{rest}"
        block = f"output_blocks.{i * n + j}"
    return f"{block}.0.{_resnet_to_ldm(rest)}" if part == "resnets" else f"{block}.1.{rest}"


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL -> LDM ``first_stage_model.*`` (decoder levels reversed, attention as 1x1 convs)."""
    levels = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        name = k.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", name)
        name = name.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in name:
            name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
            for old, new in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")):
                name = name.replace(old, new)
            v = v[:, :, None, None] if v.ndim == 2 else v
        out[VAE + name] = v.clone()
    return out


def clip_to_openclip(model, prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection -> open_clip text-tower names (q, k, v fused; projection transposed)."""
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "text_projection": sd.pop("text_projection.weight").T, "logit_scale": torch.tensor(4.6052)}
    for i in range(model.config.num_hidden_layers):
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for old, new in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                             ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[f"{dst}{new}.{kind}"] = sd.pop(f"{src}{old}.{kind}")
    assert not sd, sorted(sd)
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}


def clip_to_ldm(model, prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> HF names under ``prefix``, with the ``text_model.`` level LDM files keep."""
    return {prefix + "text_model." + k.removeprefix("text_model."): v.clone() for k, v in model.state_dict().items()}


def tiny_vae():
    """An SD-shaped VAE small enough for tests: 4 levels (8x down-sampling), 32 channels, GroupNorm 32 as in LDM."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                         norm_num_groups=32, sample_size=64).eval()


def _assert_same_weights(loaded, source, what: str):
    a, b = loaded.state_dict(), source.state_dict()
    b = {(k if k in a else f"text_model.{k}" if f"text_model.{k}" in a else k.removeprefix("text_model.")): v
         for k, v in b.items()}
    assert sorted(a) == sorted(b), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def test_sd1_single_file_round_trip(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    src = StableDiffusionPipeline.from_pretrained(tiny["sd1"], local_files_only=True)
    vae = tiny_vae()
    path = tmp_path / "sd1-ldm.safetensors"
    save_file({**unet_to_ldm(src.unet), **vae_to_ldm(vae),
               **clip_to_ldm(src.text_encoder, "cond_stage_model.transformer.")}, str(path))
    lp = load_pipeline(ModelConfig(str(path)))
    assert (lp.arch, lp.prediction_type, type(lp.pipe.scheduler).__name__) == ("sd1", "epsilon", "PNDMScheduler")
    _assert_same_weights(lp.pipe.unet, src.unet, "unet")
    _assert_same_weights(lp.pipe.vae, vae, "vae")
    _assert_same_weights(lp.pipe.text_encoder, src.text_encoder, "text_encoder")
    for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim"):
        assert _plain(lp.pipe.unet.config[key]) == _plain(src.unet.config[key]), key
    # SD 1.x's 8-head convention is what the tiny folder uses too, so the UNets compute the same function.
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.allclose(lp.pipe.unet(x, t, ctx).sample, src.unet(x, t, ctx).sample, atol=1e-5)
    image = _render(lp.pipe)
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_sdxl_single_file_round_trip(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    src = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"], local_files_only=True)
    path = tmp_path / "sdxl-ldm.safetensors"
    save_file({**unet_to_ldm(src.unet), **vae_to_ldm(tiny_vae()),
               **clip_to_ldm(src.text_encoder, "conditioner.embedders.0.transformer."),
               **clip_to_openclip(src.text_encoder_2, "conditioner.embedders.1.model.")}, str(path))
    assert detect_architecture(path).arch == "sdxl"
    lp = load_pipeline(ModelConfig(str(path), scheduler="euler_a"))
    cfg = lp.pipe.unet.config
    assert (lp.arch, type(lp.pipe).__name__, type(lp.pipe.scheduler).__name__) == (
        "sdxl", "StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler")
    assert (cfg.addition_embed_type, cfg.addition_time_embed_dim, cfg.projection_class_embeddings_input_dim) == ("text_time", 8, 80)
    assert list(cfg.transformer_layers_per_block) == [1, 2] and cfg.use_linear_projection is True  # level 0: no attention
    assert list(cfg.down_block_types) == ["DownBlock2D", "CrossAttnDownBlock2D"]
    assert lp.pipe.vae.config.scaling_factor == 0.13025 and lp.pipe.tokenizer_2.pad_token == "!"
    _assert_same_weights(lp.pipe.unet, src.unet, "unet")
    _assert_same_weights(lp.pipe.text_encoder, src.text_encoder, "text_encoder")
    _assert_same_weights(lp.pipe.text_encoder_2, src.text_encoder_2, "text_encoder_2")
    assert lp.info["keys"]["skipped"] == {"CLIP's contrastive temperature: not used to condition the UNet": 1}
    image = _render(lp.pipe)
    assert image.shape == (1, 64, 64, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


# --- SD 2.x: built here (linear proj_in, OpenCLIP-H-like text tower from open_clip itself) -----------------


def sd2_parts():
    """A tiny SD 2.x: UNet as SD 2 (4 levels, attention in the first three, linear projections, 64 channels
    a head), open_clip's own TextTransformer (3 layers; SD 2 reads the penultimate), the tiny VAE."""
    from diffusers import UNet2DConditionModel
    from open_clip.transformer import TextTransformer

    torch.manual_seed(2)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32, 32, 32), layers_per_block=2, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=1, use_linear_projection=True, norm_num_groups=32).eval()
    text = TextTransformer(width=64, heads=1, layers=3, output_dim=64).eval()
    return unet, text, tiny_vae()


def sd2_state_dict(unet, text, vae) -> dict[str, torch.Tensor]:
    openclip = {"cond_stage_model.model." + k: v.clone().contiguous() for k, v in text.state_dict().items()}
    return {**unet_to_ldm(unet), **vae_to_ldm(vae), **openclip, "cond_stage_model.model.logit_scale": torch.tensor(4.6)}


PROBE = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    unet, text, vae = sd2_parts()
    path = tmp_path_factory.mktemp("sd2") / "sd2-ldm.safetensors"
    save_file(sd2_state_dict(unet, text, vae), str(path))
    return path, unet, text, vae


def test_sd2_single_file_detection_and_penultimate_text_layer(sd2):
    path, unet, text, _vae = sd2
    det = detect_architecture(path)
    assert (det.arch, det.unet_config["use_linear_projection"], det.unet_config["attention_head_dim"]) == ("sd2", True, [1, 1, 1, 1])
    assert det.unet_config["upcast_attention"] is True and det.unet_config["cross_attention_dim"] == 64
    assert det.text_encoders["text_encoder"]["config"]["num_hidden_layers"] == 2  # of 3: the penultimate
    # ComfyUI's probe: a freshly initialised LayerNorm bias has std 0 <= 0.09 -> epsilon (a 512 "base" model).
    assert det.prediction_type == "epsilon" and "0.09" in det.prediction_reason
    lp = load_pipeline(ModelConfig(str(path), prediction_type="v_prediction", dtype="fp32"))
    assert lp.prediction_type == "v_prediction" and lp.pipe.scheduler.config.prediction_type == "v_prediction"
    assert "set in the config" in lp.info["prediction_reason"] and type(lp.pipe.scheduler).__name__ == "DDIMScheduler"
    assert lp.info["keys"]["skipped"] == {
        "CLIP's contrastive temperature: not used to condition the UNet": 1,
        "projection after the last layer: SD 2.x reads the penultimate layer": 1,
        "text layer after the penultimate: SD 2.x reads the penultimate layer": 12}
    assert lp.pipe.tokenizer.pad_token == "!"
    ids = lp.pipe.tokenizer(["a red cube"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():  # what SD 2's FrozenOpenCLIPEmbedder(layer="penultimate") computes with open_clip
        x = text.token_embedding(ids) + text.positional_embedding
        for block in text.transformer.resblocks[:-1]:
            x = block(x, attn_mask=text.attn_mask)
        expected = text.ln_final(x)
        assert torch.allclose(lp.pipe.text_encoder(ids).last_hidden_state, expected, atol=1e-5)
        xs, t, ctx = torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 77, 64)  # 2x2 at the 4th level
        assert torch.allclose(lp.pipe.unet(xs, t, ctx).sample, unet(xs, t, ctx).sample, atol=1e-5)
    assert bool(torch.isfinite(torch.from_numpy(_render(lp.pipe, size=128))).all())


def test_sd2_prediction_type_rules(sd2, tmp_path):
    path, *_ = sd2
    tensors = load_file(str(path))
    tensors[PROBE] = torch.randn(tensors[PROBE].shape) * 0.2  # a trained 768-v model's probe is wide
    save_file(tensors, str(tmp_path / "v.safetensors"))
    det = detect_architecture(tmp_path / "v.safetensors")
    assert det.prediction_type == "v_prediction" and "> 0.09" in det.prediction_reason
    del tensors[PROBE]  # no probe: diffusers' default for SD 2.x single files
    save_file(tensors, str(tmp_path / "noprobe.safetensors"))
    det = detect_architecture(tmp_path / "noprobe.safetensors")
    assert det.prediction_type == "v_prediction" and "diffusers" in det.prediction_reason
    with pytest.raises(SelmaError, match=r"1 tensor\(s\) missing.*up_blocks\.3\.attentions\.2\.transformer_blocks\.0\.norm1\.bias"):
        load_pipeline(ModelConfig(str(tmp_path / "noprobe.safetensors")))


def test_a_key_no_rule_maps_is_an_error_naming_it(sd2, tmp_path):
    path, *_ = sd2
    tensors = load_file(str(path))
    tensors[UNET + "input_blocks.1.7.mystery.weight"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(SelmaError, match=r"1 tensor\(s\) match no part.*input_blocks\.1\.7\.mystery\.weight"):
        load_pipeline(ModelConfig(str(tmp_path / "extra.safetensors")))


def test_pickle_checkpoint_loads_only_with_the_opt_in_and_weights_only(sd2, tmp_path, monkeypatch):
    path, *_ = sd2
    ckpt = tmp_path / "sd2.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 875000}, ckpt)
    with pytest.raises(SelmaError, match=r"sd2\.ckpt.*allow_pickle=True"):
        load_pipeline(ModelConfig(str(ckpt)))
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    lp = load_pipeline(ModelConfig(str(ckpt), allow_pickle=True, dtype="bf16"))
    assert calls and all(kw.get("weights_only") is True for kw in calls)
    assert lp.arch == "sd2" and lp.info["pickle"] is True and lp.pipe.unet.dtype == torch.bfloat16


def test_diffusers_folder_with_pickle_weights_needs_the_opt_in(tiny, tmp_path):
    import shutil

    folder = shutil.copytree(tiny["sd1"], tmp_path / "sd1-bin")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(SelmaError, match=r"unet/diffusion_pytorch_model\.bin.*allow_pickle"):
        load_pipeline(ModelConfig(str(folder)))
    lp = load_pipeline(ModelConfig(str(folder), allow_pickle=True))
    assert lp.arch == "sd1" and lp.info["format"] == "diffusers" and lp.info["pickle"] is True


# --- options, hashing ---------------------------------------------------------------------------------------


def test_options_dtype_sdpa_vae_savers_compile_and_scheduler(tiny, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor2_0

    compiled = []  # a spy: importing dynamo and compiling on 2 CPU cores would take longer than this whole file
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **kw: compiled.append(self))
    lp = load_pipeline(ModelConfig(str(tiny["sd1"]), dtype="bf16", vae_slicing=True, vae_tiling=True, compile=True,
                                   scheduler="dpmpp_2m", prediction_type="v_prediction"))
    pipe = lp.pipe
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert pipe.vae.use_slicing and pipe.vae.use_tiling
    assert compiled == [pipe.unet]  # in place: the module (and the names LoRA code looks up) unchanged
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.beta_end == 0.012
    assert pipe._progress_bar_config == {"disable": True}
    assert lp.info["config"]["scheduler"] == "dpmpp_2m" and lp.info["dtype"] == "bfloat16"
    json.dumps(lp.info)  # recordable as is


def test_model_hash_is_streamed_and_cached_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc" * 1000)
    cache = tmp_path / "cache"
    truth = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f, cache) == truth
    (entry,) = cache.glob("*.json")
    entry.write_text(entry.read_text().replace(truth, "f" * 64))
    assert file_sha256(f, cache) == "f" * 64  # unchanged file: the cache answers, nothing is re-read
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    assert file_sha256(f, cache) == truth  # touched: hashed again


# --- offline, end to end (last: its process ran beside everything above) -------------------------------------


def test_offline_with_an_empty_hf_cache_loads_and_renders_all_three(tiny):
    out, _ = tiny.offline.communicate(timeout=300)
    assert tiny.offline.returncode == 0, tiny.log.read_text()[-4000:]
    got = json.loads(out.strip().splitlines()[-1])
    assert {n: (r["arch"], r["pipe"], r["format"]) for n, r in got.items()} == {
        "sd1": ("sd1", "StableDiffusionPipeline", "diffusers"),
        "sdxl": ("sdxl", "StableDiffusionXLPipeline", "diffusers"),
        "mini-sd15": ("sd1", "StableDiffusionPipeline", "single_file")}
    for r in got.values():
        assert r["shape"] == [1, 64, 64, 3] and r["finite"] and r["std"] > 0  # a real (if noisy) image
    assert got["mini-sd15"]["hash"] == hashlib.sha256(tiny["mini-sd15"].read_bytes()).hexdigest()
    assert [p for p in tiny.hf_home.rglob("*") if p.is_file()] == []  # nothing fetched, nothing cached
