"""``load_pipeline(ModelConfig) -> LoadedPipeline``: the artist's checkpoint, loaded offline.

Accepts a diffusers folder (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``) or a single
file of SD 1.x, SD 2.x or SDXL base in the original LDM layout. Nothing is ever fetched: folders are
read with ``local_files_only=True``; single files get their configs from the tensors
(``detect.py``), the bundled JSON configs and open_clip's BPE. The steps, each checked before the
next spends time: config -> device and dtype -> architecture -> weights hash -> components ->
scheduler -> device, attention, VAE savers, compile.

``model_hash`` is the sha256 of the weight file (what civitai and A1111 show) or, for a folder, the
sha256 of the lines ``relative/path NUL sha256`` of its weight files in sorted order. Digests are
cached per file in ``$SELMA_CACHE_DIR/hashes`` (default ``~/.cache/comfyui-selma/hashes``), one JSON
per resolved path, valid while (path, size, mtime) are unchanged: a 7 GB checkpoint is read once,
and nothing is written beside the user's models.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ..errors import SelmaError
from ..fsio import atomic_write_json, sha256_file
from .base import LoadedPipeline
from .checkpoint import open_checkpoint
from .config import DEFAULT_SCHEDULER, SCHEDULERS, ModelConfig, resolve_device, resolve_dtype
from .configs import bundled_config
from .detect import DetectedModel, check_folder_pickles, detect_architecture, detect_tensors, folder_weight_files
from .single_file import build_pipeline

PIPELINE_CLASS = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
CHUNK = 8 * 2**20


def load_pipeline(cfg: ModelConfig) -> LoadedPipeline:
    """Load the model ``cfg.path`` describes; see the module doc. Errors are :class:`SelmaError`."""
    path = Path(cfg.path).expanduser()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if path.is_dir():
        det = detect_architecture(path)
        prediction, reason = _prediction(cfg, det)
        model_hash = weights_hash(path)
        pipe, pickled = _from_folder(path, det, dtype, cfg.allow_pickle)
        det = replace(det, pickle=pickled)
        pipe.scheduler = _scheduler(cfg.scheduler, pipe.scheduler, prediction, det.zero_terminal_snr)
        keys: dict[str, Any] = {}
    else:
        tf = open_checkpoint(_existing_file(path, cfg), allow_pickle=cfg.allow_pickle)
        try:
            det = detect_tensors(tf)
            prediction, reason = _prediction(cfg, det)
            model_hash = weights_hash(path)
            own = cfg.scheduler in ("", "model_default")  # a single file has no scheduler of its own
            scheduler = _scheduler(DEFAULT_SCHEDULER[det.arch] if own else cfg.scheduler, None, prediction,
                                   det.zero_terminal_snr)
            pipe, keys = build_pipeline(tf, det, dtype, scheduler)
        finally:
            tf.close()
    pipe.to(device)
    _apply_options(pipe, cfg)
    info = _info(cfg, det, pipe, dtype, device, reason, keys)
    return LoadedPipeline(pipe, det.arch, prediction, model_hash, str(path), info)  # type: ignore[arg-type]


def _existing_file(path: Path, cfg: ModelConfig) -> Path:
    if not path.is_file():
        raise SelmaError(f"path: got {cfg.path!r}; allowed: an existing .safetensors file or a diffusers folder "
                         "(with model_index.json). Check the name, or put the model in models/checkpoints")
    return path


def _prediction(cfg: ModelConfig, det: DetectedModel) -> tuple[str, str]:
    if cfg.prediction_type == "auto":
        return det.prediction_type, det.prediction_reason
    return cfg.prediction_type, (f"prediction_type={cfg.prediction_type!r} set in the config (detected "
                                 f"{det.prediction_type}: {det.prediction_reason})")


def _from_folder(path: Path, det: DetectedModel, dtype: Any, allow_pickle: bool) -> tuple[Any, bool]:
    """``from_pretrained`` with ``local_files_only``: safetensors only unless pickles were allowed
    (diffusers and transformers then read them with ``torch.load(weights_only=True)``).
    Returns (pipeline, whether pickle files were read)."""
    import diffusers

    pickled = check_folder_pickles(path, allow_pickle)
    kwargs: dict[str, Any] = {_dtype_kwarg(): dtype, "local_files_only": True, "use_safetensors": None if pickled else True}
    if det.arch != "sdxl":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return getattr(diffusers, PIPELINE_CLASS[det.arch]).from_pretrained(path, **kwargs), pickled
    except (OSError, ValueError, TypeError) as e:
        raise SelmaError(f"{path}: diffusers could not load this folder offline ({type(e).__name__}: {str(e)[:400]}); "
                         "is a component missing? Re-download or re-save the whole folder") from e


def _dtype_kwarg() -> str:
    """``dtype`` in diffusers releases that renamed ``torch_dtype`` (and warn about the old name), else ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _scheduler(name: str, current: Any, prediction: str, zero_snr: bool) -> Any:
    """The scheduler ``name`` (or the folder's ``current`` one when empty) with the prediction type set.

    The base config is the folder's or the bundled SD schedule; keys a class does not take are left out
    (diffusers would warn about each). Zero-terminal-SNR models get rescaled betas and trailing spacing.
    """
    import diffusers

    base = dict(current.config) if current is not None else bundled_config("scheduler_sd")
    spec = SCHEDULERS.get(name) if name else None
    if spec is not None and spec.class_name:
        cls, extra = getattr(diffusers, spec.class_name), dict(spec.options)
    else:  # "" or "model_default": the folder's own scheduler class
        cls, extra = type(current), {}
    config = {**base, **extra, "prediction_type": prediction}
    if zero_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in config.items() if k in accepted})


