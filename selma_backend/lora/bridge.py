"""The format bridge: does a LoRA file fit a model *before* sampling? "N of M keys matched".

A loader matches a LoRA's modules by name against a key map (LoRA module name -> model weight). ComfyUI
builds its map from the loaded model (``comfy.lora.model_lora_keys_unet`` / ``_clip``; the node's glue
passes it here as a plain dict), then loads every tensor whose module is in the map and logs "lora key not
loaded" for the rest. :func:`match_keys` predicts exactly that count, so a wrong layout or a LoRA for
another base model shows up as a number instead of a silent no-op.

Conversion between layouts is :func:`.layouts.convert_lora` (exact).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .format import detect_layout

#: Tensor-name suffixes a module name is followed by, in the layouts loaders read (kohya, PEFT/diffusers,
#: ComfyUI-native, and the other spellings ComfyUI's LoRA adapter accepts).
MODULE_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_mid.weight", ".alpha", ".dora_scale",
                   ".lora_A.weight", ".lora_B.weight", "_lora.down.weight", "_lora.up.weight",
                   ".lora.down.weight", ".lora.up.weight", ".diff", ".diff_b")


@dataclass(frozen=True)
class MatchReport:
    """How many of a LoRA file's tensor keys a model's key map would load (and which would not)."""

    layout: str
    total: int  # tensor keys in the file
    matched: int
    modules: int
    modules_matched: int
    unmatched: list[str] = field(default_factory=list)  # tensor keys, sorted
    targets: dict[str, int] = field(default_factory=dict)  # model part ("diffusion_model", "clip_l", ...) -> modules

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.matched == self.total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self, show: int = 8) -> str:
        lines = [f"{self.matched} of {self.total} keys matched ({self.modules_matched} of {self.modules} modules, "
                 f"{self.layout} layout)"]
        if self.targets:
            lines.append("patches " + ", ".join(f"{n} in {part}" for part, n in sorted(self.targets.items())))
        if self.unmatched:
            lines.append(f"not loaded ({len(self.unmatched)}): " + ", ".join(self.unmatched[:show])
                         + (" ..." if len(self.unmatched) > show else ""))
            if self.layout == "peft":
                lines.append("hint: ComfyUI reads kohya names best; convert this file to the kohya layout")
            else:
                lines.append("hint: is this LoRA for another base model, or is the model/clip input missing?")
        return "\n".join(lines)


def module_of(key: str) -> str:
    """``lora_unet_x.lora_up.weight`` -> ``lora_unet_x``; a key with no known suffix is its own module."""
    return next((key[: -len(s)] for s in MODULE_SUFFIXES if key.endswith(s)), key)


def match_keys(keys: Iterable[str], key_map: Mapping[str, str]) -> MatchReport:
    """Which tensor keys of a LoRA a loader with ``key_map`` (LoRA module name -> model weight key) loads."""
    keys = sorted(keys)
    try:
        layout = detect_layout(keys)
    except ValueError:
        layout = "other"
    modules = {module_of(k) for k in keys}
    hit = {m for m in modules if m in key_map}
    targets: dict[str, int] = {}
    for m in hit:
        part = key_map[m].split(".", 1)[0]
        targets[part] = targets.get(part, 0) + 1
    unmatched = [k for k in keys if module_of(k) not in hit]
    return MatchReport(layout, len(keys), len(keys) - len(unmatched), len(modules), len(hit), unmatched, targets)
