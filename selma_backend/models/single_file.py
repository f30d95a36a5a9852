"""A diffusers pipeline from a single-file LDM checkpoint, offline, with every tensor accounted for.

Each component is built from its inferred config on the meta device (no random initialisation: a
7 GB SDXL would spend a minute drawing numbers to throw away), then its converted tensors are
assigned with ``load_state_dict(strict=True, assign=True)`` after an explicit comparison of the
key sets, so a missing tensor is an error naming it — a layer can never stay random or empty.
File keys under a component namespace (``model.diffusion_model.``, ``first_stage_model.``,
``cond_stage_model.``, ``conditioner.``) must each be loaded or skipped for a stated reason; keys
outside them (EMA copies, the training noise schedule, ``v_pred`` markers) are counted in the report.
Tokenizers are rebuilt from open_clip's bundled BPE (``clip_tokenizer.write_clip_tokenizer``).
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..clip_tokenizer import write_clip_tokenizer
from ..errors import SelmaError
from .checkpoint import TensorFile
from .detect import DetectedModel
from .keymap import (
    NAMESPACES,
    UNET,
    VAE,
    Converted,
    clip_hf_key,
    clip_hf_skip,
    convert,
    openclip_key,
    openclip_skip,
    split_in_proj,
    squeeze_vae_attention,
    unet_key,
    vae_key,
)

EXAMPLES = 5  # how many key names an error or report quotes


def convert_checkpoint(tf: TensorFile, det: DetectedModel, dtype: Any) -> tuple[dict[str, Converted], dict[str, Any]]:
    """Every component's diffusers state dict (cast to ``dtype``) and a report of unused file keys.

    Raises :class:`SelmaError` if a key inside a component namespace matches no rule.
    """
    keys = list(tf.shapes)

    def get(key: str) -> Any:
        return tf.get(key).to(dtype)

    layers = det.unet_config["layers_per_block"]
    levels = len(det.vae_config["block_out_channels"])
    parts = {"unet": convert(keys, UNET, lambda k: unet_key(k, layers), get),
             "vae": convert(keys, VAE, lambda k: vae_key(k, levels), get)}
    squeeze_vae_attention(parts["vae"].state)
    for name, spec in det.text_encoders.items():
        if spec["layout"] == "hf":
            parts[name] = convert(keys, spec["prefix"], clip_hf_key, get, clip_hf_skip)
        else:
            keep_projection = spec["class"] == "CLIPTextModelWithProjection"
            skip = openclip_skip(spec["config"]["num_hidden_layers"], keep_projection)
            parts[name] = convert(keys, spec["prefix"], openclip_key, get, skip)
            split_in_proj(parts[name].state)
    return parts, _account(tf, parts)


def _account(tf: TensorFile, parts: dict[str, Converted]) -> dict[str, Any]:
    """Prove every namespaced key is used or skipped with a reason; summarise the rest for ``info``."""
    done = set().union(*(p.used | set(p.skipped) for p in parts.values()))
    stray = [k for p in parts.values() for k in p.unmapped]
    stray += [k for k in tf.shapes if k.startswith(NAMESPACES) and k not in done and k not in stray]
    if stray:
        raise SelmaError(f"{tf.path}: {len(stray)} tensor(s) match no part of the detected model, e.g. "
                         f"{sorted(stray)[:EXAMPLES]}; the file is not a plain SD 1.x / 2.x / SDXL checkpoint "
                         "(or is damaged). Nothing was loaded")
    outside = sorted(k for k in tf.shapes if not k.startswith(NAMESPACES))
    skipped = Counter(reason for p in parts.values() for reason in p.skipped.values())
    return {"loaded": len(done) - sum(skipped.values()), "skipped": dict(skipped),
            "outside_model": {"count": len(outside), "examples": outside[:EXAMPLES]}}


def instantiate(factory: Callable[[], Any], state: dict[str, Any], what: str, path: Path, dtype: Any) -> Any:
    """Build a module on the meta device and assign ``state`` to it; every key must match both ways."""
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta; buffers (e.g. CLIP position ids) real
        model = factory()
    expected = set(model.state_dict())
    state = {_fit_key(k, expected): v for k, v in state.items()}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SelmaError(f"{path}: {what}: {len(missing)} tensor(s) missing from the file (e.g. {missing[:EXAMPLES]}), "
                         f"{len(unexpected)} the model has no place for (e.g. {unexpected[:EXAMPLES]}); "
                         "the file does not match its detected architecture. Nothing was loaded")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise SelmaError(f"{path}: {what}: tensor shapes do not fit the inferred config: {str(e)[:600]}") from e
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise SelmaError(f"{path}: {what}: {len(empty)} tensor(s) were never loaded, e.g. {empty[:EXAMPLES]}")
    return model.to(dtype).eval()  # float buffers the file does not carry follow the weights' dtype


def _fit_key(key: str, expected: set[str]) -> str:
    """transformers nests CLIP under ``text_model.`` in some classes/versions and not others: follow the model."""
    if key in expected or f"text_model.{key}" not in expected:
        return key
    return f"text_model.{key}"


def build_pipeline(tf: TensorFile, det: DetectedModel, dtype: Any, scheduler: Any) -> tuple[Any, dict[str, Any]]:
    """The diffusers pipeline for ``det.arch`` from the file's tensors; returns (pipeline, key report)."""
    import diffusers
    import transformers

    parts, report = convert_checkpoint(tf, det, dtype)
    unet = instantiate(lambda: diffusers.UNet2DConditionModel(**det.unet_config), parts.pop("unet").state, "UNet",
                       tf.path, dtype)
    vae = instantiate(lambda: diffusers.AutoencoderKL(**det.vae_config), parts.pop("vae").state, "VAE", tf.path, dtype)
    components: dict[str, Any] = {"unet": unet, "vae": vae, "scheduler": scheduler}
    for name, spec in det.text_encoders.items():
        cls = getattr(transformers, spec["class"])
        config = transformers.CLIPTextConfig(**spec["config"], attn_implementation="sdpa")
        components[name] = instantiate(lambda cls=cls, config=config: cls(config), parts[name].state, name, tf.path,
                                       dtype)
        components[name.replace("text_encoder", "tokenizer")] = clip_tokenizer(spec["pad_token"])
    if det.arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**components, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return pipe, report


def clip_tokenizer(pad_token: str) -> Any:
    """A fresh ``CLIPTokenizer`` (OpenAI CLIP's BPE, 77 tokens) padding with ``pad_token``; built offline."""
    return copy.deepcopy(_clip_tokenizer(pad_token))


@lru_cache(maxsize=2)
def _clip_tokenizer(pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="selma-tokenizer-") as tmp:
        folder = write_clip_tokenizer(Path(tmp) / "tokenizer", pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
