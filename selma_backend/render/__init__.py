"""Stage 2: render prompts into a SELMA dataset (diffusers, multi-prompt batches, resumable, sharded).

Public API (the node and the CLI use only these)::

    render_dataset(lp, prompts, out_dir, RenderConfig(...), progress=, should_stop=, on_image=) -> RenderReport
    append_images(out_dir, images, prompts, skill, seed=, source="comfyui", model_hash=) -> rows
    SCHEDULERS  # registry: name -> SchedulerSpec (label, diffusers class); dropdowns come from it

Importing this package loads neither torch nor diffusers.
"""

from .config import RenderConfig
from .dataset import append_images, read_index, read_info
from .render import RenderReport, derive_seed, load_prompts, render_dataset
from .schedulers import SCHEDULERS, scheduler_names
from .shard import Shard

__all__ = ["RenderConfig", "RenderReport", "SCHEDULERS", "Shard", "append_images", "derive_seed", "load_prompts",
           "read_index", "read_info", "render_dataset", "scheduler_names"]
