"""The LoRA file format: kohya layout (what A1111/Forge/ComfyUI/kohya read) <-> PEFT/diffusers layout.

kohya layout, one module ``m`` (``lora_unet_...`` / ``lora_te_...`` / ``lora_te1_...`` / ``lora_te2_...``)::

    m.lora_down.weight  (r, in)  or conv (r, in, kh, kw)     == PEFT lora_A.weight
    m.lora_up.weight    (out, r) or conv (out, r, 1, 1)      == PEFT lora_B.weight
    m.alpha             0-dim float32                       scale = alpha / r (PEFT: lora_alpha / r)

PEFT/diffusers layout: ``<component>.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` with
component ``unet``, ``text_encoder``, ``text_encoder_2`` (what ``pipe.load_lora_weights`` reads); alphas
live outside the tensors (``alpha_by_module``). Conversion moves tensors unchanged (same objects), so
both directions are exact.

Files: safetensors metadata is a string->string map. The safetensors writer does not keep the order of
metadata keys, so two saves of the same LoRA are content-equal (same tensors, same metadata), not
always byte-equal; to keep this to a minimum all SELMA provenance is one JSON value (sorted keys)
under ``selma.provenance``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..errors import invalid
from ..fsio import atomic_write_bytes
from .names import LoraArch, NameMap

Layout = Literal["kohya", "peft", "comfy"]
KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
PEFT_A, PEFT_B = ".lora_A.weight", ".lora_B.weight"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")  # ComfyUI-native names (its LoraSave / trainer write these)
PROVENANCE_KEY = "selma.provenance"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' loaders/lora_base.py LORA_ADAPTER_METADATA_KEY


def delta_weight(down: torch.Tensor, up: torch.Tensor, alpha: float | torch.Tensor | None) -> torch.Tensor:
    """The weight change one LoRA module makes: ``up @ down * alpha / r``, in float32.

    Shapes: linear ``down (r, in)``, ``up (out, r)`` -> ``(out, in)``; conv ``down (r, in, kh, kw)``,
    ``up (out, r, 1, 1)`` -> ``(out, in, kh, kw)``. ``alpha=None`` means ``alpha = r`` (scale 1), as
    kohya and ComfyUI read a module without ``.alpha``.
    """
    r = down.shape[0]
    if up.shape[1] != r or up.dim() != down.dim() or (up.dim() == 4 and up.shape[2:] != (1, 1)):
        raise invalid("up/down shapes", (tuple(up.shape), tuple(down.shape)),
                      "up (out, r[, 1, 1]) and down (r, in[, kh, kw]) with the same r")
    scale = 1.0 if alpha is None else float(alpha) / r
    delta = up.flatten(1).float() @ down.flatten(1).float()  # (out, in * kh * kw)
    return (delta * scale).reshape(up.shape[0], *down.shape[1:])


def split_component(key: str, default_component: str = "unet") -> tuple[str, str]:
    """``text_encoder.text_model...`` -> (``text_encoder``, ``text_model...``); no known prefix -> default."""
    head, _, rest = key.partition(".")
    return (head, rest) if head in COMPONENTS else (default_component, key)


def peft_to_kohya(
    state_dict: Mapping[str, torch.Tensor],
    *,
    arch: LoraArch,
    alpha_by_module: Mapping[str, float] | float,
    default_component: str = "unet",
    names: NameMap | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT/diffusers LoRA tensors -> kohya layout (tensors shared, not copied).

    ``state_dict`` keys are ``[component.]module.lora_A.weight`` / ``.lora_B.weight`` (keys without a
    component prefix, as ``get_peft_model_state_dict(unet)`` gives, belong to ``default_component``).
    ``alpha_by_module``: one ``lora_alpha`` for every module, or ``{"unet.module": alpha, ...}``.
    ``names``: a ready :class:`NameMap` of ``arch`` (e.g. one :meth:`NameMap.extended` with more modules).
    """
    if default_component not in COMPONENTS:
        raise invalid("default_component", default_component, COMPONENTS)
    names = names or NameMap(arch)
    out: dict[str, torch.Tensor] = {}
    for module, (a, b) in _peft_pairs(state_dict, default_component).items():
        if isinstance(alpha_by_module, Mapping):
            if module not in alpha_by_module:
                raise invalid("alpha_by_module", module, "a key for every LoRA module", "pass one float for all")
            alpha = alpha_by_module[module]
        else:
            alpha = alpha_by_module
        kohya = names.to_kohya(module)
        out[kohya + KOHYA_DOWN], out[kohya + KOHYA_UP] = a, b
        out[kohya + KOHYA_ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def kohya_to_peft(
    state_dict: Mapping[str, torch.Tensor], *, arch: LoraArch, names: NameMap | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """kohya layout -> (diffusers/PEFT tensors with component prefixes, ``alpha_by_module``).

    A module without ``.alpha`` gets ``alpha = r`` (kohya's reading). Exact inverse of :func:`peft_to_kohya`.
    """
    names = names or NameMap(arch)
    tensors: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    for kohya, parts in _group(state_dict, (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA)).items():
        if KOHYA_DOWN not in parts or KOHYA_UP not in parts:
            raise invalid("kohya module", kohya, "lora_down.weight and lora_up.weight both present")
        module = names.to_diffusers(kohya)
        tensors[module + PEFT_A], tensors[module + PEFT_B] = parts[KOHYA_DOWN], parts[KOHYA_UP]
        alpha = parts.get(KOHYA_ALPHA)
        alphas[module] = float(alpha.item()) if alpha is not None else float(parts[KOHYA_DOWN].shape[0])
    return tensors, alphas


def _peft_pairs(state_dict: Mapping[str, torch.Tensor], default_component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for stem, parts in _group(state_dict, (PEFT_A, PEFT_B)).items():
        if PEFT_A not in parts or PEFT_B not in parts:
            raise invalid("PEFT module", stem, "lora_A.weight and lora_B.weight both present")
        a, b = parts[PEFT_A], parts[PEFT_B]
        if b.shape[1] != a.shape[0]:
            raise invalid(f"{stem} ranks", (tuple(a.shape), tuple(b.shape)), "lora_B.shape[1] == lora_A.shape[0]")
        component, module = split_component(stem, default_component)
        pairs[f"{component}.{module}"] = (a, b)
    return pairs


def _group(state_dict: Mapping[str, torch.Tensor], suffixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"m.lora_A.weight": t, ...}`` -> ``{"m": {".lora_A.weight": t}}``; any other key is an error."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            raise invalid("LoRA key", key, [f"<module>{s}" for s in suffixes])
        groups.setdefault(key[: -len(suffix)], {})[suffix] = tensor
    return groups


def detect_layout(keys: Mapping[str, Any] | list[str]) -> Layout:
    """``kohya`` (``lora_*`` names with ``lora_down``/``lora_up``/``alpha``), ``comfy`` (the same suffixes on
    ComfyUI's own names ``diffusion_model.*`` / ``text_encoders.*``) or ``peft`` (``lora_A``/``lora_B``)."""
    keys = list(keys)
    kohya_suffixes = (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA)
    if keys and all(k.startswith("lora_") and k.endswith(kohya_suffixes) for k in keys):
        return "kohya"
    if keys and all(k.startswith(COMFY_PREFIXES) and k.endswith(kohya_suffixes) for k in keys):
        return "comfy"
    if keys and all(k.endswith((PEFT_A, PEFT_B)) for k in keys):
        return "peft"
    odd = next((k for k in keys if not k.endswith((KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA, PEFT_A, PEFT_B))), None)
    raise invalid("LoRA keys", odd if odd is not None else keys[:3],
                  "all kohya (lora_*.lora_down.weight/.lora_up.weight/.alpha), all ComfyUI-native "
                  "(diffusion_model.*/text_encoders.* with the same suffixes) or all PEFT (*.lora_A.weight/.lora_B.weight)",
                  "is this a LoRA file, and one layout only?")


def kohya_metadata(
    *, arch: LoraArch, rank: int, alpha: float, comment: str = "", provenance: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """kohya's ``ss_*`` keys (read by A1111/Forge/kohya tools) plus SELMA provenance as one JSON value.

    ``provenance``: e.g. ``{"skill": ..., "dataset_sha256": ..., "config": {...}, "base_model": ...}``.
    """
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": _number(alpha),
        "ss_base_model_version": arch.base,
        "ss_v2": str(arch.base == "sd_v2"),
        "ss_training_comment": comment,
    }
    if provenance is not None:
        meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True, separators=(",", ":"))
    return meta


def diffusers_metadata(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Metadata for a PEFT/diffusers-layout file: each component's ``LoraConfig.to_dict()``, as
    diffusers' ``save_lora_weights`` writes it (key ``lora_adapter_metadata``, entries ``unet.r`` ...),
    so ``load_lora_weights`` rebuilds the same ranks and alphas (the tensors alone do not carry alpha).
    """
    packed = {}
    for component, config in configs.items():
        if component not in COMPONENTS:
            raise invalid("configs", component, COMPONENTS)
        packed.update({f"{component}.{k}": v for k, v in config.items()})
    return {DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True, default=_jsonable)}


def _jsonable(x: object) -> object:
    if isinstance(x, (set, frozenset)):
        return sorted(x)
    raise invalid("LoRA config value", x, "JSON values, sets")


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def save_lora(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
    *, overwrite: bool = False,
) -> Path:
    """Write a LoRA ``.safetensors`` atomically; an existing file is an error unless ``overwrite``.

    ``tensors`` must be one layout (:func:`detect_layout`); ``metadata`` values must be strings.
    """
    from safetensors.torch import save

    detect_layout(tensors)
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise invalid(f"metadata[{k!r}]", v, "a string", "encode numbers with str() and dicts with json.dumps")
    data = save({k: t.detach().contiguous() for k, t in tensors.items()}, metadata=dict(metadata))
    return atomic_write_bytes(path, data, overwrite=overwrite)


def load_lora(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file: (tensors, metadata). Its layout is checked; :func:`detect_layout` names it."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    detect_layout(tensors)
    return tensors, metadata


def provenance(metadata: Mapping[str, str]) -> dict[str, Any]:
    """The ``selma.provenance`` JSON of a file's metadata ({} when the file has none)."""
    raw = metadata.get(PROVENANCE_KEY)
    return json.loads(raw) if raw else {}
