"""The models an evaluation compares: the base checkpoint, and the base with each LoRA file applied.

A LoRA file is read for its header only (keys, metadata) before anything renders: its layout must be
one :mod:`selma_backend.lora.format` knows, and its ``ss_base_model_version`` must fit the checkpoint.
Its kind comes from SELMA's provenance (``selma.provenance``): ``merged`` when it says stage "merge"
or names sources or a merge method (stage 5), ``expert`` when it names a skill (stage 4), else
``lora`` (any other file).

Rendering applies one LoRA at a time on the one loaded diffusers pipeline
(``load_lora_weights`` reads the kohya layout) and removes it afterwards, so the base weights are
the same for every model (:func:`lora_applied`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SelmaError, invalid
from ..fsio import sha256_file
from ..paths import slug

KINDS = ("base", "expert", "lora", "merged")  # also the column order of grids and tables
#: ``LoadedPipeline.arch`` -> the kohya ``ss_base_model_version`` values that fit it.
BASE_VERSIONS = {"sd1": ("sd_v1",), "sd2": ("sd_v2",), "sdxl": ("sdxl_base_v1-0", "sdxl")}
ADAPTER = "selma_eval"


@dataclass(frozen=True)
class ModelEntry:
    """One column of the comparison."""

    key: str  # folder name of its images, unique ("base", "<lora file stem>")
    label: str  # what a person reads
    kind: str  # one of KINDS
    path: str = ""  # the LoRA file ("" for the base)
    sha256: str = ""  # of the LoRA file
    skill: str = ""  # an expert's skill (from its provenance)
    provenance: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_models(loras: Sequence[str | os.PathLike[str]], arch: str) -> list[ModelEntry]:
    """The base plus one entry per LoRA file, in ``KINDS`` order (stable within a kind); files checked."""
    entries = [ModelEntry("base", "base", "base")]
    taken = {"base"}
    seen: dict[str, str] = {}
    for raw in loras:
        path = Path(raw)
        entry = _describe_lora(path, arch, taken)
        if entry.sha256 in seen:
            raise invalid("loras", str(path), "distinct files", f"it has the same bytes as {seen[entry.sha256]}")
        seen[entry.sha256] = str(path)
        taken.add(entry.key)
        entries.append(entry)
    return sorted(entries, key=lambda e: KINDS.index(e.kind))


def _describe_lora(path: Path, arch: str, taken: set[str]) -> ModelEntry:
    from safetensors import safe_open

    from ..lora.format import detect_layout  # imports torch: only when a LoRA is read

    if not path.is_file() or path.suffix.lower() not in (".safetensors", ".sft"):
        raise invalid("lora", str(path), "an existing LoRA .safetensors file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            meta, keys = dict(f.metadata() or {}), list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged header
        raise SelmaError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
    try:
        detect_layout(keys)
    except SelmaError as e:
        raise SelmaError(f"{path}: {e}") from e
    base = meta.get("ss_base_model_version", "")
    if base and arch in BASE_VERSIONS and not base.startswith(BASE_VERSIONS[arch]):
        raise invalid("lora", f"{path.name} (for {base})", f"LoRAs for {' / '.join(BASE_VERSIONS[arch])}",
                      f"the checkpoint is {arch}; pick LoRAs trained on the same base")
    prov = _provenance(path, meta)
    key = slug(path.stem)
    n = 2
    while key in taken:
        key, n = f"{slug(path.stem)}-{n}", n + 1
    return ModelEntry(key, path.stem, _kind(prov), str(path.resolve()), sha256_file(path), str(prov.get("skill") or ""),
                      prov)


def _provenance(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    from ..lora.format import provenance

    try:
        prov = provenance(meta)
    except ValueError as e:
        raise SelmaError(f"{path}: its selma.provenance metadata is not valid JSON ({e})") from e
    return prov if isinstance(prov, dict) else {}


def _kind(prov: dict[str, Any]) -> str:
    if prov.get("stage") == "merge" or prov.get("sources") or prov.get("method"):
        return "merged"
    if isinstance(prov.get("skill"), str) and prov["skill"]:
        return "expert"
    return "lora"


@contextlib.contextmanager
def lora_applied(pipe: Any, entry: ModelEntry, scale: float = 1.0) -> Iterator[None]:
    """Within the block ``pipe`` renders with ``entry``'s LoRA at ``scale``; afterwards it is removed.

    The base entry changes nothing. diffusers converts the kohya layout (``load_lora_weights``) and
    adds PEFT layers; ``unload_lora_weights`` removes them, restoring the base modules exactly.
    """
    if entry.kind == "base":
        yield
        return
    path = Path(entry.path)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=ADAPTER)
        pipe.set_adapters([ADAPTER], adapter_weights=[float(scale)])
    except (ValueError, KeyError, RuntimeError) as e:
        pipe.unload_lora_weights()
        raise SelmaError(f"{path}: diffusers could not apply this LoRA to the checkpoint ({type(e).__name__}: "
                         f"{str(e)[:300]}); is it for this base model?") from e
    try:
        yield
    finally:
        pipe.unload_lora_weights()
