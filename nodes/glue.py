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

__all__ = ["ComfyExtension", "io", "ui", "CATEGORY", "progress_callback", "interrupted", "raise_if_interrupted", "output_dir", "user_dir",
           "models_dir", "model_names", "model_path", "model_folders", "folder_models", "folder_model_path", "register_folders", "free_memory", "add_routes", "send_event"]

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


def model_names(folder: str) -> list[str]:
    """Files ComfyUI lists for a model folder name (``checkpoints``, ``loras``, ``LLM`` …)."""
    return list(folder_paths.get_filename_list(folder))


def model_path(folder: str, name: str) -> Path:
    """The full path of a file ComfyUI lists in a model folder (``get_full_path``)."""
    path = folder_paths.get_full_path(folder, name)
    if path is None:
        raise ValueError(f"{name!r} is not in ComfyUI's {folder} folders; put it there and refresh")
    return Path(path)


def model_folders(folder: str) -> list[Path]:
    """Every directory ComfyUI searches for a model folder name (extra_model_paths included)."""
    try:
        return [Path(p) for p in folder_paths.get_folder_paths(folder)]
    except KeyError:
        return []


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


def progress_callback(total: int) -> Callable[[int, int], None]:
    """A backend progress callback ``(done, total)`` that drives the node's progress bar.

    It never raises: backends stop cleanly through :func:`interrupted` (``should_stop``), then the
    node calls :func:`raise_if_interrupted` so ComfyUI records the run as cancelled.
    """
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, new_total: int) -> None:
        bar.update_absolute(done, new_total)

    return update


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


def send_event(event: str, data: dict) -> None:
    """Send ``selma.<event>`` to the frontend over ComfyUI's websocket (no-op outside a server)."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is not None:
        instance.send_sync(f"selma.{event}", data)
