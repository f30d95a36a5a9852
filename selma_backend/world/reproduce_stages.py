"""Stages 1-5 of ``selma reproduce`` (see :mod:`.reproduce`): prompts, training data, filter, LoRAs, merges.

Every stage calls the library's own stage (``render_dataset``, ``filter_dataset``, ``train_experts``,
``merge_files``), which resume; this module only chains them and lays out the run folder:

    prompts/<skill>.train.jsonl, prompts/<skill>.heldout.jsonl
    skills/<skill>.json                      world skills as SELMA skill files (training's flip policies)
    data/strong/<skill>/, data/weak/<skill>/ rendered datasets (the filter writes ``keep`` into them)
    data/views/unfiltered/<skill>/           the strong images, all of them (hard links; no ``keep``)
    data/views/joint/                        the kept strong images of every skill (hard links)
    loras/{filtered,nofilter,weak2strong}/<skill>.safetensors, loras/joint/joint.safetensors
    loras/merged/<method>.safetensors        linear / svd / ties of the filtered experts,
                                             nofilter-linear / weak2strong-linear
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import SelmaError
from ..fsio import atomic_write_text, read_jsonl, sha256_file
from ..render import dataset as ds
from .reproduce import MERGE_ARMS, ReproduceConfig, Say

FILTER_FIELDS = ("clip_score", "keep", "drop_reason", "review")


# --- 1. prompts ----------------------------------------------------------------------------------------------


def write_all_prompts(out: Path, config: ReproduceConfig) -> dict[str, dict[str, Path]]:
    """skill -> {"train": path, "heldout": path}; files rewritten only when their content would change."""
    from .skills import world_prompts

    result = {}
    for skill in config.skills:
        paths = {}
        for split, n in (("train", config.n_train), ("heldout", config.n_eval)):
            rows = world_prompts(skill, n, seed=config.seed, split=split)
            paths[split] = write_if_changed(out / "prompts" / f"{skill}.{split}.jsonl", _jsonl(rows))
        result[skill] = paths
    return result


def _jsonl(rows: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_if_changed(path: Path, text: str) -> Path:
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        atomic_write_text(path, text)
    return path


def skills_dir(out: Path) -> Path:
    """The world skills as SELMA skill files (``user_dir`` of training: world_spatial flips swap left/right)."""
    from .skills import write_skill_files

    folder = out / "skills"
    if not folder.is_dir() or not any(folder.glob("*.json")):
        write_skill_files(folder)
    return folder


# --- 2. render -----------------------------------------------------------------------------------------------


def render_config(config: ReproduceConfig, images_per_prompt: int, seed: int) -> Any:
    from ..render.config import RenderConfig

    return RenderConfig(images_per_prompt=images_per_prompt, batch_size=config.render_batch, steps=config.render_steps,
                        cfg=config.cfg, scheduler=config.scheduler, seed=seed)


def render_training_data(out: Path, config: ReproduceConfig, prompts: dict[str, dict[str, Path]],
                         say: Say) -> dict[str, Any]:
    """{"strong": {skill: folder}, "weak": {...}, "reports": {...}}: each training prompt ``train_images`` times."""
    from ..models.config import ModelConfig
    from ..models.loader import load_pipeline
    from ..render.render import render_dataset

    rc = render_config(config, config.train_images, config.seed)
    data: dict[str, Any] = {"strong": {}, "weak": {}, "reports": {}, "model_hash": {}}
    for which, path in (("strong", config.model), ("weak", config.weak_model)):
        with load_pipeline(ModelConfig(path=path)) as lp:
            data["model_hash"][which] = lp.model_hash
            for skill in config.skills:
                target = out / "data" / which / skill
                report = render_dataset(lp, prompts[skill]["train"], target, rc)
                say(f"      {which} {skill}: {report.rendered} rendered, {report.existing} already there "
                    f"({report.images_per_s:.1f} images/s)")
                data[which][skill] = target
                data["reports"][f"{which}/{skill}"] = {"rendered": report.rendered, "existing": report.existing}
    return data


# --- 3. filter + data quality --------------------------------------------------------------------------------


def filter_and_judge(out: Path, config: ReproduceConfig, data: dict[str, Any], prompts: dict[str, dict[str, Path]],
                     say: Say) -> dict[str, Any]:
    """CLIP-filter every rendered dataset (best ``filter_top_k`` per prompt); judge each before and after.

    Returns ``{"strong"|"weak": {skill: {"images", "kept", "judge_all", "judge_kept", "all_correct_all",
    "all_correct_kept"}}}`` and writes the unfiltered and joint views the training stage reads."""
    from ..filter import FilterConfig, ScorerConfig, filter_dataset, load_scorer

    fc = FilterConfig(mode="top_k_per_prompt", top_k=config.filter_top_k, dedup_cosine=0)
    specs = {r["id"]: r["spec"] for skill in config.skills for r in read_jsonl(prompts[skill]["train"])}
    quality: dict[str, Any] = {"strong": {}, "weak": {}}
    with load_scorer(ScorerConfig(path=config.clip)) as scorer:
        for which in ("strong", "weak"):
            for skill in config.skills:
                folder = data[which][skill]
                report = filter_dataset(folder, scorer, fc)
                q = judge_training_set(folder, specs)
                quality[which][skill] = q
                say(f"      {which} {skill}: kept {report.kept}/{report.total}; judge {q['judge_all']:.3f} -> "
                    f"{q['judge_kept']:.3f} (all-correct {q['all_correct_all']:.3f} -> {q['all_correct_kept']:.3f})")
    write_view(out / "data" / "views" / "joint", [data["strong"][s] for s in config.skills], kept_only=True)
    for skill in config.skills:
        write_view(out / "data" / "views" / "unfiltered" / skill, [data["strong"][skill]], kept_only=False)
    return quality


def judge_training_set(folder: Path, specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Judge accuracy (mean share of questions passed) and all-correct rate of all images and of the kept ones."""
    from PIL import Image

    from ..filter.review import effective_keep
    from .reproduce_eval import score_image
    from .spec import PromptSpec

    every, kept = [], []
    for row in ds.read_index(folder).values():
        with Image.open(folder / row["file_name"]) as im:
            score = score_image(im.convert("RGB"), PromptSpec.from_dict(specs[row["prompt_id"]]))
        every.append(score)
        if effective_keep(row):
            kept.append(score)

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    return {"images": len(every), "kept": len(kept),
            "judge_all": mean([s for s, _ in every]), "judge_kept": mean([s for s, _ in kept]),
            "all_correct_all": mean([float(a) for _, a in every]), "all_correct_kept": mean([float(a) for _, a in kept])}


