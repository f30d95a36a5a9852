"""``selma reproduce``: SELMA end to end in the shapes world, with the table the paper argues for.

Stages (each resumable: a rerun skips finished work):

1. prompts: ``n_train`` training and ``n_eval`` held-out prompts per world skill (:func:`.skills.world_prompts`;
   the split is a hash of meaning, so no held-out scene is ever trained on), under ``DIR/prompts``.
2. render: every training prompt ``train_images`` times with the strong and with the weak model.
3. filter: the world CLIP keeps the ``filter_top_k`` best images of each prompt (SELMA's filter); the
   exact judge measures each training set before and after filtering (does filtering clean the data?).
4. train: LoRA experts per skill on filtered strong data, on unfiltered strong data, on filtered
   data of the weak model (weak-to-strong: trained on the strong model), and one joint LoRA on the
   union of the filtered data with as many samples as all experts together.
5. merge: the filtered experts with ``linear`` (SELMA: 1/N each), ``svd`` and ``ties``; the unfiltered
   and the weak-to-strong experts with ``linear``.
6. evaluate: every arm renders every held-out prompt with the same seeds; the judge (primary) and the
   world CLIP score each image; per-prompt means, 95% bootstrap intervals, paired differences to base.

Outputs: ``DIR/table.json``, ``DIR/table.md`` (with computed claims), ``DIR/grids/*.png`` and
``DIR/before_after.png``. Stage code is in :mod:`.reproduce_stages`, evaluation in :mod:`.reproduce_eval`,
the table in :mod:`.reproduce_report`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import SelmaError, check_int, check_number, invalid
from ..fsio import atomic_write_json
from .clip_eval import WORLD_CLIP
from .sd_model import WORLD_SD, WORLD_SD_SMALL

SKILLS = ("world_counting", "world_spatial", "world_binding", "world_whoops")
MERGE_ARMS = ("linear", "svd", "ties")
CONFIG_FILE = "reproduce.json"
#: What a run writes into DIR (``--force`` removes these, and only these, before starting again).
OWNED = ("prompts", "skills", "data", "loras", "eval", "cache", "grids", "table.json", "table.md", "before_after.png",
         CONFIG_FILE)
STAGES = 6
#: Rough CPU costs for the printed plan (64 px world-sd, 2 threads): seconds per image per denoising step
#: (guidance doubles the batch), per training sample (forward + backward), per judged + CLIP-scored image.
#: Training's figure is measured: 0.024-0.026 s a sample in the quick and the full run of 2026-11-30.
SECONDS_PER_IMAGE_STEP = 0.012
SECONDS_PER_TRAIN_SAMPLE = 0.025
SECONDS_PER_SCORED_IMAGE = 0.01

Say = Callable[[str], None]


@dataclass(frozen=True)
class ReproduceConfig:
    """Every setting of a run (stored in ``DIR/reproduce.json``; a rerun must match it).

    model / weak_model / clip: the strong and weak world-sd folders and the world CLIP folder.
    n_train / n_eval: training and held-out prompts per skill; train_images: images rendered per
    training prompt (the filter keeps ``filter_top_k`` of them); eval_images: images per held-out
    prompt and arm. render_steps / cfg / scheduler / render_batch: rendering (training data and
    evaluation alike). rank / alpha / train_steps / train_batch / lr / noise_offset: each LoRA (the joint
    one trains ``train_steps x len(skills)`` steps). ties_density: entries each delta keeps in the ``ties`` merge.
    resamples: bootstrap resamples; grid_prompts: held-out prompts per skill shown in the grids.
    """

    model: str = str(WORLD_SD)
    weak_model: str = str(WORLD_SD_SMALL)
    clip: str = str(WORLD_CLIP)
    skills: tuple[str, ...] = SKILLS
    n_train: int = 150
    n_eval: int = 100
    train_images: int = 2
    filter_top_k: int = 1
    eval_images: int = 1
    render_steps: int = 20
    cfg: float = 7.5  # SD's usual guidance; world-sd follows prompts best at 6-9 (README)
    scheduler: str = "dpmpp_2m"
    render_batch: int = 32
    rank: int = 8
    alpha: float = 8.0
    train_steps: int = 200
    train_batch: int = 16
    lr: float = 1e-3
    noise_offset: float = 0.1  # world-sd's own training recipe (selma world train-sd), so its LoRAs match it
    ties_density: float = 0.5
    resamples: int = 2000
    grid_prompts: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        from ..render.schedulers import SCHEDULERS
        from .skills import WORLD_SKILLS

        for name in ("model", "weak_model", "clip"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            if not isinstance(value, str) or not value.strip():
                raise invalid(name, value, "a folder path")
            object.__setattr__(self, name, str(Path(value).expanduser().resolve()))
        skills = (self.skills,) if isinstance(self.skills, str) else tuple(self.skills)
        allowed = [s for s in WORLD_SKILLS.names() if s != "world_common"]
        if not skills or len(set(skills)) != len(skills) or any(s not in allowed for s in skills):
            raise invalid("skills", list(skills), f"distinct world skills from {allowed}",
                          "world_common is the base model's diet, not a skill arm")
        object.__setattr__(self, "skills", skills)
        for name, lo, hi in (("n_train", 1, 100_000), ("n_eval", 1, 100_000), ("train_images", 1, 64),
                             ("filter_top_k", 1, 64), ("eval_images", 1, 64), ("render_steps", 1, 1000),
                             ("render_batch", 1, 4096), ("rank", 1, 1024), ("train_steps", 1, 10_000_000),
                             ("train_batch", 1, 4096), ("resamples", 100, 1_000_000), ("grid_prompts", 1, 1000),
                             ("seed", 0, 2**31 - 1)):
            check_int(name, getattr(self, name), lo, hi)
        if self.filter_top_k > self.train_images:
            raise invalid("filter_top_k", self.filter_top_k, f"an integer from 1 to train_images ({self.train_images})",
                          "the filter keeps the best filter_top_k of the train_images images of each prompt")
        for name, lo, hi in (("cfg", 0.0, 100.0), ("alpha", 1e-6, 1e6), ("lr", 1e-8, 1.0), ("noise_offset", 0.0, 1.0),
                             ("ties_density", 1e-6, 1.0)):
            check_number(name, getattr(self, name), lo, hi)
            object.__setattr__(self, name, float(getattr(self, name)))
        SCHEDULERS.get(self.scheduler)  # raises naming the registered schedulers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skills"] = list(self.skills)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReproduceConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise invalid("reproduce config", unknown, sorted(known), "remove the unknown keys")
        return cls(**{**d, "skills": tuple(d.get("skills", SKILLS))})


#: ``--quick``: the same arms at sizes meant to finish in under 15 minutes on 2 CPU cores (64 px models).
QUICK = {"n_train": 24, "n_eval": 12, "train_images": 2, "eval_images": 1, "render_steps": 15, "train_steps": 50,
         "train_batch": 16, "resamples": 1000, "grid_prompts": 3}


def quick_config(**overrides: Any) -> ReproduceConfig:
    return ReproduceConfig(**{**QUICK, **overrides})


def arms(config: ReproduceConfig) -> list[str]:
    """Every compared arm, in table order."""
    return ["base", "joint", *(f"expert:{s}" for s in config.skills), *(f"merged:{m}" for m in MERGE_ARMS),
            "nofilter", "weak2strong"]


def plan(config: ReproduceConfig) -> dict[str, Any]:
    """What the run does, in counts, and a rough CPU time estimate (seconds) per stage."""
    n = len(config.skills)
    train_renders = 2 * n * config.n_train * config.train_images  # strong and weak
    eval_renders = len(arms(config)) * n * config.n_eval * config.eval_images
    guided = 2 if config.cfg > 1 else 1
    expert_equivalents = 3 * n + n  # filtered, unfiltered, weak-to-strong experts + the joint LoRA (n x steps)
    samples = expert_equivalents * config.train_steps * config.train_batch
    est = {"render": train_renders * config.render_steps * guided * SECONDS_PER_IMAGE_STEP,
           "filter": train_renders * SECONDS_PER_SCORED_IMAGE,
           "train": samples * SECONDS_PER_TRAIN_SAMPLE,
           "evaluate": eval_renders * (config.render_steps * guided * SECONDS_PER_IMAGE_STEP + SECONDS_PER_SCORED_IMAGE)}
    return {"arms": len(arms(config)), "train_prompts": n * config.n_train, "heldout_prompts": n * config.n_eval,
            "train_images": train_renders, "eval_images": eval_renders, "train_steps": expert_equivalents * config.train_steps,
            "train_samples": samples, "estimate_s": {k: round(v) for k, v in est.items()},
            "estimate_total_s": round(sum(est.values()))}


def format_plan(p: dict[str, Any]) -> str:
    e = p["estimate_s"]
    return (f"plan: {p['arms']} arms; {p['train_prompts']} training prompts -> {p['train_images']} images (strong + weak); "
            f"{p['train_steps']} LoRA steps ({p['train_samples']} samples); {p['heldout_prompts']} held-out prompts -> "
            f"{p['eval_images']} evaluation images.\n      rough CPU estimate: render {e['render']} s, filter {e['filter']} s, "
            f"train {e['train']} s, evaluate {e['evaluate']} s; total ~{p['estimate_total_s'] / 60:.0f} min")


# --- the run folder ----------------------------------------------------------------------------------------


def claim_dir(out: Path, config: ReproduceConfig, force: bool) -> None:
    """Make ``out`` this run's folder: refuse another run's folder (naming the differing fields) unless ``force``."""
    stored = out / CONFIG_FILE
    if stored.is_file():
        import json

        old = json.loads(stored.read_text(encoding="utf-8")).get("config", {})
        new = config.to_dict()
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ and not force:
            detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ)
            raise SelmaError(f"{out} holds a reproduce run with other settings ({detail}); its results are never "
                             "overwritten silently. Use another --out, the same settings, or --force to start it again")
        if differ:
            for name in OWNED:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise SelmaError(f"{out} is not empty and holds no {CONFIG_FILE}: it is not a reproduce run folder. "
                         "Choose an empty or new --out, or pass --force to use it anyway (nothing in it is removed)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stored, {"config": config.to_dict()})


def check_models(config: ReproduceConfig) -> None:
    for name in ("model", "weak_model"):
        path = Path(getattr(config, name))
        if not (path / "model_index.json").is_file():
            raise invalid(name, str(path), "a diffusers world-sd folder (with model_index.json)",
                          "train one with 'selma world train-sd', or pass --model / --weak-model")
    if not (Path(config.clip) / "open_clip_config.json").is_file():
        raise invalid("clip", config.clip, "an open_clip folder (with open_clip_config.json)", "the world CLIP by default")


# --- the run -------------------------------------------------------------------------------------------------


def run_reproduce(out: str | os.PathLike[str], config: ReproduceConfig, *, force: bool = False,
                  threads: int | None = None, say: Say = print) -> dict[str, Any]:
    """Run (or resume) every stage into ``out``; return the table (also written to ``out/table.json``)."""
    import torch

    out = Path(out).resolve()
    if threads is not None:
        check_int("threads", threads, 1, 1024)
    check_models(config)
    claim_dir(out, config, force)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        return _run_stages(out, config, say)
    finally:
        torch.set_num_threads(previous)


def _run_stages(out: Path, config: ReproduceConfig, say: Say) -> dict[str, Any]:
    from . import reproduce_eval as ev
    from . import reproduce_report as rep
    from . import reproduce_stages as st

    say(format_plan(plan(config)))
    timings: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = round(now - t, 2)
        t = now

    say(f"[1/{STAGES}] prompts: {config.n_train} training and {config.n_eval} held-out per skill -> {out / 'prompts'}")
    prompts = st.write_all_prompts(out, config)
    lap("prompts")
    say(f"[2/{STAGES}] render training data with the strong and the weak model -> {out / 'data'}")
    data = st.render_training_data(out, config, prompts, say)
    lap("render")
    say(f"[3/{STAGES}] CLIP filter (best {config.filter_top_k} of {config.train_images} per prompt) and judge the data")
    quality = st.filter_and_judge(out, config, data, prompts, say)
    lap("filter")
    work = {"train_images_rendered": sum(r["rendered"] for r in data["reports"].values()), "trained": 0, "merged": 0}
    say(f"[4/{STAGES}] train LoRAs ({config.train_steps} steps each; joint {config.train_steps * len(config.skills)})")
    loras = st.train_all(out, config, data, say, work)
    lap("train")
    say(f"[5/{STAGES}] merge experts ({', '.join(MERGE_ARMS)}; nofilter and weak2strong with linear)")
    loras.update(st.merge_all(out, config, loras, say, work))
    lap("merge")
    say(f"[6/{STAGES}] evaluate {len(arms(config))} arms on {len(config.skills) * config.n_eval} held-out prompts")
    results = ev.evaluate_arms(out, config, prompts, loras, arms(config), say)
    work["eval_images_rendered"] = results["rendered"]
    lap("evaluate")
    meta = {"models": {"strong": {"path": config.model, "sha256": data["model_hash"]["strong"]},
                       "weak": {"path": config.weak_model, "sha256": data["model_hash"]["weak"]},
                       "clip": {"path": config.clip, "model_key": results["clip_model"]}},
            "plan": plan(config), "timings_s": timings, "work": work}
    table = rep.write_outputs(out, config, results, quality, meta, say)
    say(rep.summary(table))
    return table


# --- the command ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="the run folder (resumable; another run's folder is refused)")
    parser.add_argument("--quick", action="store_true", help="the same arms at small sizes (< 15 min on 2 CPU cores)")
    parser.add_argument("--model", default=None, help="strong world-sd folder (default: the shipped world-sd)")
    parser.add_argument("--weak-model", default=None, help="weak world-sd folder (default: the shipped world-sd-small)")
    parser.add_argument("--clip", default=None, help="open_clip folder scoring the images (default: the world CLIP)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--force", action="store_true", help="start again in a folder holding a run with other settings")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override any config field, e.g. --set n_eval=50 --set cfg=3 (repeatable)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")


def config_from_args(args: argparse.Namespace) -> ReproduceConfig:
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    for name, value in (("model", args.model), ("weak_model", args.weak_model), ("clip", args.clip)):
        if value:
            overrides[name] = value
    types = {f.name: f.type for f in fields(ReproduceConfig)}
    for item in args.set:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise invalid("--set", item, [f"{k}=VALUE" for k in types])
        overrides[key] = _parse(key, text.strip(), str(types[key]))
    return ReproduceConfig(**overrides)


def _parse(key: str, text: str, kind: str) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise invalid(key, text, f"an {kind}") from None
    if kind.startswith("tuple"):
        return tuple(s.strip() for s in text.split(",") if s.strip())
    return text


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.plan:
        print(format_plan(plan(config)))
        return 0
    start = time.perf_counter()
    run_reproduce(args.out, config, force=args.force, threads=args.threads)
    print(f"done in {time.perf_counter() - start:.0f} s: {Path(args.out).resolve() / 'table.md'}")
    return 0


__all__ = ["MERGE_ARMS", "QUICK", "SKILLS", "ReproduceConfig", "arms", "claim_dir", "plan", "quick_config",
           "run_reproduce"]
