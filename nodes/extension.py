"""The SELMA extension: the node list, and the one-time setup ComfyUI runs through
``comfy_entrypoint()`` (extra model folders, ``/selma/...`` HTTP routes)."""

from __future__ import annotations

from .eval import SelmaEvaluate
from .filter import SelmaFilterDataset, SelmaLoadClip, SelmaReviewDataset
from .glue import ComfyExtension, add_routes, io, register_folders
from .merge import SelmaApplyExperts, SelmaLoraBridge, SelmaMergeExperts
from .prompts import SelmaCustomSkill, SelmaGeneratePrompts, SelmaLLM, SelmaSkill
from .render import SelmaAppendToDataset, SelmaLoadModel, SelmaRenderDataset
from .routes import register_routes
from .skills import SelmaListSkills
from .train import SelmaTrainExperts

#: Every node of the pack, in menu order. Append only: ids are permanent (saved workflows use them).
NODES: list[type[io.ComfyNode]] = [
    SelmaListSkills,
    SelmaSkill,
    SelmaCustomSkill,
    SelmaLLM,
    SelmaGeneratePrompts,
    SelmaLoadModel,
    SelmaRenderDataset,
    SelmaAppendToDataset,
    SelmaLoadClip,
    SelmaFilterDataset,
    SelmaReviewDataset,
    SelmaTrainExperts,
    SelmaEvaluate,
    SelmaMergeExperts,
    SelmaApplyExperts,
    SelmaLoraBridge,
]


def setup() -> None:
    """One-time setup, idempotent. ComfyUI 0.3.x never calls ``on_load``, so the entrypoint calls this."""
    register_folders()
    add_routes(register_routes)


class SelmaExtension(ComfyExtension):
    async def on_load(self) -> None:
        setup()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