def _apply_options(pipe: Any, cfg: ModelConfig) -> None:
    """SDPA attention everywhere, VAE slicing/tiling, ``torch.compile`` of the UNet, no progress bars."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
    if cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if cfg.compile:
        pipe.unet.compile()  # in place: module and state-dict names unchanged, so LoRA code still finds its layers
    pipe.set_progress_bar_config(disable=True)


def _info(cfg: ModelConfig, det: DetectedModel, pipe: Any, dtype: Any, device: str, reason: str,
          keys: dict[str, Any]) -> dict[str, Any]:
    """What every artefact records about the model (JSON-friendly)."""
    info = {
        "arch": det.arch, "format": det.format, "dtype": str(dtype).removeprefix("torch."), "device": device,
        "prediction_reason": reason, "config": cfg.to_dict(),
        "unet_config": dict(pipe.unet.config), "scheduler": {"class": type(pipe.scheduler).__name__,
                                                            "config": dict(pipe.scheduler.config)},
        "attention": "sdpa", "compile": cfg.compile, "vae_slicing": cfg.vae_slicing, "vae_tiling": cfg.vae_tiling,
        "pickle": det.pickle, "notes": list(det.notes), "keys": keys,
        "versions": {p: version(p) for p in ("torch", "diffusers", "transformers")},
    }
    return json.loads(json.dumps(info, default=str))


# --- model hash ----------------------------------------------------------------------------------------------


def weights_hash(path: str | os.PathLike[str], cache_dir: Path | None = None) -> str:
    """sha256 of a weight file, or of a diffusers folder's weight files (see the module doc); cached."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path, cache_dir)
    h = hashlib.sha256()
    for f in folder_weight_files(path):
        h.update(f"{f.relative_to(path).as_posix()}\0{file_sha256(f, cache_dir)}\n".encode())
    return h.hexdigest()


def default_hash_cache() -> Path:
    root = os.environ.get("SELMA_CACHE_DIR") or Path.home() / ".cache" / "comfyui-selma"
    return Path(root) / "hashes"


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """Streaming sha256 of ``path``, reused while the file's (resolved path, size, mtime) are unchanged."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    entry = (cache_dir or default_hash_cache()) / f"{hashlib.sha1(real.encode()).hexdigest()}.json"
    try:
        cached = json.loads(entry.read_text(encoding="utf-8"))
        if all(cached.get(k) == v for k, v in key.items()) and len(cached.get("sha256", "")) == 64:
            return cached["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no entry, or a damaged one: hash again
    digest = sha256_file(real, CHUNK)
    try:
        atomic_write_json(entry, {**key, "sha256": digest})
    except OSError:
        pass  # the cache only saves time: a read-only cache folder means hashing again next run
    return digest
