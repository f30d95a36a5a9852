"""``selma demo``: the whole pipeline on embedded defaults — offline, on CPU, no weights needed.

Each stage writes its artefact under ``--out`` and the next stage reads it from disk, exactly as
the nodes and the other commands do. Stages that are not built yet are listed as such, never
faked. Re-running continues where the last run stopped (models are kept, prompt files extended).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from .errors import invalid
from .fsio import atomic_write_json, sha256_file

DEFAULT_SKILLS = ("countbench", "spatial")
#: Stages the demo cannot run yet, shown so nobody mistakes the demo's end for the pipeline's.
PENDING_STAGES: tuple[str, ...] = ()
STEPS = 7  # stage count printed as [i/STEPS]
TRAIN_STEPS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="selma-demo", help="folder for every artefact (default: %(default)s)")
    parser.add_argument("--skills", default=",".join(DEFAULT_SKILLS), help="comma-separated skill ids (default: %(default)s)")
    parser.add_argument("--count", type=int, default=24, help="prompts per skill (default: %(default)s)")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="images per prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)


def run_demo(out: Path, skills: list[str], count: int, seed: int, say=print, *, images_per_prompt: int = 2,
             steps: int = 8) -> dict:
    """Run every built stage in order; return the manifest that is also written to out/demo.json."""
    from .prompts.generate import PromptConfig, generate_prompts
    from .render.config import RenderConfig
    from .skills import resolve_skill
    from .tiny_models import write_tiny_models

    if count < 1:
        raise invalid("count", count, "an integer >= 1")
    render_config = RenderConfig(images_per_prompt=images_per_prompt, steps=steps, batch_size=8, seed=seed,
                                 scheduler="euler")  # checked before any time is spent
    resolved = [resolve_skill(s) for s in skills]
    start = time.perf_counter()
    say(f"[1/{STEPS}] tiny models → {out / 'models'}")
    models = write_tiny_models(out / "models", seed=seed, log=lambda m: say("      " + m))
    prompts = {}
    for i, skill in enumerate(resolved, 1):
        path = out / "prompts" / f"{skill.id}.jsonl"
        say(f"[2/{STEPS}] prompts for {skill.id} ({i}/{len(resolved)}) → {path}")
        report = generate_prompts(PromptConfig(skill=skill, count=count, seed=seed), path)
        say(f"      {report.status}: {report.existing + report.written} prompts, {report.requests} requests, "
            f"rejected {sum(report.rejected.values())}")
        prompts[skill.id] = str(path)
    datasets = _render(out, models["sd1"], prompts, render_config, say)
    filtered = _filter(models["clip"], datasets, say)
    experts = _train(out, models["sd1"], datasets, seed, say)
    merged = _merge(out, experts, say)
    report = _evaluate(out, models, prompts, experts, merged, render_config, seed, say)
    manifest = {"models": {k: str(v) for k, v in models.items()}, "prompts": prompts, "datasets": datasets,
                "filter": filtered, "experts": experts, "merged": merged, "report": report,
                "pending_stages": list(PENDING_STAGES),
                "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out / "demo.json", manifest)
    return manifest


def _render(out: Path, sd1: Path, prompts: dict[str, str], config, say) -> dict[str, str]:
    """Stage 2 with the tiny SD-1.x folder: one dataset per skill (resumes what exists)."""
    from .models.config import ModelConfig
    from .models.loader import load_pipeline
    from .render.render import render_dataset

    datasets = {}
    with load_pipeline(ModelConfig(path=str(sd1))) as lp:
        for skill, path in prompts.items():
            target = out / "datasets" / skill
            say(f"[3/{STEPS}] render {skill} → {target}")
            report = render_dataset(lp, path, target, config)
            say(f"      {report.status}: {report.rendered} rendered, {report.existing} already there, "
                f"{report.images_per_s:.1f} images/s")
            datasets[skill] = str(target)
    return datasets


def _filter(clip: Path, datasets: dict[str, str], say) -> dict[str, dict]:
    """Stage 3 with the tiny open_clip model: keep the best image of each prompt."""
    from .filter import FilterConfig, ScorerConfig, filter_dataset, load_scorer

    results = {}
    with load_scorer(ScorerConfig(path=str(clip))) as scorer:
        for skill, path in datasets.items():
            say(f"[4/{STEPS}] CLIP-filter {skill} (best of each prompt)")
            report = filter_dataset(path, scorer, FilterConfig(mode="top_k_per_prompt", top_k=1, dedup_cosine=0))
            say(f"      kept {report.kept} of {report.total}; histogram {report.histogram}")
            results[skill] = {"kept": report.kept, "total": report.total, "histogram": report.histogram}
    return results


def _train(out: Path, sd1: Path, datasets: dict[str, str], seed: int, say) -> dict[str, str]:
    """Stage 4: one small LoRA expert per skill on the kept images (finished experts are kept on re-runs)."""
    from .models.config import ModelConfig
    from .train import TrainConfig, train_experts

    config = TrainConfig(rank=8, alpha=8, steps=TRAIN_STEPS, batch_size=4, grad_accum=1, resolution=64,
                         checkpoint_every=10, seed=seed, lr=1e-3)
    say(f"[5/{STEPS}] train {len(datasets)} experts ({TRAIN_STEPS} steps each) → {out / 'experts'}")
    results = train_experts(ModelConfig(path=str(sd1)), list(datasets.values()), out / "experts", config,
                            names=list(datasets), resume=True, overwrite=True)  # retrained only if its data changed
    for r in results:
        state = "already trained" if r.skipped else f"final loss {r.final_loss:.4f}, {r.samples_per_s:.1f} samples/s"
        say(f"      {r.name}: {r.samples} images, {state}")
    return {r.name: str(r.path) for r in results}


def _merge(out: Path, experts: dict[str, str], say) -> dict:
    """Stage 5: the experts merged into one LoRA (SELMA's 1/N weights; exact ``linear``), with its error report."""
    from .merge import MergeConfig, merge_files

    target = out / "merged" / "merged-linear.safetensors"
    say(f"[6/{STEPS}] merge {len(experts)} experts (linear, weights 1/N) → {target}")
    if target.exists() and _merged_from(target) == {sha256_file(p) for p in experts.values()}:
        say("      already merged from these experts")
        return {"path": str(target)}
    report = merge_files(list(experts.values()), target, MergeConfig(method="linear"), overwrite=True)
    say(f"      rank {report.rank}, relative error {report.error:.1e} (exact up to float rounding)")
    return {"path": str(target), "rank": report.rank, "error": report.error}


def _merged_from(path: Path) -> set[str]:
    from safetensors import safe_open

    from .lora.format import provenance

    with safe_open(str(path), framework="pt") as f:
        return {src.get("sha256", "") for src in provenance(f.metadata() or {}).get("sources", [])}


def _evaluate(out: Path, models: dict, prompts: dict[str, str], experts: dict[str, str], merged: dict, render_config,
              seed: int, say) -> str:
    """Stage 6: base vs each expert vs the merge on held-out prompts (same seeds), CLIP score, report."""
    from .eval import EvalConfig, PromptSpec, evaluate, next_run_dir
    from .filter import ScorerConfig
    from .models.config import ModelConfig

    target = next_run_dir(out, "report")
    say(f"[7/{STEPS}] evaluate base, {len(experts)} experts and the merge on held-out prompts → {target}")
    spec = PromptSpec(heldout_skills=tuple(prompts), heldout_count=4, heldout_seed=seed + 1000,
                      train_prompts=tuple(prompts.values()))
    config = EvalConfig(render=replace(render_config, images_per_prompt=1), resamples=500)
    report = evaluate(ModelConfig(path=str(models["sd1"])), [*experts.values(), merged["path"]], spec,
                      ScorerConfig(path=str(models["clip"])), target, config)
    say("      " + report.table.replace("\n", "\n      "))
    return str(Path(report.out_dir) / "index.html")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    manifest = run_demo(out, skills, args.count, args.seed, images_per_prompt=args.images_per_prompt,
                        steps=args.steps)
    print(f"\nDone in {manifest['seconds']} s. Artefacts under {out}:")
    for name, path in manifest["models"].items():
        print(f"  model    {name:<12} {path}")
    for skill, path in manifest["prompts"].items():
        print(f"  prompts  {skill:<12} {path}")
    for skill, path in manifest["datasets"].items():
        kept = manifest["filter"][skill]
        print(f"  dataset  {skill:<12} {path}  (kept {kept['kept']}/{kept['total']} after CLIP filtering)")
    for skill, path in manifest["experts"].items():
        print(f"  expert   {skill:<12} {path}")
    print(f"  merged                {manifest['merged']['path']}")
    print(f"  report                {manifest['report']}")
    print(f"  manifest              {out / 'demo.json'}")
    if PENDING_STAGES:
        print("Not built yet (later stages): " + ", ".join(PENDING_STAGES))
    return 0
