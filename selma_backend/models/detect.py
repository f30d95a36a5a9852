"""What a checkpoint is — SD 1.x, SD 2.x or SDXL, epsilon or v-prediction, every component's config —
decided without loading its weights (a safetensors header, or a diffusers folder's JSON files).

The node shows it, error messages quote it, and the loader builds the pipeline from it.

Prediction type of single files (shapes cannot tell), decided in this order and recorded with the reason:
1. a ``v_pred`` key in the file means v-prediction (ComfyUI's convention, ``supported_models.SDXL.model_type``),
   ``ztsnr`` beside it a zero-terminal-SNR schedule;
2. SD 2.x: ComfyUI's test (``supported_models.SD20.model_type``): the standard deviation of
   ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` above 0.09 means v-prediction (the 768-v
   models), else epsilon (the 512 base models); where that tensor does not exist, v-prediction,
   as diffusers assumes for every SD 2.x single file (its default config is stable-diffusion-2-1);
3. SD 1.x and SDXL base: epsilon.
``ModelConfig.prediction_type`` overrides all of this.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SelmaError
from .checkpoint import TensorFile, is_pickle, open_checkpoint, refuse_pickle
from .config import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from .keymap import NAMESPACES, SD1_TEXT, SD2_TEXT, SD2_TEXT_SGM, SDXL_TEXT_G, SDXL_TEXT_L, UNET, VAE
from .shapes import clip_hf_config, openclip_config, sub_shapes, unet_config, vae_config

SUPPORTED = "sd1 (SD 1.x), sd2 (SD 2.x, epsilon or v-prediction), sdxl (SDXL base)"
EOS, BANG = "<|endoftext|>", "!"  # tokenizer pad tokens: OpenAI CLIP pads with EOS, open_clip with "!" (id 0)
PIPELINES = {"StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionXLPipeline": ("sdxl",)}
SD2_VPRED_PROBE = "output_blocks.11.1.transformer_blocks.0.norm1.bias"
PICKLE_MARK = " (pickle)"  # list_model_files' suffix for pickle files


@dataclass(frozen=True)
class DetectedModel:
    """A checkpoint's architecture and component configs; JSON-friendly (``to_dict``) for records and UIs.

    text_encoders: ``{"text_encoder": {...}, "text_encoder_2": {...}}`` each with ``class`` (transformers
    class name), ``config`` (CLIPTextConfig kwargs), ``prefix`` and ``layout`` ("hf" or "openclip") in the
    file, and ``pad_token`` of its tokenizer. Single files only; a folder's come from its own JSON.
    """

    path: str
    format: str  # "single_file" | "diffusers"
    arch: str  # one of base.ARCHS
    prediction_type: str  # "epsilon" | "v_prediction"
    prediction_reason: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any] = field(default_factory=dict)
    text_encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    zero_terminal_snr: bool = False
    pickle: bool = False
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def unknown_architecture(path: Path, seen: str) -> SelmaError:
    return SelmaError(f"{path}: unknown architecture ({seen}); supported: {SUPPORTED}. "
                      "Load another model, or render with ComfyUI's own samplers and add the images to a dataset")


def detect_architecture(path: str | os.PathLike[str], allow_pickle: bool = False) -> DetectedModel:
    """Detect a diffusers folder or single-file checkpoint (header only; pickles need ``allow_pickle``)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return _detect_folder(p)
    if not p.is_file():
        raise SelmaError(f"path: got {str(path)!r}; allowed: an existing .safetensors file or a diffusers folder "
                         "(with model_index.json). Check the name, or put the model in models/checkpoints")
    tf = open_checkpoint(p, allow_pickle=allow_pickle)
    try:
        return detect_tensors(tf)
    finally:
        tf.close()


