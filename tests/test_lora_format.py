"""The LoRA format module: kohya <-> PEFT exact, diffusers renders our file, ComfyUI matches every key.

(a) ComfyUI's own loader (subprocess, cwd = ComfyUI) on mini-sd15: no unmatched key, each patched
    weight == base + up @ down * alpha / r;
(b) diffusers ``load_lora_weights(our kohya file)`` == the in-memory PEFT UNet, one UNet call (atol 1e-6);
(c) PEFT -> kohya file -> PEFT is exact (torch.equal), alphas and metadata included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from harness.comfy import COMFY_PROLOGUE, comfyui_source_dir

from selma_backend.errors import SelmaError
from selma_backend.lora import (
    LoraArch,
    NameMap,
    delta_weight,
    detect_layout,
    diffusers_metadata,
    kohya_metadata,
    kohya_to_peft,
    load_lora,
    peft_to_kohya,
    provenance,
    save_lora,
    unet_module_map,
)

RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Path:
    from selma_backend.tiny_models import write_sd1

    return write_sd1(tmp_path_factory.mktemp("lora-fmt") / "sd1", seed=0)


@pytest.fixture(scope="module")
def peft_unet(sd1):
    """The tiny SD1 UNet with a PEFT LoRA whose B is not zero (so the LoRA changes the output)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(sd1 / "unet")
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False))
    return unet.eval()


def _sd1_arch(unet, unet_names: str = "kohya") -> LoraArch:
    return LoraArch.from_unet_config(unet.config, "sd_v1", unet_names)  # type: ignore[arg-type]


def _peft_state(unet) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet)  # "down_blocks....to_q.lora_A.weight", adapter name dropped


# --- (c) round trip -----------------------------------------------------------------------------


def test_kohya_names_sd1_diffusers_paths_or_ldm_paths(peft_unet):
    """kohya's SD 1.x LoRAs name diffusers modules; its SDXL ones (and ``unet_names="ldm"``) LDM modules."""
    kohya = peft_to_kohya(_peft_state(peft_unet), arch=_sd1_arch(peft_unet), alpha_by_module=ALPHA)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0.alpha" in kohya
    assert detect_layout(kohya) == "kohya"
    kohya = peft_to_kohya(_peft_state(peft_unet), arch=_sd1_arch(peft_unet, "ldm"), alpha_by_module=ALPHA)
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k.alpha" in kohya
    assert detect_layout(kohya) == "kohya"


@pytest.mark.parametrize("unet_names", ["kohya", "ldm"])
def test_peft_kohya_round_trip_is_exact(peft_unet, tmp_path, unet_names):
    arch, peft_sd = _sd1_arch(peft_unet, unet_names), _peft_state(peft_unet)
    assert len(peft_sd) == 2 * 4 * 2 * 6  # A,B x 4 projections x attn1/attn2 x 6 transformers (2 down, 1 mid, 3 up)
    alphas = {f"unet.{k[: -len('.lora_A.weight')]}": ALPHA + i for i, k in enumerate(sorted(peft_sd)) if "lora_A" in k}
    meta = kohya_metadata(arch=arch, rank=RANK, alpha=ALPHA, comment="test",
                          provenance={"skill": "counting", "dataset_sha256": "ab" * 32, "config": {"rank": RANK}})
    path = save_lora(tmp_path / "x.safetensors", peft_to_kohya(peft_sd, arch=arch, alpha_by_module=alphas), meta)

    tensors, read_meta = load_lora(path)
    back, back_alphas = kohya_to_peft(tensors, arch=arch)
    assert back.keys() == {f"unet.{k}" for k in peft_sd}
    for k, t in peft_sd.items():
        assert torch.equal(back[f"unet.{k}"], t), k  # exact: tensors are moved, never recomputed
    assert back_alphas == alphas
    assert read_meta == meta and read_meta["ss_network_module"] == "networks.lora"
    assert provenance(read_meta)["skill"] == "counting"


def test_text_encoder_names_and_sdxl_prefixes():
    from selma_backend.tiny.diffusion import SDXL_UNET

    arch = LoraArch.from_unet_config(SDXL_UNET, "sdxl_base_v1-0")
    a, b = torch.randn(2, 32), torch.randn(32, 2)
    sd = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": a,
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": b,
          "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_A.weight": a,
          "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.lora_B.weight": b,
          "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_v.lora_A.weight": a,
          "unet.mid_block.attentions.0.transformer_blocks.1.attn2.to_v.lora_B.weight": b}
    kohya = peft_to_kohya(sd, arch=arch, alpha_by_module=1.0)
    assert {k.rsplit(".", 2)[0] for k in kohya if k.endswith("lora_down.weight")} == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_1_mlp_fc2",
        "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_v"}
    back, _ = kohya_to_peft(kohya, arch=arch)
    assert back.keys() == sd.keys()


