"""Expert LoRA files for the merge tests: random non-zero factors on the tiny SD1 UNet's attention and its
text encoder, any rank/alpha/dtype/layout, optionally without some modules."""

from __future__ import annotations

from pathlib import Path

import torch

from selma_backend.lora import (
    LoraArch,
    NameMap,
    attention_shapes,
    from_kohya,
    kohya_metadata,
    peft_to_kohya,
    save_lora,
)
from selma_backend.tiny.diffusion import SD1_UNET, TEXT_ENCODER

ARCH = LoraArch.from_unet_config(SD1_UNET, "sd_v1")
_H, _I = TEXT_ENCODER["hidden_size"], TEXT_ENCODER["intermediate_size"]
TE_SHAPES = {f"text_encoder.text_model.encoder.layers.{i}.{leaf}": shape
             for i in range(TEXT_ENCODER["num_hidden_layers"])
             for leaf, shape in (("self_attn.q_proj", (_H, _H)), ("self_attn.k_proj", (_H, _H)),
                                 ("self_attn.v_proj", (_H, _H)), ("self_attn.out_proj", (_H, _H)),
                                 ("mlp.fc1", (_I, _H)), ("mlp.fc2", (_H, _I)))}


def shapes(te: bool = True) -> dict[str, tuple[int, int]]:
    """``component.module -> (out, in)`` of every LoRA target: UNet attention projections (+ text encoder)."""
    unet = {f"unet.{m}": s for m, s in attention_shapes(SD1_UNET).items()}
    return {**unet, **(TE_SHAPES if te else {})}


def expert_tensors(rank: int, alpha: float, seed: int, *, dtype: torch.dtype = torch.float32, te: bool = True,
                   drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """kohya tensors of one expert; modules whose name contains any of ``drop`` are left out."""
    g = torch.Generator().manual_seed(seed)
    peft = {}
    for module, (n_out, n_in) in shapes(te).items():
        if any(d in module for d in drop):
            continue
        peft[f"{module}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g, dtype=torch.float64) / n_in**0.5).to(dtype)
        peft[f"{module}.lora_B.weight"] = (torch.randn(n_out, rank, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    return peft_to_kohya(peft, arch=ARCH, alpha_by_module=alpha)


def write_expert(path: Path, rank: int, alpha: float, seed: int, *, layout: str = "kohya", base: str | None = "sd_v1",
                 **kw) -> Path:
    """Write an expert file in ``layout`` (kohya/peft/comfy) with kohya ``ss_*`` metadata (``base`` None: none)."""
    kohya = expert_tensors(rank, alpha, seed, **kw)
    meta = kohya_metadata(arch=ARCH, rank=rank, alpha=alpha) if base else {}
    if base and base != "sd_v1":
        meta["ss_base_model_version"] = base
    tensors, meta = from_kohya(kohya, layout, NameMap(ARCH), meta)  # type: ignore[arg-type]
    return save_lora(path, tensors, meta)


def module_delta(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor | None:
    """``(alpha / r) up @ down`` of a kohya module in float64 (None if the file lacks it)."""
    if module + ".lora_down.weight" not in tensors:
        return None
    down, up = tensors[module + ".lora_down.weight"].double(), tensors[module + ".lora_up.weight"].double()
    alpha = float(tensors[module + ".alpha"]) if module + ".alpha" in tensors else down.shape[0]
    return (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))


def weighted_sum(experts: list[dict[str, torch.Tensor]], weights: list[float], module: str) -> torch.Tensor:
    """``sum_i w_i dW_i`` over the experts that have ``module`` (float64)."""
    parts = [w * d for e, w in zip(experts, weights, strict=True) if (d := module_delta(e, module)) is not None]
    return sum(parts[1:], parts[0])


def mini_experts(ckpt: Path, folder: Path) -> tuple[list[Path], dict[str, str]]:
    """Three different experts for the mini SD1.5 checkpoint (UNet attention + CLIP-L layers; ranks 4, 4, 6,
    alphas 8, 2, 3), made from test_lora_format's helper. Returns (files, kohya module -> ComfyUI weight key)."""
    from test_lora_format import MINI, _mini_lora

    arch = LoraArch.from_unet_config(MINI, "sd_v1")  # type: ignore[arg-type]
    kohya, targets = _mini_lora(ckpt, arch)
    files = []
    for i, (scale, alpha) in enumerate(((1.0, 8.0), (-0.7, 2.0), (0.4, 3.0))):
        t = {k: (torch.roll(v, i, dims=1) * scale if k.endswith("up.weight") else v) for k, v in kohya.items()
             if not k.endswith(".alpha")}
        t.update({k: torch.tensor(alpha) for k in kohya if k.endswith(".alpha")})
        if i == 2:  # a wider expert: rank 6
            t = {k: (torch.cat([v, v[:2] * 0.5]) if k.endswith("down.weight") else
                     torch.cat([v, v[:, :2]], dim=1) if k.endswith("up.weight") else v) for k, v in t.items()}
        files.append(save_lora(folder / f"x{i}.safetensors", t, kohya_metadata(arch=arch, rank=4, alpha=alpha)))
    return files, targets
