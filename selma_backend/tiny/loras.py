"""Tiny LoRA files for the mini SD 1.5 checkpoint: two skill experts and their merge, in seconds.

What the bundled stage-5 and apply-experts workflows read, under the names SELMA's own nodes write
(``SELMA Train Experts``: ``selma/<name>/<skill>.safetensors``; ``SELMA Merge Experts``:
``selma/<name>.safetensors``). Relative to the output folder (a ComfyUI ``models/loras``)::

    selma/experts/countbench.safetensors   rank 4 on every UNet attention projection (SELMA's preset)
    selma/experts/spatial.safetensors      the same modules, other factors
    selma/merged.safetensors               their linear merge (stage 5's own merge_files: exact)

Files are kohya layout with ``ss_*`` metadata and SELMA provenance, for the mini SD 1.5 checkpoint's
UNet (``ldm.py``: one level with attention, the middle block, two decoder blocks); ComfyUI's LoRA
loader maps every key. Factors are a function of the seed (small values: sampling stays sane).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SelmaError
from ..lora import LoraArch, attention_shapes, kohya_metadata, load_lora, peft_to_kohya, provenance, save_lora
from .ldm import CH, CONTEXT

#: The mini SD 1.5 UNet as a diffusers config (only what the LoRA names and shapes need).
MINI_UNET = {"block_out_channels": (CH,), "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D",),
             "up_block_types": ("CrossAttnUpBlock2D",), "cross_attention_dim": CONTEXT,
             "transformer_layers_per_block": 1}
SKILLS = ("countbench", "spatial")
RANK, ALPHA = 4, 4.0
EXPERTS_DIR, MERGED = "selma/experts", "selma/merged.safetensors"
FIXTURE = "selma tiny-loras"  # provenance "made_by": files this module wrote


def mini_arch() -> LoraArch:
    return LoraArch.from_unet_config(MINI_UNET, "sd_v1")


def expert_tensors(seed: int, rank: int = RANK, alpha: float = ALPHA) -> dict[str, torch.Tensor]:
    """kohya tensors of one expert: ``lora_down (rank, in)`` ~ N(0, 1/in), ``lora_up (out, rank)`` ~ N(0, 0.02²)."""
    gen = torch.Generator().manual_seed(seed)
    peft = {}
    for module, (n_out, n_in) in sorted(attention_shapes(MINI_UNET).items()):
        peft[f"{module}.lora_A.weight"] = torch.randn(rank, n_in, generator=gen) / n_in**0.5
        peft[f"{module}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.02
    return peft_to_kohya(peft, arch=mini_arch(), alpha_by_module=alpha)


def write_tiny_loras(out_dir: str | Path, seed: int = 0, *, force: bool = False) -> dict[str, Path]:
    """Write the experts and their merge under ``out_dir``; return ``{"lora-<skill>"|"lora-merged": path}``.

    Files this function wrote from the same seed are kept; any other existing file is an error unless
    ``force`` and written by this function (nothing else is ever replaced).
    """
    from ..merge.config import MergeConfig
    from ..merge.files import merge_files

    out = Path(out_dir)
    paths = {f"lora-{s}": out / EXPERTS_DIR / f"{s}.safetensors" for s in SKILLS} | {"lora-merged": out / MERGED}
    facts = {name: _fixture_facts(path, out / EXPERTS_DIR) for name, path in paths.items()}
    if not force and all(f is not None and f["seed"] == seed for f in facts.values()):
        return paths  # made here from this seed: kept
    if not force and any(f is not None and f["seed"] != seed for f in facts.values()):
        raise SelmaError(f"{out}: holds tiny LoRAs of another seed; pass force to rewrite them")
    arch = mini_arch()
    for k, skill in enumerate(SKILLS):
        prov = {"kind": "expert", "skill": skill, "made_by": FIXTURE, "seed": seed, "base_model": "selma-mini-sd15"}
        save_lora(paths[f"lora-{skill}"], expert_tensors(seed * 1000 + k),
                  kohya_metadata(arch=arch, rank=RANK, alpha=ALPHA, provenance=prov), overwrite=True)
    paths["lora-merged"].unlink(missing_ok=True)
    merge_files([paths[f"lora-{s}"] for s in SKILLS], paths["lora-merged"], MergeConfig(method="linear"))
    return paths


def _fixture_facts(path: Path, experts_dir: Path) -> dict | None:
    """``{"seed": ...}`` of a tiny LoRA this module wrote at ``path``; None when absent; raise for other files."""
    if not path.exists():
        return None
    try:
        prov = provenance(load_lora(path)[1])
    except Exception:  # noqa: BLE001 - not a LoRA of ours, whatever it is: left alone below
        prov = {}
    if prov.get("made_by") == FIXTURE:
        return {"seed": prov.get("seed")}
    sources = prov.get("sources") or []
    if [s.get("file") for s in sources] == [f"{s}.safetensors" for s in SKILLS]:  # the merge of our experts
        files = [experts_dir / s["file"] for s in sources]
        experts = [provenance(load_lora(f)[1]) if f.exists() else {} for f in files]
        if all(e.get("made_by") == FIXTURE for e in experts):
            return {"seed": experts[0].get("seed")}
    raise SelmaError(f"{path} exists and was not written by {FIXTURE}; it is left alone. Choose another folder")
