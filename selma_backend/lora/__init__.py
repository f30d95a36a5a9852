"""LoRA files: the one place that knows kohya and PEFT/diffusers key layouts (see ``format``)."""

from .format import (
    PROVENANCE_KEY,
    delta_weight,
    detect_layout,
    diffusers_metadata,
    kohya_metadata,
    kohya_to_peft,
    load_lora,
    peft_to_kohya,
    provenance,
    save_lora,
)
from .names import BASE_VERSIONS, LoraArch, NameMap, unet_module_map

__all__ = [
    "BASE_VERSIONS", "PROVENANCE_KEY", "LoraArch", "NameMap", "delta_weight", "detect_layout", "diffusers_metadata", "kohya_metadata",
    "kohya_to_peft", "load_lora", "peft_to_kohya", "provenance", "save_lora", "unet_module_map",
]
