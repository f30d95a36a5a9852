"""``selma world``: the shapes world from a shell.

    selma world prompts --skill world_counting --n 1000 --seed 0 --split train --out work/counting/prompts.jsonl
    selma world render --prompts work/counting/prompts.jsonl --out work/counting/data --resolution 64
    selma world render --skill world_spatial --n 100 --out work/spatial/data      # prompts drawn on the fly
    selma world judge --dataset work/counting/data                                   # exact DSG-style scores
    selma world skills --out my_skills/        # world skills as SELMA skill files (SELMA_SKILLS_DIR)
    selma world train-clip --out work/world-clip --steps 1000 --seed 0 --threads 1   # a small CLIP of the world
    selma world eval-clip --model work/world-clip --n 100   # held-out minimal pairs, agreement with the judge
    selma world train-sd --out work/world-sd --preset large --seed 0 --threads 2   # the shipped world-sd (~1 h)
    selma world train-sd --out work/world-sd-small --preset small --seed 0 \
        --threads 1 --steps 1500   # the weak model (the same VAE recipe and seed; --vae-from DIR skips retraining it)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any

from ..errors import SelmaError
from ..fsio import atomic_write_json
from .clip_eval import WORLD_CLIP, evaluate_clip, format_table
from .clip_train import MODEL_PRESETS, ClipTrainConfig, train_clip
from .dataset import WorldRenderConfig, judge_dataset, render_world_dataset
from .sd_model import SD_PRESETS
from .sd_train import SdTrainConfig, train_world_sd
from .skills import SPLITS, WORLD_SKILLS, world_prompts, write_prompts, write_skill_files


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    sub = parser.add_subparsers(dest="world_command", metavar="ACTION")
    sub.required = True
    p = sub.add_parser("prompts", help="write a world skill's prompts.jsonl (offline, seeded, split)")
    _prompt_args(p, required=True)
    p.add_argument("--out", required=True, help="prompts.jsonl to write (never overwritten)")
    r = sub.add_parser("render", help="render world prompts into a SELMA dataset folder (ground truth)")
    r.add_argument("--prompts", help="prompts.jsonl (rows with id, skill, prompt); or use --skill/--n")
    _prompt_args(r, required=False)
    r.add_argument("--out", required=True, help="dataset folder to create or complete")
    r.add_argument("--resolution", type=int, default=64, help="image side in pixels (the judge is exact at 32 and 64)")
    r.add_argument("--images-per-prompt", type=int, default=1, metavar="K")
    r.add_argument("--render-seed", type=int, default=0, help="seed of the scenes drawn for the prompts")
    j = sub.add_parser("judge", help="score every image of a dataset folder against its caption")
    j.add_argument("--dataset", required=True)
    j.add_argument("--out", help="also write the summary as JSON here")
    s = sub.add_parser("skills", help="write the world skills as SELMA skill files into a folder")
    s.add_argument("--out", required=True, help="skills folder (use it as SELMA_SKILLS_DIR)")
    t = sub.add_parser("train-clip", help="train a small open_clip CLIP on world scenes (CPU, seeded)")
    t.add_argument("--out", required=True, help="open_clip folder to write (never overwritten without --force)")
    t.add_argument("--steps", type=int, default=ClipTrainConfig.steps)
    t.add_argument("--seed", type=int, default=ClipTrainConfig.seed)
    t.add_argument("--threads", type=int, default=ClipTrainConfig.threads, help="torch CPU threads")
    t.add_argument("--batch-size", type=int, default=ClipTrainConfig.batch_size)
    t.add_argument("--hard-negatives", type=int, default=ClipTrainConfig.hard_negatives,
                   help="minimal-pair captions (one fact changed) per image")
    t.add_argument("--lr", type=float, default=ClipTrainConfig.lr)
    t.add_argument("--preset", default=ClipTrainConfig.preset, choices=list(MODEL_PRESETS))
    t.add_argument("--warmup", type=int, default=ClipTrainConfig.warmup, help="linear warm-up steps")
    t.add_argument("--init-from", default="", metavar="DIR", help="a world CLIP folder to continue from (second stage)")
    t.add_argument("--relation-share", type=float, default=ClipTrainConfig.relation_share,
                   help="share of spatial scenes, their relation altered first (0: all skills evenly)")
    t.add_argument("--eval-n", type=int, default=100, help="held-out prompts per measure after training (0: skip)")
    t.add_argument("--force", action="store_true", help="replace a world CLIP folder this command made")
    _train_sd_args(sub)
    e = sub.add_parser("eval-clip", help="score a CLIP on held-out minimal pairs and against the judge")
    e.add_argument("--model", default=str(WORLD_CLIP), help="open_clip folder (default: the shipped world CLIP)")
    e.add_argument("--n", type=int, default=100, help="held-out prompts per measure")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="also write the result as JSON here")


def _train_sd_args(sub: Any) -> None:
    d = sub.add_parser("train-sd", help="train the world's small Stable Diffusion (VAE, then UNet; CPU, seeded, resumable)")
    d.add_argument("--out", required=True, help="diffusers folder to write (never overwritten without --force)")
    for f in fields(SdTrainConfig):  # one flag per field, of the field's default's type
        default = getattr(SdTrainConfig, f.name)
        kind = {"choices": list(SD_PRESETS)} if f.name == "preset" else {"type": type(default)}
        d.add_argument("--" + f.name.replace("_", "-"), default=default, **kind)
    d.add_argument("--vae-from", default="", metavar="DIR", help="reuse this world-sd folder's VAE (skip stage 1)")
    d.add_argument("--force", action="store_true", help="replace a world-sd folder this command made")


def sd_config(args: argparse.Namespace) -> SdTrainConfig:
    """The :class:`SdTrainConfig` that parsed ``train-sd`` flags say."""
    return SdTrainConfig(**{f.name: getattr(args, f.name) for f in fields(SdTrainConfig)})


def _prompt_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--skill", required=required, choices=WORLD_SKILLS.names())
    p.add_argument("--n", type=int, default=100, help="number of distinct prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train", choices=SPLITS, help="train, heldout or all")


def run(args: argparse.Namespace) -> int:
    cmd = args.world_command
    if cmd == "prompts":
        rows = world_prompts(args.skill, args.n, args.seed, args.split)
        print(f"{len(rows)} prompts -> {write_prompts(rows, args.out)}")
    elif cmd == "render":
        if bool(args.prompts) == bool(args.skill):
            raise SelmaError("give either --prompts FILE or --skill NAME (with --n), not both and not neither")
        prompts = args.prompts or world_prompts(args.skill, args.n, args.seed, args.split)
        config = WorldRenderConfig(resolution=args.resolution, images_per_prompt=args.images_per_prompt,
                                   seed=args.render_seed)
        report = render_world_dataset(prompts, args.out, config)
        print(json.dumps(report.to_dict(), indent=2))
    elif cmd == "judge":
        summary = judge_dataset(args.dataset)
        if args.out:
            atomic_write_json(args.out, summary)
        print(json.dumps(summary, indent=2))
    elif cmd == "skills":
        for path in write_skill_files(args.out):
            print(path)
    elif cmd == "train-clip":
        _train_clip(args)
    elif cmd == "train-sd":
        config = sd_config(args)
        out = train_world_sd(config, args.out, vae_from=args.vae_from or None, force=args.force,
                             say=lambda m: print(m, flush=True))
        print(f"{out}: written")
    elif cmd == "eval-clip":
        result = evaluate_clip(args.model, args.n, args.seed)
        if args.out:
            atomic_write_json(args.out, result)
        print(format_table(result))
    else:  # argparse only offers the actions above
        raise SelmaError(f"unknown world action {cmd!r}")
    return 0


def _train_clip(args: argparse.Namespace) -> None:
    import torch

    config = ClipTrainConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed, threads=args.threads,
                             lr=args.lr, hard_negatives=args.hard_negatives, preset=args.preset, warmup=args.warmup,
                             init_from=args.init_from, relation_share=args.relation_share)
    record = train_clip(config, args.out, force=args.force, log=lambda m: print(m, flush=True))
    print(f"{args.out}: {config.steps} steps in {record['seconds']:.0f} s ({record['steps_per_second']:.3f} steps/s), "
          f"final loss {record['final_loss']:.4f}")
    if args.eval_n:
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            print(format_table(evaluate_clip(args.out, args.eval_n, args.seed)))
        finally:
            torch.set_num_threads(threads)
