"""Stage 5 nodes: merge LoRA experts into one file, apply LoRAs to the artist's own MODEL/CLIP through
ComfyUI's own LoRA patching, and the format bridge (keys matched before sampling, layout conversion)."""

from __future__ import annotations

import os
from pathlib import Path

from ..selma_backend.errors import SelmaError, invalid
from ..selma_backend.lora.bridge import match_keys
from ..selma_backend.lora.layouts import LAYOUTS, convert_lora
from ..selma_backend.lora.names import BASE_VERSIONS
from ..selma_backend.merge.config import parse_weights
from ..selma_backend.merge.files import merge_files
from ..selma_backend.merge.math import MERGE_METHODS
from ..selma_backend.merge.preview import widget_config
from ..selma_backend.paths import safe_join
from .glue import (
    CATEGORY,
    apply_lora,
    interrupted,
    io,
    load_lora_file,
    lora_key_map,
    loras_root,
    model_names,
    model_path,
    progress_callback,
    raise_if_interrupted,
    ui,
)

#: A list of absolute LoRA .safetensors paths (SELMA's training node outputs it as ``experts``).
Loras = io.Custom("SELMA_LORAS")
SUBFOLDER = "selma"  # models/loras/selma/: where SELMA writes merged and converted LoRAs
NO_LORAS = "(no LoRAs in models/loras)"


def _lora_names() -> list[str]:
    return [n for n in model_names("loras") if n.lower().endswith((".safetensors", ".sft"))]


def _listed_paths(text: str, field: str) -> list[Path]:
    """One LoRA name a line, each one ComfyUI lists in models/loras (a typed path cannot reach elsewhere)."""
    names = [line.strip() for line in text.splitlines() if line.strip()]
    choices = _lora_names()
    for name in names:
        if name not in choices:
            shown = choices[:20] + (["..."] if len(choices) > 20 else [])
            raise invalid(field, name, shown or [NO_LORAS], "one name a line, as the LoRA list shows it; refresh after adding files")
    return [model_path("loras", n) for n in names]


def _wired(paths: list[str] | None) -> list[Path]:
    out = []
    for p in paths or []:
        path = Path(p)
        if path.suffix.lower() not in (".safetensors", ".sft") or not path.is_file():
            raise invalid("experts", p, "paths of existing LoRA .safetensors files")
        out.append(path)
    return out


def _fingerprint(lora_names: str, experts: list[str] | None) -> str:
    """Name, size and mtime of every input file: a changed expert runs the node again (same widgets or not)."""
    try:
        paths = _listed_paths(lora_names, "lora_names") + [Path(p) for p in experts or []]
        return "|".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)
    except (OSError, ValueError):
        return ""  # execute() reports the problem


def _out_path(name: str, suffix: str = ".safetensors") -> tuple[Path, str]:
    """A new file under models/loras/selma/: ``name``, else ``name_0001`` ... (never overwrites).

    Returns (path, the name ComfyUI's LoRA list shows for it)."""
    root = loras_root()
    stem = name.strip().removesuffix(suffix) or "merged"
    n = 0
    # Taken names are skipped before the path check, so an existing file -- a symlink to elsewhere
    # included -- is never resolved, opened or replaced; the free name is then checked (no escape).
    while os.path.lexists(root / SUBFOLDER / f"{stem}{f'_{n:04d}' if n else ''}{suffix}"):
        n += 1
    path = safe_join(root / SUBFOLDER, f"{stem}{f'_{n:04d}' if n else ''}{suffix}", field="name")
    return path, path.relative_to(root.resolve()).as_posix()


class SelmaMergeExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaMergeExperts", display_name="SELMA Merge Experts", category=CATEGORY,
            description="Stage 5: merge skill LoRAs into one file in models/loras/selma/ and report how exact it is: "
            "per-module and overall relative error against the weighted sum of the experts, rank and file size "
            "(also written into the file). linear is exact; svd keeps the best approximation at a smaller rank; "
            "ties/dare resolve interference. An existing file is never replaced: a number is added to the name.",
            inputs=[
                io.String.Input("lora_names", multiline=True, default="",
                                tooltip="Experts from models/loras, one name a line as the LoRA list shows it "
                                "(e.g. selma/counting.safetensors). Wired experts follow these."),
                io.Combo.Input("method", options=MERGE_METHODS.names(), default="svd",
                               tooltip="linear: exact (rank = sum of ranks) | svd: best approximation at the rank | "
                               "ties, dare_linear, dare_ties, magnitude_prune: task arithmetic, then the rank."),
                io.String.Input("weights", default="", tooltip="One weight per expert, e.g. 0.5, 0.25, 0.25. "
                                "Empty: 1/N each (SELMA's merge)."),
                io.Int.Input("rank", default=0, min=0, max=4096,
                             tooltip="Rank of the merged LoRA (0: the largest expert rank). Ignored by linear."),
                io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="ties/dare/magnitude_prune: share of each expert's entries kept."),
                io.String.Input("block_weights", default="",
                                tooltip="Multipliers per block, e.g. down=1, mid=0.5, up=1, te=0 (missing: 1; 0 leaves "
                                "the block out)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Random drops of dare_linear / dare_ties."),
                io.String.Input("name", default="merged",
                                tooltip="File name in models/loras/selma/ (a number is added if it exists)."),
                Loras.Input("experts", optional=True, tooltip="Expert files from SELMA Train (appended to lora_names)."),
            ],
            outputs=[io.String.Output("lora_name", display_name="lora_name",
                                      tooltip="The merged file as the LoRA list shows it (for SELMA Apply Experts)."),
                     io.String.Output("report", display_name="report", tooltip="Errors, rank, sources, file size."),
                     Loras.Output("merged", display_name="merged", tooltip="The merged file, for SELMA Evaluate.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, lora_names: str, experts: list[str] | None = None, **_: object) -> str:
        return _fingerprint(lora_names, experts)

    @classmethod
    def execute(cls, lora_names: str, method: str, weights: str, rank: int, density: float, block_weights: str,
                seed: int, name: str, experts: list[str] | None = None) -> io.NodeOutput:
        paths = _listed_paths(lora_names, "lora_names") + _wired(experts)
        if not paths:
            raise invalid("lora_names", lora_names, "at least one expert", "list names or wire SELMA Train's experts")
        config = widget_config(method, weights, rank, density, block_weights, seed)
        out, listed = _out_path(name)
        try:
            report = merge_files(paths, out, config, progress=progress_callback(1, "merge"), should_stop=interrupted)
        except SelmaError:
            raise_if_interrupted()
            raise
        text = report.text()
        return io.NodeOutput(listed, text, [str(out)], ui=ui.PreviewText(text))


class SelmaApplyExperts(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaApplyExperts", display_name="SELMA Apply Experts", category=CATEGORY,
            description="Apply one or more LoRA files (experts or a merge) to your own MODEL and CLIP with ComfyUI's "
            "own LoRA patching, as LoraLoader does, and report how many of each file's keys matched.",
            inputs=[
                io.Model.Input("model", tooltip="Your diffusion model (e.g. from Load Checkpoint)."),
                io.Clip.Input("clip", optional=True, tooltip="Your text encoder; leave empty to patch the model only."),
                io.String.Input("lora_names", multiline=True, default="",
                                tooltip="LoRAs from models/loras, one name a line as the LoRA list shows it."),
                io.Float.Input("strength_model", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="How strongly the LoRAs change the diffusion model."),
                io.Float.Input("strength_clip", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="How strongly the LoRAs change the text encoder."),
                io.String.Input("strengths", default="", tooltip="Per-file multipliers in order, e.g. 1, 0.5 "
                                "(empty: 1 each)."),
                io.String.Input("lora_name", optional=True, force_input=True,
                                tooltip="One more LoRA by name, e.g. SELMA Merge Experts' lora_name."),
                Loras.Input("experts", optional=True, tooltip="More LoRA files, e.g. from SELMA Train."),
            ],
            outputs=[io.Model.Output("model_out", display_name="model", tooltip="The patched model."),
                     io.Clip.Output("clip_out", display_name="clip", tooltip="The patched text encoder."),
                     io.String.Output("report", display_name="report", tooltip="Keys matched per file.")],
        )

    @classmethod
    def execute(cls, model, lora_names: str, strength_model: float, strength_clip: float, strengths: str,
                clip=None, lora_name: str | None = None, experts: list[str] | None = None) -> io.NodeOutput:
        text = lora_names + ("\n" + lora_name if lora_name else "")
        paths = _listed_paths(text, "lora_names") + _wired(experts)
        if not paths:
            raise invalid("lora_names", lora_names, "at least one LoRA", "list names or wire experts")
        mult = parse_weights(strengths, "strengths") or (1.0,) * len(paths)
        if len(mult) != len(paths):
            raise invalid("strengths", strengths, f"{len(paths)} numbers, one per LoRA (or empty)")
        key_map, lines = lora_key_map(model, clip), []
        for path, m in zip(paths, mult, strict=True):
            lora = load_lora_file(path)
            lines.append(f"{path.name} x{m:g}: " + match_keys(lora, key_map).text(show=4))
            model, clip = apply_lora(model, clip, lora, strength_model * m, strength_clip * m)
        text = "\n".join(lines)
        return io.NodeOutput(model, clip, text, ui=ui.PreviewText(text))


class SelmaLoraBridge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SelmaLoraBridge", display_name="SELMA LoRA Bridge", category=CATEGORY,
            description="Check a LoRA file against your model before sampling (\"N of M keys matched\", with "
            "ComfyUI's own key map), and optionally convert it between the kohya, PEFT/diffusers and ComfyUI-native "
            "layouts (exact: tensors unchanged) into models/loras/selma/.",
            inputs=[
                io.Combo.Input("lora_name", options=_lora_names() or [NO_LORAS], tooltip="A LoRA from models/loras."),
                io.Model.Input("model", optional=True, tooltip="The model to check the LoRA against."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to check the LoRA against."),
                io.Combo.Input("convert_to", options=["none", *LAYOUTS], default="none",
                               tooltip="none | kohya (ComfyUI, A1111, kohya) | peft (diffusers load_lora_weights) | "
                               "comfy (ComfyUI-native names)."),
                io.Combo.Input("base", options=["auto", *BASE_VERSIONS], default="auto",
                               tooltip="Base model, for files whose metadata and shapes name none (auto: detect)."),
                io.String.Input("out_name", default="", tooltip="Converted file name in models/loras/selma/ "
                                "(empty: <name>_<layout>; a number is added if it exists)."),
            ],
            outputs=[io.String.Output("report", display_name="report", tooltip="Keys matched, and the conversion."),
                     io.String.Output("lora_name_out", display_name="lora_name",
                                      tooltip="The converted file as the LoRA list shows it (else the input)."),
                     io.Int.Output("matched", display_name="matched", tooltip="Keys the model/clip would load."),
                     io.Int.Output("total", display_name="total", tooltip="Keys in the file.")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name: str, **_: object) -> str:
        return _fingerprint(lora_name, None)

    @classmethod
    def execute(cls, lora_name: str, convert_to: str, base: str, out_name: str, model=None,
                clip=None) -> io.NodeOutput:
        (path,) = _listed_paths(lora_name, "lora_name")
        lora = load_lora_file(path)
        lines, listed = [], lora_name
        if model is None and clip is None:
            lines.append("connect model and/or clip to count the keys they would load")
        report = match_keys(lora, lora_key_map(model, clip))
        lines.insert(0, report.text())
        if convert_to != "none":
            out, listed = _out_path(out_name or f"{Path(lora_name).stem}_{convert_to}")
            convert_lora(path, out, convert_to, base=None if base == "auto" else base)  # type: ignore[arg-type]
            lines.append(f"converted to {convert_to}: {listed}")
        text = "\n".join(lines)
        return io.NodeOutput(text, listed, report.matched, report.total, ui=ui.PreviewText(text))