def write_view(target: Path, sources: list[Path], *, kept_only: bool) -> Path:
    """A dataset folder of hard links to ``sources``' images (copies where links fail): the kept rows
    (``kept_only``), or every row with the filter's decision removed (training then uses them all)."""
    from ..filter.review import effective_keep

    rows = []
    for src in sources:
        for row in ds.read_index(src).values():
            if kept_only and not effective_keep(row):
                continue
            rows.append({k: v for k, v in row.items() if k not in FILTER_FIELDS})
            _link(src / row["file_name"], target / row["file_name"])
    if not rows:
        raise SelmaError(f"{target}: no images to train on (the filter kept none of {[str(s) for s in sources]})")
    names = {r["file_name"] for r in rows}
    if len(names) != len(rows):
        raise SelmaError(f"{target}: two source datasets hold the same file name; prompt ids must be distinct")
    for stale in target.glob("*.png"):
        if stale.name not in names:
            stale.unlink()
    write_if_changed(target / ds.METADATA, _jsonl(sorted(rows, key=lambda r: r["file_name"])))
    return target


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        if os.path.samefile(src, dst) or sha256_file(src) == sha256_file(dst):
            return
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- 4. train ------------------------------------------------------------------------------------------------


def train_config(config: ReproduceConfig, steps: int) -> Any:
    from ..train import TrainConfig

    return TrainConfig(rank=config.rank, alpha=config.alpha, steps=steps, batch_size=config.train_batch, grad_accum=1,
                       resolution=64, lr=config.lr, seed=config.seed, checkpoint_every=max(steps, 1),
                       flip="skill", buckets=False, noise_offset=config.noise_offset)


