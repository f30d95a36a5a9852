"""LoRA files: the one place that knows kohya and PEFT/diffusers key layouts (see ``format``)."""

from .bases import BASE_UNET_CONFIGS, attention_shapes, base_arch, base_from_metadata, base_from_shapes, base_names
from .bridge import MatchReport, match_keys
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
from .layouts import LAYOUTS, LoraFile, convert_lora, from_kohya, read_lora, to_kohya
from .names import BASE_VERSIONS, LoraArch, NameMap, unet_module_map

__all__ = [
    "BASE_VERSIONS", "PROVENANCE_KEY", "LoraArch", "NameMap", "delta_weight", "detect_layout", "diffusers_metadata", "kohya_metadata",
    "kohya_to_peft", "load_lora", "peft_to_kohya", "provenance", "save_lora", "unet_module_map",
    "BASE_UNET_CONFIGS", "LAYOUTS", "LoraFile", "MatchReport", "attention_shapes", "base_arch", "base_from_metadata", "base_names",
    "base_from_shapes", "convert_lora", "from_kohya", "match_keys", "read_lora", "to_kohya",
]