def test_errors_teach(peft_unet, tmp_path):
    arch = _sd1_arch(peft_unet)
    with pytest.raises(SelmaError, match="lora_unet_input_blocks_9_1"):
        kohya_to_peft({"lora_unet_input_blocks_9_1_proj_in.lora_down.weight": torch.zeros(1, 1),
                       "lora_unet_input_blocks_9_1_proj_in.lora_up.weight": torch.zeros(1, 1)}, arch=arch)
    with pytest.raises(SelmaError, match="lora_A.weight and lora_B.weight"):
        peft_to_kohya({"conv_in.lora_A.weight": torch.zeros(1, 1)}, arch=arch, alpha_by_module=1.0)
    with pytest.raises(SelmaError, match="one layout"):
        detect_layout({"lora_unet_x.lora_down.weight": 0, "a.lora_A.weight": 0})
    tensors = {"a.lora_A.weight": torch.zeros(1, 2), "a.lora_B.weight": torch.zeros(2, 1)}
    with pytest.raises(SelmaError, match="a string"):
        save_lora(tmp_path / "m.safetensors", tensors, {"ss_network_dim": 4})  # type: ignore[dict-item]
    save_lora(tmp_path / "y.safetensors", tensors, {})
    with pytest.raises(SelmaError, match="exists already"):
        save_lora(tmp_path / "y.safetensors", tensors, {})
    save_lora(tmp_path / "y.safetensors", tensors, {"k": "v"}, overwrite=True)
    assert load_lora(tmp_path / "y.safetensors")[1] == {"k": "v"}


def test_delta_weight_equals_peft(peft_unet):
    layer = peft_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k  # (32, 32) <- context 32
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(delta_weight(a, b, ALPHA), layer.get_delta_weight("default"), rtol=1e-6, atol=1e-7)
    conv = delta_weight(torch.randn(2, 3, 3, 3), torch.randn(5, 2, 1, 1), 1.0)  # kohya conv: k x k down, 1x1 up
    assert conv.shape == (5, 3, 3, 3)


# --- (b) diffusers reads our kohya file ---------------------------------------------------------------


def test_diffusers_load_lora_weights_matches_peft(sd1, peft_unet, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    arch = _sd1_arch(peft_unet)
    kohya = peft_to_kohya(_peft_state(peft_unet), arch=arch, alpha_by_module=ALPHA)
    save_lora(tmp_path / "skill.safetensors", kohya, kohya_metadata(arch=arch, rank=RANK, alpha=ALPHA))

    pipe = StableDiffusionPipeline.from_pretrained(sd1, safety_checker=None, requires_safety_checker=False)
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        base = pipe.unet(x, 10, ctx).sample
        pipe.load_lora_weights(str(tmp_path), weight_name="skill.safetensors")
        ours = pipe.unet(x, 10, ctx).sample
        want = peft_unet(x, 10, ctx).sample
    assert (want - base).abs().max() > 1e-3  # the LoRA does something
    # fp32, same factors and scale alpha/r through both code paths: equal in practice (observed max |diff| 0.0
    # on outputs of size ~1.5); 1e-6 absolute leaves room for a BLAS that sums in another order.
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-6)


def test_diffusers_layout_on_request_renders_the_same(sd1, peft_unet, tmp_path, monkeypatch):
    """PEFT layout + diffusers' ``lora_adapter_metadata``: ``load_lora_weights`` gets alpha right too."""
    from diffusers import StableDiffusionPipeline

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    tensors = {f"unet.{k}": t for k, t in _peft_state(peft_unet).items()}
    meta = diffusers_metadata({"unet": peft_unet.peft_config["default"].to_dict()})
    save_lora(tmp_path / "skill.safetensors", tensors, meta)
    assert detect_layout(load_lora(tmp_path / "skill.safetensors")[0]) == "peft"

    pipe = StableDiffusionPipeline.from_pretrained(sd1, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="skill.safetensors")
    gen = torch.Generator().manual_seed(2)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(x, 10, ctx).sample, peft_unet(x, 10, ctx).sample, rtol=0, atol=1e-6)


# --- (a) ComfyUI's own loader -------------------------------------------------------------------------

MINI = {"down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
        "layers_per_block": 1}  # the mini-sd15 UNet: one level, one res block, depth 1
TE_LAYERS = (0, 5, 11)
TE_LEAVES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

