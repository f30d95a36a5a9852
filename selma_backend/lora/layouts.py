"""Any LoRA file in, any layout out: kohya, PEFT/diffusers and ComfyUI-native names, converted exactly.

The three layouts of one module (SD 1.x, first attention of the UNet)::

    kohya   lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight / .lora_up.weight / .alpha
    peft    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight
            (alpha in the ``lora_adapter_metadata`` JSON that diffusers' ``save_lora_weights`` writes)
    comfy   diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight / .lora_up.weight / .alpha
            text encoders: text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight

The kohya layout is the hub every conversion passes through (SELMA writes it: ComfyUI, A1111/Forge,
kohya tools and diffusers all read it). Tensors move unchanged, alphas are carried as numbers, so
kohya -> peft -> kohya and kohya -> comfy -> kohya give the same tensors (a kohya module without
``.alpha`` comes back with ``.alpha = r``, which every loader reads the same way).

Converting peft or comfy names needs the base model's UNet layout (:func:`resolve_names`): from the
caller, else from the file's metadata or shapes (:mod:`.bases`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SelmaError, invalid
from .bases import base_from_metadata, base_from_shapes, base_names
from .format import (
    DIFFUSERS_METADATA_KEY,
    KOHYA_ALPHA,
    KOHYA_DOWN,
    KOHYA_UP,
    PEFT_A,
    Layout,
    detect_layout,
    diffusers_metadata,
    kohya_to_peft,
    load_lora,
    peft_to_kohya,
    save_lora,
    split_component,
)
from .names import BASE_VERSIONS, LoraArch, NameMap

LAYOUTS: tuple[Layout, ...] = ("kohya", "peft", "comfy")
#: diffusers text-encoder component -> ComfyUI's clip model name, per base.
COMFY_TEXT = {"sd_v1": {"text_encoder": "clip_l"}, "sd_v2": {"text_encoder": "clip_h"},
              "sdxl_base_v1-0": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}}
_SUFFIXES = (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA)


@dataclass(frozen=True)
class LoraFile:
    """A LoRA read from disk: its own layout, and its tensors in kohya layout (the merge's key space)."""

    path: Path
    layout: Layout
    kohya: dict[str, torch.Tensor]
    metadata: dict[str, str]
    base: str | None  # from metadata, else from shapes; None: unknown (e.g. a tiny test model)
    names: NameMap | None = field(default=None, repr=False)  # how its names were converted (peft/comfy)

    @property
    def modules(self) -> list[str]:
        """kohya module names (``lora_unet_...``), sorted."""
        return sorted({k[: -len(KOHYA_DOWN)] for k in self.kohya if k.endswith(KOHYA_DOWN)})


def resolve_names(base: str | None, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor],
                  arch: LoraArch | None = None, *, what: str = "this LoRA") -> NameMap:
    """The names to convert with: those of ``arch``, else of the base from ``base`` / metadata / shapes
    (:func:`.bases.base_names`)."""
    if arch is not None:
        return NameMap(arch)
    found = base or base_from_metadata(metadata) or base_from_shapes(tensors)
    if found is None:
        raise invalid("base", None, BASE_VERSIONS,
                      f"{what} names no base model (no ss_base_model_version) and its shapes fit none; "
                      "name the base model (--base, or the node's base input)")
    return base_names(found)


def read_lora(path: str | os.PathLike[str], *, base: str | None = None, arch: LoraArch | None = None) -> LoraFile:
    """Read a LoRA file of any layout; ``kohya`` holds its tensors in kohya layout.

    ``base``/``arch`` are needed only for peft/comfy files whose metadata and shapes name no base.
    Errors name the file.
    """
    from safetensors import SafetensorError

    path = Path(path)
    try:
        tensors, metadata = load_lora(path)
        layout = detect_layout(tensors)
        found = base or base_from_metadata(metadata) or base_from_shapes(tensors)
        names = resolve_names(found, metadata, tensors, arch, what=path.name) if layout != "kohya" or arch else None
        if layout == "kohya":
            return LoraFile(path, layout, dict(tensors), metadata, found, names)
        return LoraFile(path, layout, to_kohya(tensors, metadata, layout, names), metadata, found or names.arch.base,
                        names)
    except SelmaError as e:
        raise SelmaError(f"{path}: {e}") from e
    except (OSError, RuntimeError, SafetensorError) as e:  # not a safetensors file, header too large, truncated
        raise SelmaError(f"{path}: not a readable .safetensors LoRA file ({e})") from e


def to_kohya(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], layout: Layout,
             names: NameMap | None) -> dict[str, torch.Tensor]:
    """Tensors of ``layout`` -> kohya layout (same tensor objects; alphas as float32 scalars)."""
    if layout == "kohya":
        return dict(tensors)
    if names is None:
        raise invalid("names", None, "a NameMap", f"{layout} names need the base model's UNet layout")
    if layout == "peft":
        return peft_to_kohya(tensors, arch=names.arch, alpha_by_module=peft_alphas(tensors, metadata), names=names)
    if layout == "comfy":
        back = {v: k for k, v in _comfy_names(names).items()}
        out = {}
        for key, t in tensors.items():
            suffix = next(s for s in _SUFFIXES if key.endswith(s))
            stem = key[: -len(suffix)]
            if stem not in back:
                raise invalid("ComfyUI LoRA module", stem, f"a module of the {names.arch.base} UNet or text encoders",
                              "is the LoRA for another base model?")
            out[back[stem] + suffix] = t
        return out
    raise invalid("layout", layout, LAYOUTS)