def detect_tensors(tf: TensorFile) -> DetectedModel:
    """Detect an opened single file (see the module doc for the prediction-type rules)."""
    arch, texts = _arch_and_text(tf)
    notes: list[str] = []
    encoders = _text_encoders(tf, arch, texts, notes)
    prediction, reason = _prediction(tf, arch)
    pooled = encoders.get("text_encoder_2", {}).get("config", {}).get("projection_dim")
    px = {"sd1": 512, "sd2": 768 if prediction == "v_prediction" else 512, "sdxl": 1024}[arch]
    try:
        unet, unet_notes = unet_config(sub_shapes(tf.shapes, UNET), arch, pooled, px // 8)
        vae = vae_config(sub_shapes(tf.shapes, VAE), arch, px)
    except SelmaError as e:
        raise SelmaError(f"{tf.path}: {e}") from e
    if unet["in_channels"] != 4 or unet["out_channels"] != 4:
        raise SelmaError(f"{tf.path}: UNet has {unet['in_channels']} input channels (inpainting or "
                         f"instruct-pix2pix model); supported: text-to-image {SUPPORTED} (4 latent channels)")
    return DetectedModel(str(tf.path), "single_file", arch, prediction, reason, unet, vae, encoders,
                         zero_terminal_snr="ztsnr" in tf, pickle=tf.pickle, notes=tuple(unet_notes + notes))


def _arch_and_text(tf: TensorFile) -> tuple[str, dict[str, str]]:
    """(arch, text encoder name -> file prefix) from which namespaces the file has."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in tf.shapes)

    if UNET + "input_blocks.0.0.weight" not in tf:
        prefixes = sorted({k.split(".", 1)[0] for k in tf.shapes})[:8]
        hint = " — it looks like a LoRA; load it as one" if any("lora" in k for k in list(tf.shapes)[:50]) else ""
        raise unknown_architecture(tf.path, f"no LDM UNet 'model.diffusion_model.*'; top-level names {prefixes}{hint}")
    if not has(VAE):
        raise SelmaError(f"{tf.path}: has no VAE ('first_stage_model.*'); SELMA needs a full checkpoint "
                         "(UNet, VAE and text encoder). Use the full model file")
    adm = UNET + "label_emb.0.0.weight" in tf
    if adm and has(SDXL_TEXT_L) and has(SDXL_TEXT_G):
        return "sdxl", {"text_encoder": SDXL_TEXT_L, "text_encoder_2": SDXL_TEXT_G}
    if not adm and has(SD2_TEXT):
        return "sd2", {"text_encoder": SD2_TEXT}
    if not adm and has(SD2_TEXT_SGM) and not has(SDXL_TEXT_G):
        return "sd2", {"text_encoder": SD2_TEXT_SGM}
    if not adm and has(SD1_TEXT):
        return "sd1", {"text_encoder": SD1_TEXT}
    found = sorted({".".join(k.split(".")[:3]) for k in tf.shapes if k.startswith(NAMESPACES[2:])})[:6]
    what = "SDXL refiner, unCLIP or another model with added conditioning" if adm else "no known text encoder"
    raise unknown_architecture(tf.path, f"{what}; text encoder names found: {found or 'none'}")


def _text_encoders(tf: TensorFile, arch: str, texts: dict[str, str], notes: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, prefix in texts.items():
        s = sub_shapes(tf.shapes, prefix)
        try:
            if prefix.endswith(".transformer."):
                spec = {"class": "CLIPTextModel", "layout": "hf", "config": clip_hf_config(s, notes), "pad_token": EOS}
            elif arch == "sd2":
                spec = {"class": "CLIPTextModel", "layout": "openclip", "pad_token": BANG,
                        "config": openclip_config(s, "openclip_h_text", drop_last=True, notes=notes)}
            else:
                spec = {"class": "CLIPTextModelWithProjection", "layout": "openclip", "pad_token": BANG,
                        "config": openclip_config(s, "openclip_bigg_text", drop_last=False, notes=notes)}
        except SelmaError as e:
            raise SelmaError(f"{tf.path}: {e}") from e
        out[name] = {**spec, "prefix": prefix}
    return out


def _prediction(tf: TensorFile, arch: str) -> tuple[str, str]:
    if "v_pred" in tf:
        return "v_prediction", "the file has a 'v_pred' marker key (ComfyUI's convention)"
    if arch != "sd2":
        return "epsilon", f"{arch} base models are trained to predict noise (epsilon)"
    probe = UNET + SD2_VPRED_PROBE
    if probe not in tf:
        return "v_prediction", ("SD 2.x without ComfyUI's probe tensor: diffusers' default for SD 2.x single files "
                                "(stable-diffusion-2-1, 768-v); set prediction_type to 'epsilon' for a 512 base model")
    std = float(tf.get(probe).float().std(unbiased=False))
    kind = "v_prediction" if std > 0.09 else "epsilon"
    return kind, f"SD 2.x: std of {SD2_VPRED_PROBE} is {std:.3f} ({'>' if std > 0.09 else '<='} 0.09, ComfyUI's test)"


# --- diffusers folders -----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SelmaError(f"{path}: missing or not valid JSON ({e}); the diffusers folder is incomplete") from e
    if not isinstance(data, dict):
        raise SelmaError(f"{path}: expected a JSON object; the diffusers folder is damaged")
    return data


def _detect_folder(path: Path) -> DetectedModel:
    """Arch from model_index.json's pipeline class (SD 2.x: an OpenCLIP text encoder, GELU, 1024 wide)."""
    if not (path / "model_index.json").is_file():
        raise SelmaError(f"{path}: a folder without model_index.json is not a diffusers pipeline; "
                         "choose a diffusers folder or a .safetensors checkpoint")
    index = _read_json(path / "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINES:
        raise unknown_architecture(path, f"pipeline class {cls!r}; supported classes: {', '.join(PIPELINES)}")
    unet = _read_json(path / "unet" / "config.json")
    arch = PIPELINES[cls][0]
    if cls == "StableDiffusionPipeline":
        text = _read_json(path / "text_encoder" / "config.json")
        if text.get("hidden_act") == "gelu" or unet.get("cross_attention_dim") == 1024:
            arch = "sd2"
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    prediction = scheduler.get("prediction_type", "epsilon")
    return DetectedModel(str(path), "diffusers", arch, prediction, "scheduler/scheduler_config.json of the folder",
                         unet, _read_json(path / "vae" / "config.json"),
                         zero_terminal_snr=bool(scheduler.get("rescale_betas_zero_snr")))


def folder_weight_files(path: Path) -> list[Path]:
    """Weight files of a diffusers folder's components (what the hash covers, what pickle rules apply to)."""
    suffixes = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def check_folder_pickles(path: Path, allow_pickle: bool) -> bool:
    """Refuse a folder whose component has pickle weights only (unless allowed); True if pickles will be read."""
    by_dir: dict[Path, list[Path]] = {}
    for f in folder_weight_files(path):
        by_dir.setdefault(f.parent, []).append(f)
    pickled = [fs[0] for fs in by_dir.values() if all(is_pickle(f) for f in fs)]
    if pickled and not allow_pickle:
        raise refuse_pickle(pickled[0])
    return bool(pickled)


# --- the dropdown ------------------------------------------------------------------------------------------


def list_model_files(checkpoints_dirs: list[str], diffusers_dirs: list[str]) -> list[str]:
    """Absolute paths of loadable models, for a dropdown: ``.safetensors``/``.sft`` files under
    ``checkpoints_dirs`` and folders holding ``model_index.json`` under ``diffusers_dirs``, each sorted;
    pickle files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) are listed too, with ``PICKLE_MARK`` appended,
    so the user sees them and learns they need the opt-in (strip it with :func:`listed_path`).
    Hidden files and folders are skipped; symlinks are followed once."""
    out: list[str] = []
    for root in checkpoints_dirs:
        for f in _walk(Path(root)):
            if f.suffix.lower() in SAFETENSORS_SUFFIXES:
                out.append(str(f))
            elif f.suffix.lower() in PICKLE_SUFFIXES:
                out.append(str(f) + PICKLE_MARK)
    for root in diffusers_dirs:
        out += [str(d) for d in _walk(Path(root), folders=True)]
    return list(dict.fromkeys(out))


def listed_path(entry: str) -> str:
    """The path behind a ``list_model_files`` entry (without the pickle mark)."""
    return entry.removesuffix(PICKLE_MARK)


def _walk(root: Path, folders: bool = False) -> list[Path]:
    """Files (or diffusers folders, not descending into them) under ``root``, sorted; cycles cut by realpath."""
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if folders and "model_index.json" in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []
        elif not folders:
            found += [Path(dirpath) / n for n in filenames if not n.startswith(".")]
    return sorted(found)
