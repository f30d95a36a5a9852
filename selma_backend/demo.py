"""``selma demo``: the whole pipeline on embedded defaults — offline, on CPU, nothing to download.

By default it runs on the models shipped in the pack: the miniature world's Stable Diffusion
(``world-sd``, 64 px) renders, trains and is evaluated, the world CLIP (``world-clip``) filters and
scores, and the world's skills (``world_counting``, ``world_spatial``) get their prompts from the world
generator (the offline prompt writer). The base model and the merged experts are then compared on
held-out world prompts by the world's exact judge, with a before/after grid (:mod:`.demo_world`).
``--tiny`` runs the same stages on random tiny models instead (seconds; only the plumbing is shown).

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

DEFAULT_SKILLS = ("world_counting", "world_spatial")
TINY_SKILLS = ("countbench", "spatial")  # --tiny without --skills
#: Stages the demo cannot run yet, shown so nobody mistakes the demo's end for the pipeline's.
PENDING_STAGES: tuple[str, ...] = ()
STEPS = 8  # stage count printed as [i/STEPS]
#: Settings per mode: the world model's real-use values (64 px, as `selma world reproduce`), the tiny ones' quick ones.
#: ``noise_offset``: world-sd was trained with one (``selma world train-sd``), so its LoRAs are too.
WORLD = {"steps": 20, "cfg": 7.5, "scheduler": "dpmpp_2m", "train_steps": 100, "train_batch": 8, "rank": 8,
         "noise_offset": 0.1}
TINY = {"steps": 8, "cfg": 7.5, "scheduler": "euler", "train_steps": 20, "train_batch": 4, "rank": 8,
        "noise_offset": 0.0}
TRAIN_STEPS = TINY["train_steps"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="selma-demo", help="folder for every artefact (default: %(default)s)")
    parser.add_argument("--skills", default=None,
                        help=f"comma-separated skill ids (default: {','.join(DEFAULT_SKILLS)}; --tiny: {','.join(TINY_SKILLS)})")
    parser.add_argument("--count", type=int, default=24, help="prompts per skill (default: %(default)s)")
    parser.add_argument("--images-per-prompt", type=int, default=2, help="images per prompt (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"denoising steps (default: {WORLD['steps']}; --tiny: {TINY['steps']})")
    parser.add_argument("--train-steps", type=int, default=None,
                        help=f"LoRA steps per expert (default: {WORLD['train_steps']}; --tiny: {TINY['train_steps']})")
    parser.add_argument("--eval-count", type=int, default=8, help="held-out prompts per skill for evaluation (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="diffusers folder to run on (default: the shipped world-sd)")
    parser.add_argument("--clip", default="", help="open_clip folder to filter and score with (default: the shipped world-clip)")
    parser.add_argument("--tiny", action="store_true",
                        help="random tiny models instead of the world's (seconds; shows the plumbing, not an effect)")


def run_demo(out: Path, skills: list[str] | None, count: int, seed: int, say=print, *, images_per_prompt: int = 2,
             steps: int | None = None, train_steps: int | None = None, eval_count: int = 8, tiny: bool = False,
             model: str | Path = "", clip: str | Path = "") -> dict:
    """Run every built stage in order; return the manifest that is also written to out/demo.json."""
    from .prompts.generate import PromptConfig, generate_prompts
    from .render.config import RenderConfig
    from .skills import resolve_skill

    mode = TINY if tiny else WORLD
    for name, value in (("count", count), ("eval_count", eval_count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise invalid(name, value, "an integer >= 1")
    render_config = RenderConfig(images_per_prompt=images_per_prompt, steps=steps or mode["steps"], batch_size=8,
                                 seed=seed, cfg=mode["cfg"], scheduler=mode["scheduler"])  # checked before any time is spent
    resolved = [resolve_skill(s) for s in (skills or (TINY_SKILLS if tiny else DEFAULT_SKILLS))]
    start = time.perf_counter()
    models = _models(out, tiny, model, clip, seed, say)
    prompts = {}
    for i, skill in enumerate(resolved, 1):
        path = out / "prompts" / f"{skill.id}.jsonl"
        say(f"[2/{STEPS}] prompts for {skill.id} ({i}/{len(resolved)}) → {path}")
        report = generate_prompts(PromptConfig(skill=skill, count=count, seed=seed), path)
        say(f"      {report.status}: {report.existing + report.written} prompts, {report.requests} requests, "
            f"rejected {sum(report.rejected.values())}")
        prompts[skill.id] = str(path)
    datasets = _render(out, models["sd"], prompts, render_config, say)
    filtered = _filter(models["clip"], datasets, say)
    experts = _train(out, models["sd"], datasets, seed, say, steps=train_steps or mode["train_steps"],
                     batch=mode["train_batch"], rank=mode["rank"], noise_offset=mode["noise_offset"])
    merged = _merge(out, experts, say)
    evaluation = _evaluate(out, models, prompts, experts, merged, render_config, seed, eval_count, say)
    judged = _judge(out, evaluation, list(prompts), say)
    manifest = {"mode": "tiny" if tiny else "world", "models": {k: str(v) for k, v in models.items()},
                "prompts": prompts, "datasets": datasets, "filter": filtered, "experts": experts, "merged": merged,
                "report": str(Path(evaluation["out_dir"]) / "index.html"), "clip_scores": evaluation["clip"],
                **judged, "pending_stages": list(PENDING_STAGES), "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out / "demo.json", manifest)
    return manifest


def _models(out: Path, tiny: bool, model: str | Path, clip: str | Path, seed: int, say) -> dict[str, Path]:
    """Stage 1: the shipped world models (or ``--model``/``--clip``), or freshly written tiny ones.
    ``sd`` renders, trains and is evaluated; ``clip`` filters and scores."""
    if tiny:
        from .tiny_models import write_tiny_models

        say(f"[1/{STEPS}] tiny models → {out / 'models'}")
        models = write_tiny_models(out / "models", seed=seed, log=lambda m: say("      " + m))
        return {"sd": Path(model) if model else models["sd1"], "clip": Path(clip) if clip else models["clip"],
                **{k: v for k, v in models.items() if k not in ("sd", "clip")}}
    from .world.clip_eval import WORLD_CLIP
    from .world.sd_model import WORLD_SD

    sd, scorer = Path(model or WORLD_SD), Path(clip or WORLD_CLIP)
    if not (sd / "model_index.json").is_file():
        raise invalid("model", str(sd), "a diffusers folder (model_index.json); the pack ships world-sd there",
                      "reinstall the pack, pass --model DIR, or run --tiny")
    if not (scorer / "open_clip_config.json").is_file():
        raise invalid("clip", str(scorer), "an open_clip folder (open_clip_config.json)", "pass --clip DIR")
    say(f"[1/{STEPS}] world models: {sd.name} renders, trains and is evaluated; {scorer.name} filters and scores")
    return {"sd": sd, "clip": scorer}


def _render(out: Path, sd: Path, prompts: dict[str, str], config, say) -> dict[str, str]:
    """Stage 2: one dataset per skill (resumes what exists)."""
    from .models.config import ModelConfig
    from .models.loader import load_pipeline
    from .render.render import render_dataset

    datasets = {}
    with load_pipeline(ModelConfig(path=str(sd))) as lp:
        for skill, path in prompts.items():
            target = out / "datasets" / skill
            say(f"[3/{STEPS}] render {skill} → {target}")
            report = render_dataset(lp, path, target, config)
            say(f"      {report.status}: {report.rendered} rendered, {report.existing} already there, "
                f"{report.images_per_s:.1f} images/s")
            datasets[skill] = str(target)
    return datasets


def _filter(clip: Path, datasets: dict[str, str], say) -> dict[str, dict]:
    """Stage 3: keep the best image of each prompt by CLIP score."""
    from .filter import FilterConfig, ScorerConfig, filter_dataset, load_scorer

    results = {}
    with load_scorer(ScorerConfig(path=str(clip))) as scorer:
        for skill, path in datasets.items():
            say(f"[4/{STEPS}] CLIP-filter {skill} (best of each prompt)")
            report = filter_dataset(path, scorer, FilterConfig(mode="top_k_per_prompt", top_k=1, dedup_cosine=0))
            say(f"      kept {report.kept} of {report.total}; histogram {report.histogram}")
            results[skill] = {"kept": report.kept, "total": report.total, "histogram": report.histogram}
    return results


def _train(out: Path, sd: Path, datasets: dict[str, str], seed: int, say, *, steps: int, batch: int,
           rank: int, noise_offset: float) -> dict[str, str]:
    """Stage 4: one small LoRA expert per skill on the kept images (finished experts are kept on re-runs)."""
    from .models.config import ModelConfig
    from .train import TrainConfig, train_experts

    config = TrainConfig(rank=rank, alpha=rank, steps=steps, batch_size=batch, grad_accum=1, resolution=64,
                         checkpoint_every=max(10, steps // 2), seed=seed, lr=1e-3, noise_offset=noise_offset)
    say(f"[5/{STEPS}] train {len(datasets)} experts ({steps} steps each) → {out / 'experts'}")
    results = train_experts(ModelConfig(path=str(sd)), list(datasets.values()), out / "experts", config,
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
              seed: int, eval_count: int, say) -> dict:
    """Stage 6: base vs each expert vs the merge on held-out prompts (same seeds), CLIP score, report.
    World skills: the world's held-out prompts (no training prompt shares their meaning); others: new
    offline prompts of another seed, kept apart from the training prompts."""
    from .demo_world import heldout_rows
    from .eval import EvalConfig, PromptSpec, evaluate, next_run_dir
    from .filter import ScorerConfig
    from .models.config import ModelConfig
    from .world.skills import WORLD_SKILLS

    target = next_run_dir(out, "report")
    say(f"[7/{STEPS}] evaluate base, {len(experts)} experts and the merge on held-out prompts → {target}")
    if all(s in WORLD_SKILLS for s in prompts):
        spec = heldout_rows(list(prompts), eval_count, seed)
    else:
        spec = PromptSpec(heldout_skills=tuple(prompts), heldout_count=eval_count, heldout_seed=seed + 1000,
                          train_prompts=tuple(prompts.values()))
    config = EvalConfig(render=replace(render_config, images_per_prompt=1), resamples=500)
    report = evaluate(ModelConfig(path=str(models["sd"])), [*experts.values(), merged["path"]], spec,
                      ScorerConfig(path=str(models["clip"])), target, config)
    say("      " + report.table.replace("\n", "\n      "))
    clip = {m: round(float(cell["mean"]), 4) for m, cell in report.summary.get("clip", {}).get("overall", {}).items()}
    return {"out_dir": report.out_dir, "clip": clip}


def _judge(out: Path, evaluation: dict, skills: list[str], say) -> dict:
    """Stage 8: the world judge on every evaluation image; base vs merged accuracy and a before/after grid."""
    from .demo_world import before_after_grid, format_table, judge_report
    from .world.skills import WORLD_SKILLS

    if not all(s in WORLD_SKILLS for s in skills):
        say(f"[8/{STEPS}] world judge: skipped (it reads world prompts only; these skills are not all world skills)")
        return {"judge": None, "grid": None}
    judged = judge_report(evaluation["out_dir"])
    grid = before_after_grid(judged, out / "before-after.png")
    base, merged = judged["models"][judged["base"]], judged["models"][judged["merged"]]
    say(f"[8/{STEPS}] world judge on held-out prompts: base {base['score']:.3f} → merged {merged['score']:.3f} "
        f"(all questions right: {base['all_correct']:.0%} → {merged['all_correct']:.0%}); grid → {grid}")
    say("      " + format_table(judged).replace("\n", "\n      "))
    return {"judge": {"base": base, "merged": merged, "models": judged["models"]}, "grid": str(grid)}


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    skills = [s.strip() for s in args.skills.split(",") if s.strip()] if args.skills else None
    manifest = run_demo(out, skills, args.count, args.seed, images_per_prompt=args.images_per_prompt,
                        steps=args.steps, train_steps=args.train_steps, eval_count=args.eval_count, tiny=args.tiny,
                        model=args.model, clip=args.clip)
    print(f"\nDone in {manifest['seconds']} s. Artefacts under {out}:")
    for name, path in manifest["models"].items():
        print(f"  model    {name:<14} {path}")
    for skill, path in manifest["prompts"].items():
        print(f"  prompts  {skill:<14} {path}")
    for skill, path in manifest["datasets"].items():
        kept = manifest["filter"][skill]
        print(f"  dataset  {skill:<14} {path}  (kept {kept['kept']}/{kept['total']} after CLIP filtering)")
    for skill, path in manifest["experts"].items():
        print(f"  expert   {skill:<14} {path}")
    print(f"  merged                  {manifest['merged']['path']}")
    print(f"  report                  {manifest['report']}")
    if manifest["judge"]:
        base, merged = manifest["judge"]["base"], manifest["judge"]["merged"]
        print(f"  before/after grid       {manifest['grid']}")
        print(f"  world judge (held-out)  base {base['score']:.3f} → merged {merged['score']:.3f}")
    print(f"  manifest                {out / 'demo.json'}")
    if PENDING_STAGES:
        print("Not built yet (later stages): " + ", ".join(PENDING_STAGES))
    return 0