def from_kohya(kohya: Mapping[str, torch.Tensor], layout: Layout, names: NameMap | None,
               metadata: Mapping[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """kohya tensors -> (tensors of ``layout``, metadata for that layout).

    ``metadata`` (e.g. the source's ``ss_*`` and ``selma.provenance``) is kept; a peft file gets diffusers'
    ``lora_adapter_metadata`` with every module's rank and alpha, so ``load_lora_weights`` scales exactly.
    """
    meta = {k: v for k, v in (metadata or {}).items() if k != DIFFUSERS_METADATA_KEY}
    if layout == "kohya":
        return dict(kohya), meta
    if names is None:
        raise invalid("names", None, "a NameMap", f"{layout} names need the base model's UNet layout")
    if layout == "peft":
        tensors, alphas = kohya_to_peft(kohya, arch=names.arch, names=names)
        return tensors, {**meta, **diffusers_metadata(_lora_configs(tensors, alphas))}
    if layout == "comfy":
        table = _comfy_names(names)
        out = {}
        for key, t in kohya.items():
            suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
            stem = key[: -len(suffix)] if suffix else key
            if suffix is None or stem not in table:
                raise invalid("kohya module", stem, f"a module of the {names.arch.base} UNet or text encoders")
            out[table[stem] + suffix] = t
        return out, meta
    raise invalid("layout", layout, LAYOUTS)


def convert_lora(src: str | os.PathLike[str], dst: str | os.PathLike[str], layout: Layout, *,
                 base: str | None = None, arch: LoraArch | None = None, overwrite: bool = False) -> Path:
    """Write ``src`` (any layout) to ``dst`` in ``layout`` (atomic; an existing ``dst`` is an error unless
    ``overwrite``). Tensors are copied unchanged: the conversion is exact."""
    if layout not in LAYOUTS:
        raise invalid("layout", layout, LAYOUTS)
    lora = read_lora(src, base=base, arch=arch)
    names = lora.names
    if layout != "kohya" and names is None:
        names = resolve_names(lora.base, lora.metadata, lora.kohya, what=Path(src).name)
    tensors, meta = from_kohya(lora.kohya, layout, names, lora.metadata)
    return save_lora(dst, tensors, meta, overwrite=overwrite)


# --- names ------------------------------------------------------------------------------------------------


def _comfy_names(names: NameMap) -> dict[str, str]:
    """kohya module -> ComfyUI-native module, for every UNet module and text-encoder leaf ``names`` knows."""
    out = {names.to_kohya(f"unet.{d}"): f"diffusion_model.{ldm}" for d, ldm in names.ldm.items()}
    for component, clip in COMFY_TEXT[names.arch.base].items():
        for layer in range(48):  # more layers than any SD-family text encoder has
            for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                         "mlp.fc1", "mlp.fc2"):
                module = f"text_model.encoder.layers.{layer}.{leaf}"
                out[names.to_kohya(f"{component}.{module}")] = f"text_encoders.{clip}.transformer.{module}"
    return out


# --- PEFT alphas ------------------------------------------------------------------------------------------


def peft_alphas(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, float]:
    """``{"unet.<module>": alpha}`` of a PEFT/diffusers-layout file.

    From diffusers' ``lora_adapter_metadata`` (``<component>.lora_alpha`` and ``.alpha_pattern``, matched as
    PEFT matches patterns: the module name ends with the pattern); without it ``alpha = r``, which is what
    ``load_lora_weights`` assumes then.
    """
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    try:
        config = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise invalid(DIFFUSERS_METADATA_KEY, raw[:80], "JSON (as diffusers writes it)") from e
    out = {}
    for key, a in tensors.items():
        if not key.endswith(PEFT_A):
            continue
        stem = key[: -len(PEFT_A)]
        component, module = split_component(stem)
        alpha = float(a.shape[0])
        if f"{component}.lora_alpha" in config:
            alpha = float(config[f"{component}.lora_alpha"])
        for pattern, value in (config.get(f"{component}.alpha_pattern") or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                alpha = float(value)
                break
        out[f"{component}.{module}"] = alpha
    return out


def _lora_configs(tensors: Mapping[str, torch.Tensor], alphas: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per component, the ``LoraConfig`` kwargs diffusers rebuilds the adapter from (every module spelled out)."""
    configs: dict[str, dict[str, Any]] = {}
    for module, alpha in sorted(alphas.items()):
        component, _, name = module.partition(".")
        rank = int(tensors[module + PEFT_A].shape[0])
        c = configs.setdefault(component, {"r": rank, "lora_alpha": alpha, "target_modules": [],
                                           "rank_pattern": {}, "alpha_pattern": {}})
        c["target_modules"].append(name)
        c["rank_pattern"][name] = rank
        c["alpha_pattern"][name] = alpha
    return configs
