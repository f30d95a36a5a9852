"""``selma eval``: stage 6 from a shell.

    selma eval --model models/checkpoints/sd15.safetensors --lora experts/countbench.safetensors \\
        --lora merged.safetensors --prompts eval/dsg-1k.csv --clip models/clip/ViT-B-32 --out work/eval/run1
    selma eval --model sd15 --lora countbench.safetensors --heldout-skill countbench \\
        --train-prompts work/countbench/prompts.jsonl --clip models/clip/ViT-B-32 \\
        --vqa-url http://127.0.0.1:11434/v1 --vqa-model qwen2.5vl:7b --out work/eval/run2

The API key of the vision endpoint comes from SELMA_LLM_API_KEY / OPENAI_API_KEY (or the variable
named by --vqa-key-env), never from the command line.
"""

from __future__ import annotations

import argparse
import sys

from ..filter.config import ScorerConfig
from ..models.config import DEVICES, DTYPES, ModelConfig
from ..render.config import RenderConfig
from ..render.schedulers import scheduler_names
from .config import EvalConfig
from .prompts import PromptSpec
from .run import evaluate

_R = RenderConfig.__dataclass_fields__
_E = EvalConfig.__dataclass_fields__
_P = PromptSpec.__dataclass_fields__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint (.safetensors) or diffusers folder")
    parser.add_argument("--lora", action="append", default=[], metavar="L",
                        help="a LoRA .safetensors (expert, merged, any); repeatable")
    parser.add_argument("--prompts", action="append", default=[], metavar="P",
                        help="evaluation prompts: .jsonl/.json/.csv/.tsv/.txt (e.g. DSG or TIFA lists); repeatable")
    parser.add_argument("--prompt-column", default="", help="the prompts' column when not prompt/text/caption")
    parser.add_argument("--skill", default="", help="skill of file prompts without a skill column (default: file name)")
    parser.add_argument("--heldout-skill", action="append", default=[], metavar="SKILL",
                        help="write held-out prompts for SKILL (offline writer); repeatable; needs --train-prompts")
    parser.add_argument("--heldout-count", type=int, default=_P["heldout_count"].default)
    parser.add_argument("--heldout-seed", type=int, default=_P["heldout_seed"].default,
                        help="must differ from the training prompts' seed (default %(default)s)")
    parser.add_argument("--train-prompts", action="append", default=[], metavar="FILE",
                        help="training prompts; evaluation prompts that nearly copy one are left out; repeatable")
    parser.add_argument("--max-per-skill", type=int, default=0, help="evaluate the first N prompts of each skill")
    parser.add_argument("--clip", required=True, help="open_clip folder or weight file (with --clip-arch)")
    parser.add_argument("--clip-arch", default="", help="open_clip architecture of a bare weight file")
    parser.add_argument("--vqa-url", default="", help="OpenAI-compatible vision endpoint (enables the DSG score)")
    parser.add_argument("--vqa-model", default="", help="vision-language model name on that endpoint")
    parser.add_argument("--question-model", default="", help="model writing the questions (default: --vqa-model)")
    parser.add_argument("--vqa-key-env", default="", help="environment variable holding the endpoint's API key")
    parser.add_argument("--vqa-workers", type=int, default=_E["vqa_workers"].default)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--cfg", type=float, default=_R["cfg"].default)
    parser.add_argument("--width", type=int, default=0, help="0: the model's default")
    parser.add_argument("--height", type=int, default=0, help="0: the model's default")
    parser.add_argument("--scheduler", default=_R["scheduler"].default, choices=scheduler_names())
    parser.add_argument("--negative", default="")
    parser.add_argument("--seed", type=int, default=0, help="render seed: every model gets the same noise per image")
    parser.add_argument("--samples", type=int, default=1, help="images per prompt and model")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-scale", type=float, default=_E["lora_scale"].default)
    parser.add_argument("--resamples", type=int, default=_E["resamples"].default, help="bootstrap resamples")
    parser.add_argument("--grid-prompts", type=int, default=_E["grid_prompts"].default, help="prompts per skill in grids")
    parser.add_argument("--dtype", default="auto", choices=DTYPES)
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--out", required=True, help="report folder (must be new or empty, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a report already in --out")


def configs(args: argparse.Namespace) -> tuple[ModelConfig, PromptSpec, ScorerConfig, EvalConfig]:
    """The four configs the arguments describe (each validates itself)."""
    render = RenderConfig(images_per_prompt=args.samples, batch_size=args.batch_size, steps=args.steps, cfg=args.cfg,
                          width=args.width, height=args.height, scheduler=args.scheduler, negative=args.negative,
                          seed=args.seed)
    config = EvalConfig(render=render, lora_scale=args.lora_scale, resamples=args.resamples,
                        grid_prompts=args.grid_prompts, vqa_url=args.vqa_url, vqa_model=args.vqa_model,
                        question_model=args.question_model, vqa_key_env=args.vqa_key_env,
                        vqa_workers=args.vqa_workers)
    spec = PromptSpec(files=tuple(args.prompts), heldout_skills=tuple(args.heldout_skill),
                      heldout_count=args.heldout_count, heldout_seed=args.heldout_seed,
                      train_prompts=tuple(args.train_prompts), skill=args.skill, prompt_column=args.prompt_column,
                      max_per_skill=args.max_per_skill)
    model = ModelConfig(path=args.model, dtype=args.dtype, device=args.device)
    return model, spec, ScorerConfig(path=args.clip, arch=args.clip_arch, device=args.device), config


def run(args: argparse.Namespace) -> int:
    model, spec, clip, config = configs(args)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\r{done}/{total}", end="", file=sys.stderr, flush=True)

    report = evaluate(model, args.lora, spec, clip, args.out, config, overwrite=args.overwrite, progress=progress)
    if tty:
        print(file=sys.stderr)
    print(report.table)
    if report.contaminated:
        print(f"{report.contaminated} prompt(s) nearly copy training prompts and were left out (see the report)",
              file=sys.stderr)
    print(f"report: {report.out_dir}/index.html", file=sys.stderr)
    return 0
