"""The one module that touches ComfyUI.

ComfyUI's internals change between releases, so the pack reaches it only through: the versioned
``comfy_api`` (node schema, extension), ``folder_paths`` (model and output folders),
``comfy.utils.ProgressBar``, ``comfy.model_management`` (interrupt, unload) and the server's route
table. Everything else in ``nodes/`` imports from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

try:  # pin the API version we were written against; fall back to the newest
    from comfy_api.v0_0_2 import ComfyExtension, io, ui  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the ComfyUI release
    from comfy_api.latest import ComfyExtension, io, ui

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..selma_backend.progress import ProgressEvents

__all__ = ["ComfyExtension", "io", "ui", "CATEGORY", "progress_callback", "interrupted", "raise_if_interrupted", "output_dir", "user_dir", "input_dir",
           "models_dir", "model_names", "model_path", "model_folders", "folder_models", "folder_model_path", "register_folders", "free_memory", "add_routes", "send_event",
           "progress_events"]

log = logging.getLogger("selma")

#: Menu category of every SELMA node.
CATEGORY = "SELMA"

#: Model folders SELMA reads besides ComfyUI's own (name → sub-folder of models/).
EXTRA_FOLDERS = {"LLM": "LLM"}


def models_dir() -> Path:
    return Path(folder_paths.models_dir)


def output_dir() -> Path:
    return Path(folder_paths.get_output_directory())


def user_dir() -> Path:
    return Path(folder_paths.get_user_directory())


def input_dir() -> Path:
    """ComfyUI's input folder (where users upload files: images, prompt lists)."""
    return Path(folder_paths.get_input_directory())


def model_names(folder: str) -> list[str]:
    """Files ComfyUI lists for a model folder name (``checkpoints``, ``loras``, ``LLM`` …)."""
    return list(folder_paths.get_filename_list(folder))


def model_path(folder: str, name: str) -> Path:
    """The full path of a file ComfyUI lists in a model folder (``get_full_path``)."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{name!r} is not in ComfyUI's {folder} folders; put it there and refresh")
    return Path(path)


#: The models shipped in the pack (the world's: ``world-sd``, ``world-sd-small``, ``world-clip``).
PACK_ASSETS = Path(__file__).resolve().parents[1] / "selma_backend" / "world" / "assets"
#: Model folder names whose SELMA listings (:func:`folder_models`) also search the pack's assets, after
#: ComfyUI's own folders (a user's model of the same name wins). Only SELMA's loaders see them: ComfyUI
#: lists ``clip`` (= ``text_encoders``) files recursively for its native loaders, which cannot load these
#: models' parts, and never ``checkpoints`` (CheckpointLoaderSimple cannot load a VAE-factor-4 model).
PACK_MODEL_FOLDERS = {"diffusers": (PACK_ASSETS,), "clip": (PACK_ASSETS,)}


def model_folders(folder: str) -> list[Path]:
    """Every directory searched for a model folder name: ComfyUI's (extra_model_paths included), then the
    pack's shipped models for the names in :data:`PACK_MODEL_FOLDERS`."""
    try:
        comfy = [Path(p) for p in folder_paths.get_folder_paths(folder)]
    except KeyError:
        comfy = []
    return comfy + [p for p in PACK_MODEL_FOLDERS.get(folder, ()) if p not in comfy]


def folder_models(folder: str, marker: str) -> list[str]:
    """Names of the sub-folders (one level) of a model folder name that hold ``marker``, sorted:
    diffusers pipelines (``model_index.json``), open_clip folders (``open_clip_config.json``)."""
    return sorted({p.name for root in model_folders(folder) if root.is_dir() for p in root.iterdir()
                   if (p / marker).is_file()})


def folder_model_path(folder: str, name: str, marker: str) -> Path:
    """The path of a name :func:`folder_models` listed (the caller checked membership)."""
    return next(root / name for root in model_folders(folder) if (root / name / marker).is_file())


def register_folders() -> None:
    """Make ``models/LLM`` a model folder ComfyUI knows, unless another pack already did."""
    for name, sub in EXTRA_FOLDERS.items():
        if name not in folder_paths.folder_names_and_paths:
            path = os.path.join(folder_paths.models_dir, sub)
            folder_paths.folder_names_and_paths[name] = ([path], set())


