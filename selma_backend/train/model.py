"""The trainable part: PEFT LoRA adapters on a loaded pipeline's UNet (and text encoders), fp32
LoRA weights over a frozen base in the training dtype, and the export to a LoRA file.

``attach`` -> train -> ``export_lora`` -> ``detach``: the base model is loaded once and several experts
are trained on it one after another; each gets a fresh adapter seeded from its config.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import SelmaError
from ..lora.format import diffusers_metadata, kohya_metadata, peft_to_kohya, save_lora
from ..lora.names import LoraArch
from . import fused_lora
from .config import PRESETS, TEXT_TARGETS, TrainConfig
from .fused_lora import ADAPTER

BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def text_encoders(pipe: Any) -> dict[str, Any]:
    """``{"text_encoder": m, "text_encoder_2": m2}`` for the encoders the pipeline has."""
    return {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


def target_modules(model: torch.nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the Linear/Conv2d modules of ``model`` whose name is or ends with ``.<suffix>``."""
    names = [name for name, m in model.named_modules()
             if isinstance(getattr(m, "base_layer", m), (torch.nn.Linear, torch.nn.Conv2d))  # PEFT wraps layers
             and any(name == s or name.endswith("." + s) for s in suffixes)]
    if not names:
        raise SelmaError(f"no module of {type(model).__name__} matches the LoRA targets {list(suffixes)}; "
                         "is this an SD-family model?")
    return names


def attach(pipe: Any, config: TrainConfig, fused: bool = True) -> list[torch.nn.Parameter]:
    """Freeze the pipeline, add a fresh LoRA adapter (init seeded by ``config.seed``), return its
    parameters, cast to fp32 (the optimizer and the gradients stay full precision). With ``fused``,
    the adapter's ``Linear`` layers run :mod:`.fused_lora`'s forward and backward (same result, faster).

    The UNet gets it through diffusers' ``add_adapter``; text encoders through PEFT's
    ``inject_adapter_in_model`` (transformers' own ``add_adapter`` demands a newer PEFT than PyPI has)."""
    from peft import LoraConfig, inject_adapter_in_model

    for module in (pipe.unet, pipe.vae, *text_encoders(pipe).values()):
        module.requires_grad_(False)
    torch.manual_seed(config.seed)

    def lora(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          init_lora_weights="gaussian", target_modules=targets)

    pipe.unet.add_adapter(lora(target_modules(pipe.unet, PRESETS.get(config.preset))), adapter_name=ADAPTER)
    if config.text_encoder_lora:
        for te in text_encoders(pipe).values():
            inject_adapter_in_model(lora(target_modules(te, TEXT_TARGETS)), te, adapter_name=ADAPTER)
    params = [p for _, m in lora_modules(pipe) for p in (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight)]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    if fused:
        for model in (pipe.unet, *text_encoders(pipe).values()):
            fused_lora.install(model)
    return params


def lora_modules(pipe: Any) -> list[tuple[str, torch.nn.Module]]:
    """``("<component>.<module path>", layer)`` for every layer carrying our adapter."""
    out = []
    for component, model in (("unet", pipe.unet), *text_encoders(pipe).items()):
        # transformers 5 flattened CLIPTextModel (no ``text_model.`` level); LoRA files keep the classic names
        prefix = "" if component == "unet" or hasattr(model, "text_model") else "text_model."
        for name, m in model.named_modules():
            lora_a = getattr(m, "lora_A", None)
            if isinstance(lora_a, torch.nn.ModuleDict) and ADAPTER in lora_a:
                out.append((f"{component}.{prefix}{name}", m))
    return out


def detach(pipe: Any) -> None:
    """Remove the adapter (the base weights were never changed); with no other adapter left, the PEFT
    wrappers go too, so the modules are the original ones again."""
    from diffusers.utils import recurse_remove_peft_layers

    unet = pipe.unet
    for model in (unet, *text_encoders(pipe).values()):
        fused_lora.uninstall(model)
    if ADAPTER in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(ADAPTER)
    if not getattr(unet, "peft_config", None):
        recurse_remove_peft_layers(unet)
        unet._hf_peft_config_loaded = False
    for te in text_encoders(pipe).values():
        if any(isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and ADAPTER in m.lora_A
               for m in te.modules()):
            recurse_remove_peft_layers(te)


def named_lora_params(pipe: Any) -> dict[str, torch.nn.Parameter]:
    """Trainable LoRA parameters by a stable name (``unet.<module>.lora_A.weight`` ...)."""
    out = {}
    for name, m in lora_modules(pipe):
        out[f"{name}.lora_A.weight"] = m.lora_A[ADAPTER].weight
        out[f"{name}.lora_B.weight"] = m.lora_B[ADAPTER].weight
    return out


def lora_state(pipe: Any) -> dict[str, torch.Tensor]:
    """PEFT-layout LoRA tensors with component prefixes (``unet.down_blocks...lora_A.weight``), fp32 copies."""
    return {k: p.detach().float().cpu().clone() for k, p in named_lora_params(pipe).items()}


def dataset_hash(samples: list[Any]) -> str:
    """sha256 over exactly what trained: each kept image's bytes hash, caption and flip policy, sorted."""
    lines = sorted(f"{s.image_sha256}\t{s.flip}\t{s.caption}" for s in samples)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def export_lora(pipe: Any, arch: str, path: str | os.PathLike[str], config: TrainConfig,
                provenance: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write the adapter as a LoRA file: kohya layout with ``ss_*`` + ``selma.provenance`` metadata,
    or PEFT/diffusers layout (``config.export_format``)."""
    state = lora_state(pipe)
    lora_arch = LoraArch.from_unet_config(pipe.unet.config, BASE_VERSION[arch])  # type: ignore[arg-type]
    meta = kohya_metadata(arch=lora_arch, rank=config.rank, alpha=config.alpha,
                          comment=f"SELMA expert: {provenance.get('skill', '')}", provenance=provenance)
    meta.update({"ss_steps": str(provenance.get("steps", "")), "ss_learning_rate": repr(config.lr),
                 "ss_resolution": f"({config.resolution}, {config.resolution})", "ss_seed": str(config.seed)})
    if config.export_format == "kohya":
        tensors = peft_to_kohya(state, arch=lora_arch, alpha_by_module=config.alpha)
    else:
        tensors = state
        modules: dict[str, set[str]] = {}
        for key in state:
            component, rest = key.split(".", 1)
            module = rest.rsplit(".lora_", 1)[0]
            if component != "unet":  # PEFT matches names in the live model (transformers 5: no text_model.)
                module = module.split(".", 1)[1] if module.startswith("text_model.") else module
            modules.setdefault(component, set()).add(module)
        meta.update(diffusers_metadata({c: {"r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
                                            "target_modules": sorted(m)} for c, m in modules.items()}))
    return save_lora(path, tensors, meta, overwrite=overwrite)
