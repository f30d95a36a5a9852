"""ComfyUI-SELMA: skill-specific LoRA experts from auto-generated data, inside ComfyUI.

ComfyUI loads this folder from ``custom_nodes/`` and calls :func:`comfy_entrypoint` (the V3
extension API). Importing the pack has no side effects: ComfyUI is touched only when the
entrypoint runs. Inside the pack, imports are relative: our ``nodes/`` package would otherwise
shadow ComfyUI's own top-level ``nodes`` module.
"""

WEB_DIRECTORY = "./web"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]


async def comfy_entrypoint():
    """Build the SELMA extension: register folders and ``/selma`` routes once, list the nodes."""
    from .nodes.extension import SelmaExtension, setup

    setup()
    return SelmaExtension()