def progress_callback(total: int, stage: str, label: str | None = None) -> Callable[[int, int], None]:
    """A backend progress callback ``(done, total)`` that drives the node's progress bar and sends
    throttled ``selma.progress`` events (:mod:`..selma_backend.progress`) for the web extension.

    It never raises: backends stop cleanly through :func:`interrupted` (``should_stop``), then the
    node calls :func:`raise_if_interrupted` so ComfyUI records the run as cancelled.
    """
    bar = comfy.utils.ProgressBar(total)
    events = progress_events(stage, label)

    def update(done: int, new_total: int) -> None:
        bar.update_absolute(done, new_total)
        events(done, new_total)

    return update


def progress_events(stage: str, label: str | None = None) -> ProgressEvents:
    """``selma.progress`` events for the node ComfyUI is executing now (its id as the frontend's graph knows
    it, from ComfyUI's execution context), sent to the client that queued the prompt."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # pragma: no cover - ComfyUI before the execution context: the bar only
        get_executing_context = lambda: None  # noqa: E731
    context = get_executing_context()
    node = None if context is None else str(context.node_id)
    prompt_id = None if context is None else context.prompt_id
    return ProgressEvents(lambda data: send_event("progress", data, to_client=True), node=node, prompt_id=prompt_id,
                          stage=stage, label=label)


def interrupted() -> bool:
    """True once the user pressed Cancel; backends poll this to stop cleanly between steps."""
    return bool(mm.processing_interrupted())


def raise_if_interrupted() -> None:
    """End the node the way ComfyUI expects after Cancel (finished work is already on disk)."""
    mm.throw_exception_if_processing_interrupted()


def free_memory() -> None:
    """Unload ComfyUI's models and return cached GPU memory before a heavy SELMA stage."""
    mm.unload_all_models()
    mm.soft_empty_cache()


def add_routes(register: Callable[[object], None]) -> bool:
    """Call ``register(routes)`` with the server's aiohttp route table; False outside a server."""
    try:
        from server import PromptServer
    except ImportError:
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return False
    register(instance.routes)
    return True


def send_event(event: str, data: dict, to_client: bool = False) -> None:
    """Send ``selma.<event>`` to the frontend over ComfyUI's websocket (no-op outside a server): to every
    client, or with ``to_client`` to the one that queued the running prompt (all if it gave no id)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(f"selma.{event}", data, getattr(instance, "client_id", None) if to_client else None)


# --- LoRA files (stage 5): ComfyUI's own loader and patching, nothing else ----------------------------------

__all__ += ["loras_root", "lora_key_map", "load_lora_file", "apply_lora"]


def loras_root() -> Path:
    """The first ``loras`` folder (``models/loras``): where SELMA writes merged and converted LoRAs."""
    folders = model_folders("loras")
    if not folders:
        raise ValueError("ComfyUI has no 'loras' model folder; check extra_model_paths.yaml")
    return folders[0]


def lora_key_map(model: object | None, clip: object | None) -> dict[str, str]:
    """ComfyUI's LoRA key map for a MODEL and/or CLIP: LoRA module name -> model weight key (what its loader
    matches a LoRA file's modules against; built exactly as ``comfy.sd.load_lora_for_models`` builds it)."""
    import comfy.lora

    key_map: dict[str, str] = {}
    if model is not None:
        comfy.lora.model_lora_keys_unet(model.model, key_map)  # type: ignore[attr-defined]
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)  # type: ignore[attr-defined]
    return dict(key_map)


def load_lora_file(path: str | os.PathLike[str]) -> dict:
    """A LoRA file's tensors as ComfyUI's LoraLoader reads them (safetensors only, no pickle)."""
    return comfy.utils.load_torch_file(os.fspath(path), safe_load=True)


def apply_lora(model: object | None, clip: object | None, lora: dict, strength_model: float,
               strength_clip: float) -> tuple[object | None, object | None]:
    """Patch (clones of) MODEL and CLIP with a LoRA through ComfyUI's own LoRA code, as LoraLoader does."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)


# --- training (stage 4): a progress bar that also shows a picture (the loss curve) ---------------------

__all__ += ["preview_progress"]


def preview_progress(total: int, stage: str) -> Callable[..., None]:
    """Like :func:`progress_callback`, plus an optional PIL image shown on the node (ComfyUI's preview)
    and the ``label`` (e.g. the expert) and ``loss`` of the ``selma.progress`` event."""
    bar = comfy.utils.ProgressBar(total)
    events = progress_events(stage)

    def update(done: int, new_total: int, image: object = None, *, label: str | None = None,
               loss: float | None = None) -> None:
        bar.update_absolute(done, new_total, ("PNG", image, 512) if image is not None else None)
        events(done, new_total, label=label, loss=loss)

    return update