def train_all(out: Path, config: ReproduceConfig, data: dict[str, Any], say: Say,
              work: dict[str, int] | None = None) -> dict[str, Path]:
    """Arm -> LoRA file for every trained LoRA: experts (``expert:<skill>``), ``nofilter:<skill>``,
    ``weak2strong:<skill>`` and ``joint``; the strong model is loaded once for all of them. ``work["trained"]``
    counts the LoRAs trained now (not found finished)."""
    from ..models.config import ModelConfig
    from ..models.loader import load_pipeline
    from ..train import train_experts

    skills = list(config.skills)
    views = out / "data" / "views"
    groups = [("expert", out / "loras" / "filtered", [data["strong"][s] for s in skills], skills, config.train_steps),
              ("nofilter", out / "loras" / "nofilter", [views / "unfiltered" / s for s in skills], skills,
               config.train_steps),
              ("weak2strong", out / "loras" / "weak2strong", [data["weak"][s] for s in skills], skills,
               config.train_steps),
              ("joint", out / "loras" / "joint", [views / "joint"], ["joint"], config.train_steps * len(skills))]
    loras: dict[str, Path] = {}
    user_dir = skills_dir(out)
    with load_pipeline(ModelConfig(path=config.model)) as lp:
        for prefix, folder, datasets, names, steps in groups:
            results = train_experts(lp, datasets, folder, train_config(config, steps), names=names, resume=True,
                                    overwrite=True, cache_root=out / "cache", user_dir=user_dir)
            for name, r in zip(names, results, strict=True):
                if r.path is None:
                    raise SelmaError(f"training {prefix} {name} stopped before its end; run again to resume")
                state = "already trained" if r.skipped else f"final loss {r.final_loss:.4f}, {r.samples_per_s:.1f} samples/s"
                say(f"      {prefix} {name}: {r.samples} images, {steps} steps, {state}")
                loras["joint" if prefix == "joint" else f"{prefix}:{name}"] = Path(r.path)
                if work is not None and not r.skipped:
                    work["trained"] = work.get("trained", 0) + 1
    return loras


# --- 5. merge ------------------------------------------------------------------------------------------------


def merge_all(out: Path, config: ReproduceConfig, loras: dict[str, Path], say: Say,
              work: dict[str, int] | None = None) -> dict[str, Path]:
    """``merged:<method>`` for the filtered experts, ``nofilter`` and ``weak2strong`` (linear, 1/N)."""
    from ..merge import MergeConfig

    def group(prefix: str) -> list[Path]:
        return [loras[f"{prefix}:{s}"] for s in config.skills]

    jobs = [(f"merged:{m}", group("expert"), MergeConfig(method=m, density=config.ties_density) if m == "ties"
             else MergeConfig(method=m)) for m in MERGE_ARMS]
    jobs += [("nofilter", group("nofilter"), MergeConfig(method="linear")),
             ("weak2strong", group("weak2strong"), MergeConfig(method="linear"))]
    merged = {}
    for arm, experts, mc in jobs:
        target = out / "loras" / "merged" / f"{arm.replace(':', '-')}.safetensors"
        before = target.stat().st_mtime_ns if target.exists() else None
        merged[arm] = merge_once(experts, target, mc, say, arm)
        if work is not None and target.stat().st_mtime_ns != before:
            work["merged"] = work.get("merged", 0) + 1
    return merged


def merge_once(experts: list[Path], target: Path, mc: Any, say: Say, label: str) -> Path:
    """Merge unless ``target`` was already merged from these very experts with this method."""
    from ..merge import merge_files

    shas = [sha256_file(p) for p in experts]
    if target.exists() and merged_from(target) == (shas, mc.to_dict()):
        say(f"      {label}: already merged from these experts")
        return target
    report = merge_files(experts, target, mc, overwrite=True)
    say(f"      {label}: {mc.method}, rank {report.rank}, relative error {report.error:.1e}")
    return target


def merged_from(path: Path) -> tuple[list[str], dict[str, Any]]:
    """(sha256 of each source in order, merge config) from a merged file's provenance."""
    from safetensors import safe_open

    from ..lora.format import provenance

    with safe_open(str(path), framework="pt") as f:
        prov = provenance(f.metadata() or {})
    return [s.get("sha256", "") for s in prov.get("sources", [])], prov.get("config", {})


__all__ = ["filter_and_judge", "judge_training_set", "merge_all", "render_training_data", "train_all",
           "write_all_prompts", "write_view"]
