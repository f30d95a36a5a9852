"""``selma demo``: the whole pipeline on embedded defaults — offline, on CPU, no weights needed.

Each stage writes its artefact under ``--out`` and the next stage reads it from disk, exactly as
the nodes and the other commands do. Stages that are not built yet are listed as such, never
faked. Re-running continues where the last run stopped (models are kept, prompt files extended).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .errors import invalid
from .fsio import atomic_write_json

DEFAULT_SKILLS = ("countbench", "spatial")
#: Stages the demo cannot run yet, shown so nobody mistakes the demo's end for the pipeline's.
PENDING_STAGES = ("render (S2)", "filter (S3)", "train (S4)", "merge (S5)", "evaluate (S6)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="selma-demo", help="folder for every artefact (default: %(default)s)")
    parser.add_argument("--skills", default=",".join(DEFAULT_SKILLS), help="comma-separated skill ids (default: %(default)s)")
    parser.add_argument("--count", type=int, default=200, help="prompts per skill (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)


def run_demo(out: Path, skills: list[str], count: int, seed: int, say=print) -> dict:
    """Run every built stage in order; return the manifest that is also written to out/demo.json."""
    from .prompts.generate import PromptConfig, generate_prompts
    from .skills import resolve_skill
    from .tiny_models import write_tiny_models

    if count < 1:
        raise invalid("count", count, "an integer >= 1")
    resolved = [resolve_skill(s) for s in skills]  # check every skill before spending time
    start = time.perf_counter()
    say(f"[1/2] tiny models → {out / 'models'}")
    models = write_tiny_models(out / "models", seed=seed, log=lambda m: say("      " + m))
    prompts = {}
    for i, skill in enumerate(resolved, 1):
        path = out / "prompts" / f"{skill.id}.jsonl"
        say(f"[2/2] prompts for {skill.id} ({i}/{len(resolved)}) → {path}")
        report = generate_prompts(PromptConfig(skill=skill, count=count, seed=seed), path)
        say(f"      {report.status}: {report.existing + report.written} prompts, {report.requests} requests, "
            f"rejected {sum(report.rejected.values())}")
        prompts[skill.id] = str(path)
    manifest = {"models": {k: str(v) for k, v in models.items()}, "prompts": prompts,
                "pending_stages": list(PENDING_STAGES), "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(out / "demo.json", manifest)
    return manifest


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    skills = [s.strip() for s in args.skills.split(",") if s.strip()]
    manifest = run_demo(out, skills, args.count, args.seed)
    print(f"\nDone in {manifest['seconds']} s. Artefacts under {out}:")
    for name, path in manifest["models"].items():
        print(f"  model    {name:<12} {path}")
    for skill, path in manifest["prompts"].items():
        print(f"  prompts  {skill:<12} {path}")
    print(f"  manifest              {out / 'demo.json'}")
    print("Not built yet (later stages): " + ", ".join(PENDING_STAGES))
    return 0