COMFY_LORA_CHECK = COMFY_PROLOGUE + r"""
import torch
import comfy.sd, comfy.utils
model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(os.environ["CKPT"], output_vae=False, output_clip=True)
results = []
for spec in json.loads(os.environ["LORAS"]):  # [{"path": file, "targets": {kohya module: ComfyUI key}}]
    messages.clear()
    lora = comfy.utils.load_torch_file(spec["path"], safe_load=True)
    m2, c2 = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    out = {"not_loaded": [m for m in messages if "not loaded" in m.lower()],
           "patched": len(m2.patches) + len(c2.patcher.patches), "errors": {}}
    for mod, key in spec["targets"].items():
        patcher = m2 if key.startswith("diffusion_model.") else c2.patcher
        base = patcher.model.state_dict()[key].float().clone()
        down, up = lora[mod + ".lora_down.weight"].float(), lora[mod + ".lora_up.weight"].float()
        scale = float(lora[mod + ".alpha"]) / down.shape[0]
        want = base + (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * scale
        patcher.patch_weight_to_device(key)
        got = patcher.model.state_dict()[key]
        out["errors"][mod] = [str(got.dtype), float((got.float() - want).abs().max()), float((want - base).abs().max())]
        patcher.unpatch_model()
    results.append(out)
out = results
print(json.dumps(out))
"""


def _mini_lora(ckpt: Path, arch: LoraArch) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Random non-zero factors on every UNet attention projection and on a few CLIP-L layers.

    Returns (kohya tensors, kohya module -> the ComfyUI key it must patch). Shapes are read from the
    checkpoint through our own mapping, so a wrong mapping fails here or in ComfyUI."""
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(0)
    peft: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}  # diffusers module -> checkpoint key
    for d, ldm in unet_module_map(arch).items():
        if any(d.endswith(f"attn{i}.{t}") for i in (1, 2) for t in TARGETS):
            where[f"unet.{d}"] = f"model.diffusion_model.{ldm}.weight"
    for i in TE_LAYERS:
        for leaf in TE_LEAVES:
            where[f"text_encoder.text_model.encoder.layers.{i}.{leaf}"] = (
                f"cond_stage_model.transformer.text_model.encoder.layers.{i}.{leaf}.weight")
    with safe_open(str(ckpt), framework="pt") as f:
        for module, key in where.items():
            n_out, n_in = f.get_slice(key).get_shape()
            peft[f"{module}.lora_A.weight"] = torch.randn(RANK, n_in, generator=gen) * 0.1
            peft[f"{module}.lora_B.weight"] = torch.randn(n_out, RANK, generator=gen) * 0.1
    alphas = {m: (2.0 if m.startswith("text_encoder") else ALPHA) for m in where}
    kohya = peft_to_kohya(peft, arch=arch, alpha_by_module=alphas)
    comfy_key = {"model.diffusion_model.": "diffusion_model.", "cond_stage_model.transformer.": "clip_l.transformer."}
    names = NameMap(arch)
    targets = {}
    for module, key in where.items():
        prefix = next(p for p in comfy_key if key.startswith(p))
        targets[names.to_kohya(module)] = comfy_key[prefix] + key[len(prefix):]
    return kohya, targets


def test_comfyui_loads_every_key_and_patches_exactly(tmp_path):
    """Both UNet name styles (kohya's SD 1.x diffusers paths, LDM paths) through ComfyUI 0.3.75's loader."""
    from selma_backend.tiny_models import write_mini_sd15

    ckpt = write_mini_sd15(tmp_path / "mini-sd15.safetensors", seed=0)
    specs = []
    for names in ("kohya", "ldm"):
        arch = LoraArch.from_unet_config(MINI, "sd_v1", names)  # type: ignore[arg-type]
        kohya, targets = _mini_lora(ckpt, arch)
        path = save_lora(tmp_path / f"mini-{names}.safetensors", kohya, kohya_metadata(arch=arch, rank=RANK, alpha=ALPHA))
        specs.append({"path": str(path), "targets": targets, "n": len(kohya) // 3})
    env = {**os.environ, **OFFLINE, "CKPT": str(ckpt), "LORAS": json.dumps(specs), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", COMFY_LORA_CHECK], cwd=comfyui_source_dir(), env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for spec, result in zip(specs, results, strict=True):
        assert result["not_loaded"] == [], spec["path"]
        assert result["patched"] == len(spec["targets"]) == spec["n"]
        for module, (dtype, err, size) in result["errors"].items():
            assert size > 1e-4, module  # the patch is not trivially zero
            # ComfyUI computes in fp32 and rounds to the weight's dtype (stochastically for fp16): allow that
            # dtype's rounding only. Observed: UNet fp32 weights 0.0, CLIP-L fp16 weights <= 5.7e-5 (tol ~2e-3).
            eps = torch.finfo(getattr(torch, dtype.removeprefix("torch."))).eps
            assert err <= 2 * eps * (1 + size) + 1e-6, (module, dtype, err)
