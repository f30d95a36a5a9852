"""Merge LoRA *files*: read the experts (any layout), check them, merge every module, write one kohya file.

    report = merge_files(["counting.safetensors", "spatial.safetensors"], "merged.safetensors",
                         MergeConfig(method="svd", rank=64))
    report.to_dict(); report.text()

Order of work (check before spending, never a partial file):

1. read every expert (kohya, PEFT/diffusers or ComfyUI-native layout; :func:`..lora.layouts.read_lora`) and
   hash it; refuse an existing output unless ``overwrite``;
2. :func:`check_experts`: one base model (metadata and shapes agree, within and across files), one text-encoder
   naming, every shared module has the same shape everywhere; with ``strict_keys`` the same modules too;
3. merge module by module (:func:`.layer.merge_module`); a module some experts lack is their zero delta
   (documented in :class:`.config.MergeConfig`): linear/svd sum only the experts that have it, and in
   TIES/DARE/pruning a zero entry never votes, so the result equals merging just those experts with
   their weights (DARE draws one ``torch.rand`` per present expert, in input order);
4. write atomically (temporary file, fsync, rename): kohya layout, ``ss_*`` keys and ``selma.provenance``
   with sources (file, sha256, layout, base, rank), config, weights, per-module errors and ranks, file size.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SelmaError, invalid
from ..fsio import atomic_write_bytes, sha256_file
from ..lora.bases import base_from_metadata, base_from_shapes
from ..lora.format import KOHYA_ALPHA, KOHYA_DOWN, KOHYA_UP, PROVENANCE_KEY
from ..lora.layouts import LoraFile, read_lora
from .config import MergeConfig, block_of
from .layer import merge_module
from .report import LayerStat, MergeReport, overall_error

Progress = Callable[[int, int], None]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Expert:
    """One input file: its LoRA (kohya-layout tensors) and its sha256."""

    lora: LoraFile
    sha256: str

    @property
    def name(self) -> str:
        return self.lora.path.name

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, float | None] | None:
        t = self.lora.kohya
        if module + KOHYA_DOWN not in t:
            return None
        alpha = t.get(module + KOHYA_ALPHA)
        return t[module + KOHYA_DOWN], t[module + KOHYA_UP], None if alpha is None else float(alpha.item())

    @property
    def rank(self) -> int:
        return max((int(v.shape[0]) for k, v in self.lora.kohya.items() if k.endswith(KOHYA_DOWN)), default=0)


def load_experts(paths: Sequence[str | os.PathLike[str]], *, base: str | None = None) -> list[Expert]:
    """Read and hash every expert; errors name the file."""
    if isinstance(paths, (str, os.PathLike)) or len(paths) == 0:
        raise invalid("experts", paths, "one or more LoRA .safetensors files")
    experts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise SelmaError(f"{path}: no such LoRA file")
        experts.append(Expert(read_lora(path, base=base), sha256_file(path)))
    return experts


def check_experts(experts: Sequence[Expert], *, strict_keys: bool = False) -> tuple[str | None, dict[str, list[str]]]:
    """Check the experts fit together; return (their base or None if unknown, module -> experts lacking it).

    Raises :class:`SelmaError` naming the file and the mismatch: bases that differ (by metadata or by
    shapes), SDXL and SD 1/2 text-encoder names mixed, a module with another shape than in the first expert
    that has it, a module without its up or down factor, or (``strict_keys``) modules missing from a file.
    """
    base, base_from = None, ""
    for e in experts:
        _check_pairs(e)
        meta, shapes = base_from_metadata(e.lora.metadata), base_from_shapes(e.lora.kohya)
        if meta and shapes and meta != shapes:
            raise SelmaError(f"{e.name}: its metadata says base {meta!r} but its tensor shapes are those of "
                             f"{shapes!r}; fix ss_base_model_version or use the right file")
        found = meta or shapes or e.lora.base  # the caller's base hint, for files that name none
        if found and base and found != base:
            raise SelmaError(f"{e.name}: made for {found!r}, but {base_from} is for {base!r}; "
                             "experts of different base models cannot be merged")
        if found and not base:
            base, base_from = found, e.name
    families = {e.name: _text_family(e) for e in experts}
    if len({f for f in families.values() if f}) > 1:
        raise SelmaError("text-encoder names differ: " + ", ".join(f"{n}: {f}" for n, f in families.items() if f)
                         + "; SDXL (lora_te1_/lora_te2_) and SD 1.x/2.x (lora_te_) experts cannot be merged")
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for e in experts:
        for module in e.lora.modules:
            down, up, _ = e.factors(module)  # type: ignore[misc]
            shape = (int(up.shape[0]), *down.shape[1:])
            if module not in shapes:
                shapes[module] = (shape, e.name)
            elif shapes[module][0] != shape:
                first_shape, first = shapes[module]
                raise SelmaError(f"{e.name}: module {module} has shape (out, in...) {shape}, but {first_shape} in "
                                 f"{first}; these experts are for different models")
    partial = {m: [e.name for e in experts if e.factors(m) is None] for m in sorted(shapes)}
    partial = {m: names for m, names in partial.items() if names}
    if strict_keys and partial:
        module, names = next(iter(partial.items()))
        raise SelmaError(f"{names[0]}: has no module {module} (and {len(partial) - 1} more modules differ between "
                         "the experts); strict_keys requires identical modules -- turn it off to treat a missing "
                         "module as a zero delta")
    return base, partial


def _check_pairs(e: Expert) -> None:
    t = e.lora.kohya
    for key in t:
        if key.endswith(KOHYA_DOWN) and key[: -len(KOHYA_DOWN)] + KOHYA_UP not in t:
            raise SelmaError(f"{e.name}: {key} has no matching .lora_up.weight")
        if key.endswith(KOHYA_UP) and key[: -len(KOHYA_UP)] + KOHYA_DOWN not in t:
            raise SelmaError(f"{e.name}: {key} has no matching .lora_down.weight")
        if key.endswith(KOHYA_ALPHA) and key[: -len(KOHYA_ALPHA)] + KOHYA_DOWN not in t:
            raise SelmaError(f"{e.name}: {key} belongs to no module (no .lora_down.weight)")
    for module in e.lora.modules:
        down, up = t[module + KOHYA_DOWN], t[module + KOHYA_UP]
        if down.dim() not in (2, 4) or up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise SelmaError(f"{e.name}: module {module} has lora_down {tuple(down.shape)} and lora_up "
                             f"{tuple(up.shape)}; expected (r, in[, kh, kw]) and (out, r[, 1, 1])")


def _text_family(e: Expert) -> str:
    keys = e.lora.kohya
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in keys):
        return "lora_te1_/lora_te2_ (SDXL)"
    if any(k.startswith("lora_te_") for k in keys):
        return "lora_te_ (SD 1.x/2.x)"
    return ""


def merge_experts(
    experts: Sequence[Expert],
    config: MergeConfig,
    *,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], MergeReport]:
    """Check and merge in memory: (kohya tensors, report without file fields)."""
    start = time.perf_counter()
    base, partial = check_experts(experts, strict_keys=config.strict_keys)
    ws = config.expert_weights(len(experts))
    modules = sorted({m for e in experts for m in e.lora.modules})
    rank = config.rank or max(e.rank for e in experts)
    dtype = _DTYPES.get(config.dtype) or experts[0].lora.kohya[modules[0] + KOHYA_UP].dtype
    tensors: dict[str, torch.Tensor] = {}
    layers, dropped = [], []
    diff_sq = target_sq = m_diff_sq = m_sq = 0.0
    for i, module in enumerate(modules):
        if should_stop is not None and should_stop():
            raise SelmaError("merge cancelled; nothing was written")
        scale = config.block_weight(block_of(module))
        present = [(e.factors(module), w) for e, w in zip(experts, ws, strict=True) if e.factors(module) is not None]
        if scale == 0.0:
            dropped.append(module)
            continue
        res = merge_module([f for f, _ in present], [w for _, w in present], config.method,
                           None if config.method == "linear" else rank, density=config.density,
                           generator=_generator(config, module), dtype=dtype, scale=scale)
        tensors[module + KOHYA_DOWN], tensors[module + KOHYA_UP] = res.down, res.up
        tensors[module + KOHYA_ALPHA] = torch.tensor(res.alpha, dtype=torch.float32)
        layers.append(LayerStat(module, block_of(module), res.rank, len(present), res.error, res.method_error))
        diff_sq, target_sq = diff_sq + res.diff_sq, target_sq + res.target_sq
        m_diff_sq, m_sq = m_diff_sq + res.method_diff_sq, m_sq + res.method_sq
        if progress is not None:
            progress(i + 1, len(modules))
    if not layers:
        raise invalid("block_weights", dict(config.block_weights), "weights that keep at least one module")
    sources = [{"file": e.name, "sha256": e.sha256, "layout": e.lora.layout, "base": e.lora.base, "rank": e.rank,
                "modules": len(e.lora.modules)} for e in experts]
    report = MergeReport(config=config.to_dict(), sources=sources, base=base, weights=ws, layers=layers,
                         error=overall_error(diff_sq, target_sq),
                         method_error=overall_error(m_diff_sq, m_sq),
                         rank=max(x.rank for x in layers), partial=partial, dropped=dropped,
                         merge_s=time.perf_counter() - start)
    return tensors, report


def _generator(config: MergeConfig, module: str) -> torch.Generator:
    """DARE's drops for ``module``: a generator seeded by (seed, module name), so order never matters."""
    digest = hashlib.sha256(f"{config.seed}:{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def merge_files(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    config: MergeConfig,
    *,
    overwrite: bool = False,
    base: str | None = None,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MergeReport:
    """Merge LoRA files into ``out`` (kohya layout) and return the report (also written into ``out``)."""
    start = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:
        raise SelmaError(f"{out}: exists already; choose another name, or pass overwrite (--overwrite)")
    if any(Path(p).resolve() == out.resolve() for p in paths):
        raise SelmaError(f"{out}: is one of the experts; write the merge to another file")
    config.expert_weights(len(paths))  # a wrong number of weights fails before any file is read
    experts = load_experts(paths, base=base)
    tensors, report = merge_experts(experts, config, progress=progress, should_stop=should_stop)
    report.out = str(out)
    data = serialize(tensors, report)
    atomic_write_bytes(out, data, overwrite=overwrite)
    report.total_s = time.perf_counter() - start
    return report


def serialize(tensors: dict[str, torch.Tensor], report: MergeReport) -> bytes:
    """safetensors bytes whose metadata records the report, including the file's own size (fixed point)."""
    from safetensors.torch import save

    tensors = {k: t.contiguous() for k, t in tensors.items()}
    size = None
    for _ in range(5):  # the size is written inside the file: iterate until it no longer changes
        report.file_size = size
        data = save(tensors, metadata=merged_metadata(report))
        if len(data) == size:
            return data
        size = len(data)
    raise SelmaError("could not settle the merged file's size in its metadata")  # pragma: no cover


def merged_metadata(report: MergeReport) -> dict[str, str]:
    """kohya ``ss_*`` keys (read by A1111/Forge/kohya tools) and SELMA's provenance as one JSON value."""
    import json

    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(report.rank),
            "ss_training_comment": f"SELMA {report.method} merge of " + ", ".join(s["file"] for s in report.sources),
            PROVENANCE_KEY: json.dumps(report.provenance(), sort_keys=True, separators=(",", ":"))}
    if report.method != "linear":  # every module's alpha is its rank (scale 1); linear's alphas vary
        meta["ss_network_alpha"] = str(report.rank)
    if report.base:
        meta["ss_base_model_version"] = report.base
        meta["ss_v2"] = str(report.base == "sd_v2")
    return meta
