"""Module names: diffusers/PEFT (``down_blocks.0.attentions.0...``) <-> kohya (``lora_unet_input_blocks_1_1_...``).

kohya-ss sd-scripts (``networks/lora.py``) names a module by its path with dots turned into underscores,
in the UNet it trains: for SD 1.x/2.x that is the diffusers UNet (``lora_unet_down_blocks_0_attentions_0_
transformer_blocks_0_attn1_to_q``), for SDXL its LDM/sgm UNet (``lora_unet_input_blocks_4_1_...``).
diffusers' ``lora_conversion_utils.py`` reads exactly that (SD 1.x keys with LDM names are mis-mapped
there), ComfyUI reads both. ``LoraArch.unet_names="kohya"`` writes what kohya writes for the base;
``"ldm"`` / ``"diffusers"`` force one style. The LDM block correspondence is derived from the UNet config
(levels, ``layers_per_block``, block types, transformer depth), as ComfyUI does in
``comfy/utils.py`` ``unet_to_diffusers`` (read at 0.3.75; adapted here), so any UNet of the SD family,
including one-level test UNets, maps. Underscored names cannot be split back into dots, so the reverse
direction inverts the forward table of every module the UNet has: no guessing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import invalid

BaseVersion = Literal["sd_v1", "sd_v2", "sdxl_base_v1-0"]
BASE_VERSIONS: tuple[BaseVersion, ...] = ("sd_v1", "sd_v2", "sdxl_base_v1-0")
UnetNames = Literal["kohya", "ldm", "diffusers"]
UNET_NAMES: tuple[UnetNames, ...] = ("kohya", "ldm", "diffusers")

# diffusers component prefix -> kohya prefix, per base (kohya's LoRANetwork.LORA_PREFIX_*).
KOHYA_TEXT_PREFIXES: dict[str, dict[str, str]] = {
    "sd_v1": {"text_encoder": "lora_te"},
    "sd_v2": {"text_encoder": "lora_te"},
    "sdxl_base_v1-0": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
UNET_PREFIX = "lora_unet"

# Leaf modules inside one diffusers Transformer2DModel (names identical in LDM's SpatialTransformer).
_TRANSFORMER_LEAVES = ("proj_in", "proj_out")
_BLOCK_LEAVES = tuple(f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")) + (
    "ff.net.0.proj", "ff.net.2")
# diffusers ResnetBlock2D leaf -> LDM ResBlock leaf (ComfyUI's UNET_MAP_RESNET).
_RESNET_LEAVES = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
# Top-level modules (ComfyUI's UNET_MAP_BASIC).
_BASIC = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
          "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2",
          "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
# CLIP text encoder leaves (HF CLIPTextModel), any layer count.
_TEXT_RE = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
_TEXT_LEAF = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
              "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
              "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}


@dataclass(frozen=True)
class LoraArch:
    """What the name mapping needs to know about a base model: its kind and its UNet's shape.

    Build it from a diffusers UNet config with :meth:`from_unet_config`.
    """

    base: BaseVersion
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    layers_per_block: int
    transformer_depth: tuple[int, ...]  # per level, encoder order; the middle block uses the last
    unet_names: UnetNames = "kohya"  # kohya: diffusers paths for SD 1.x/2.x, LDM paths for SDXL

    def __post_init__(self) -> None:
        if self.base not in BASE_VERSIONS:
            raise invalid("base", self.base, BASE_VERSIONS)
        if self.unet_names not in UNET_NAMES:
            raise invalid("unet_names", self.unet_names, UNET_NAMES)
        n = len(self.down_block_types)
        if len(self.up_block_types) != n or len(self.transformer_depth) != n:
            raise invalid("up_block_types/transformer_depth", (self.up_block_types, self.transformer_depth),
                          f"one entry per level ({n})")

    @classmethod
    def from_unet_config(cls, config: Mapping[str, Any], base: BaseVersion, unet_names: UnetNames = "kohya") -> LoraArch:
        """From ``UNet2DConditionModel.config`` (or its ``config.json`` as a dict)."""
        downs = tuple(config["down_block_types"])
        depth = config.get("transformer_layers_per_block", 1)
        depth = (depth,) * len(downs) if isinstance(depth, int) else tuple(depth)
        return cls(base, downs, tuple(config["up_block_types"]), int(config["layers_per_block"]), depth, unet_names)

    @property
    def ldm_unet_names(self) -> bool:
        return self.unet_names == "ldm" or (self.unet_names == "kohya" and self.base == "sdxl_base_v1-0")

    @property
    def text_prefixes(self) -> dict[str, str]:
        return KOHYA_TEXT_PREFIXES[self.base]


def unet_module_map(arch: LoraArch) -> dict[str, str]:
    """Every LoRA-able diffusers UNet module name -> its LDM module name (no ``.weight``)."""
    return dict(_unet_pairs(arch))


def _unet_pairs(arch: LoraArch) -> Iterator[tuple[str, str]]:
    lpb, levels = arch.layers_per_block, len(arch.down_block_types)
    yield from _BASIC.items()
    for x, kind in enumerate(arch.down_block_types):
        n = 1 + (lpb + 1) * x  # input_blocks.0 is conv_in; each level has lpb blocks + a downsampler
        for i in range(lpb):
            yield from _resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n + i}.0")
            if kind.startswith("CrossAttn"):
                yield from _transformer(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n + i}.1",
                                        arch.transformer_depth[x])
        if x < levels - 1:
            yield f"down_blocks.{x}.downsamplers.0.conv", f"input_blocks.{n + lpb}.0.op"
    yield from _resnet("mid_block.resnets.0", "middle_block.0")
    yield from _transformer("mid_block.attentions.0", "middle_block.1", arch.transformer_depth[-1])
    yield from _resnet("mid_block.resnets.1", "middle_block.2")
    up_depth = tuple(reversed(arch.transformer_depth))
    for x, kind in enumerate(arch.up_block_types):
        attn = kind.startswith("CrossAttn")
        for i in range(lpb + 1):  # decoder levels have one block more, each taking one skip
            n = (lpb + 1) * x + i
            yield from _resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{n}.0")
            if attn:
                yield from _transformer(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{n}.1", up_depth[x])
        if x < levels - 1:
            yield f"up_blocks.{x}.upsamplers.0.conv", f"output_blocks.{(lpb + 1) * x + lpb}.{2 if attn else 1}.conv"


def _resnet(diffusers: str, ldm: str) -> Iterator[tuple[str, str]]:
    for d, leaf in _RESNET_LEAVES.items():
        yield f"{diffusers}.{d}", f"{ldm}.{leaf}"


def _transformer(diffusers: str, ldm: str, depth: int) -> Iterator[tuple[str, str]]:
    for leaf in _TRANSFORMER_LEAVES:
        yield f"{diffusers}.{leaf}", f"{ldm}.{leaf}"
    for t in range(depth):
        for leaf in _BLOCK_LEAVES:
            yield f"{diffusers}.transformer_blocks.{t}.{leaf}", f"{ldm}.transformer_blocks.{t}.{leaf}"


class NameMap:
    """Both directions for one architecture: ``component.module`` (diffusers) <-> kohya module name.

    Diffusers names carry their component: ``unet.down_blocks...``, ``text_encoder.text_model...``,
    ``text_encoder_2.text_model...``; kohya names their prefix: ``lora_unet_``, ``lora_te_`` /
    ``lora_te1_`` / ``lora_te2_``.
    """

    def __init__(self, arch: LoraArch) -> None:
        self.arch = arch
        self._unet = {d: f"{UNET_PREFIX}_{(ldm if arch.ldm_unet_names else d).replace('.', '_')}"
                      for d, ldm in unet_module_map(arch).items()}
        self._unet_back = {k: d for d, k in self._unet.items()}
        self._te = arch.text_prefixes
        self._te_back = {p: c for c, p in self._te.items()}
        self.ldm = unet_module_map(arch)  # diffusers UNet module -> LDM module

    def extended(self, other: NameMap) -> NameMap:
        """This map plus the UNet modules only ``other`` knows (where both name a module, this map wins).

        For a base model whose smaller test UNets have attention where the full model has none."""
        if other.arch.base != self.arch.base or other.arch.ldm_unet_names != self.arch.ldm_unet_names:
            raise invalid("other", other.arch.base, f"a NameMap of {self.arch.base} with the same UNet name style")
        new = copy.copy(self)
        new._unet = {**other._unet, **self._unet}
        new._unet_back = {**{k: d for d, k in other._unet.items()}, **self._unet_back}
        new.ldm = {**other.ldm, **self.ldm}
        return new

    def to_kohya(self, name: str) -> str:
        """``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` -> ``lora_unet_down_blocks_0_...``.

        (``lora_unet_input_blocks_1_1_...`` with LDM names.)"""
        component, _, module = name.partition(".")
        if component == "unet":
            if module not in self._unet:
                raise invalid("module", name, "a LoRA-able UNet module of this architecture",
                              "check the UNet config the LoraArch was built from")
            return self._unet[module]
        if component in self._te and module.startswith("text_model.encoder.layers."):
            return f"{self._te[component]}_{module.replace('.', '_')}"
        raise invalid("module", name, [f"{c}.<module>" for c in ("unet", *self._te)],
                      f"text encoder LoRAs must target text_model.encoder.layers.* ({self.arch.base})")

    def to_diffusers(self, kohya: str) -> str:
        """Inverse of :meth:`to_kohya`."""
        if kohya in self._unet_back:
            return f"unet.{self._unet_back[kohya]}"
        prefix, _, rest = kohya.partition("_text_model")
        match = _TEXT_RE.match("text_model" + rest) if prefix in self._te_back else None
        if match is None:
            raise invalid("kohya module", kohya, f"a {UNET_PREFIX}_ name of this UNet or "
                          f"{'/'.join(self._te_back)}_text_model_encoder_layers_<i>_<leaf>",
                          f"is the LoRA for another base model than {self.arch.base}?")
        return f"{self._te_back[prefix]}.text_model.encoder.layers.{match[1]}.{_TEXT_LEAF[match[2]]}"
