"""``selma render``: stage 2 from a shell, on one device or sharded with ``accelerate launch``.

    selma render --model models/sd15.safetensors --prompts work/spatial/prompts.jsonl --out work/spatial/data \
        --images-per-prompt 4 --batch-size 8 --steps 25 --cfg 7.5 --scheduler dpmpp_2m_karras --seed 0
    accelerate launch --num_processes 2 -m selma_backend render --model ... --prompts ... --out ...

Sharded runs: rank r renders every world-th image; rank 0 alone writes metadata.jsonl and dataset.json.
Two CPU processes on one machine (no GPU): ``accelerate launch --multi_gpu --num_processes 2 ...``
(accelerate's ``--cpu`` starts a single process unless MPI is configured).

Re-running the same command finishes an interrupted run (only missing images are rendered).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .config import RenderConfig
from .schedulers import SCHEDULERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RenderConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--model", required=True, help="diffusers folder or single-file checkpoint (.safetensors)")
    parser.add_argument("--prompts", required=True, help="prompts.jsonl (rows with id, skill, prompt)")
    parser.add_argument("--out", required=True, help="dataset folder to create or complete")
    parser.add_argument("--images-per-prompt", type=int, default=defaults.images_per_prompt, metavar="K")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, metavar="B",
                        help="images per pipeline call (prompts mixed); halved on out-of-memory")
    parser.add_argument("--steps", type=int, default=defaults.steps, metavar="N")
    parser.add_argument("--cfg", type=float, default=defaults.cfg, metavar="C", help="guidance scale")
    parser.add_argument("--width", type=int, default=defaults.width, metavar="W", help="0: the model's default")
    parser.add_argument("--height", type=int, default=defaults.height, metavar="H", help="0: the model's default")
    parser.add_argument("--scheduler", default=defaults.scheduler, choices=SCHEDULERS.names(), metavar="NAME",
                        help="one of: " + ", ".join(f"{n} ({SCHEDULERS.get(n).label})" for n in SCHEDULERS))
    parser.add_argument("--negative", default=defaults.negative, metavar="TEXT", help="negative prompt")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="S", help="run seed")
    parser.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp16, bf16, fp32")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps, cpu")
    parser.add_argument("--allow-mixed", action="store_true",
                        help="add images to a dataset made with other settings (recorded in dataset.json)")


def config_from_args(args: argparse.Namespace) -> RenderConfig:
    return RenderConfig(images_per_prompt=args.images_per_prompt, batch_size=args.batch_size, steps=args.steps,
                        cfg=args.cfg, width=args.width, height=args.height, scheduler=args.scheduler,
                        negative=args.negative, seed=args.seed)


def load_model(args: argparse.Namespace) -> Any:
    """The LoadedPipeline for ``--model`` (a seam: tests may replace it)."""
    from ..models.config import ModelConfig
    from ..models.loader import load_pipeline

    return load_pipeline(ModelConfig(path=args.model, dtype=args.dtype, device=args.device))


def run(args: argparse.Namespace) -> int:
    from .render import load_prompts, render_dataset
    from .shard import shard_from_environment

    config = config_from_args(args)  # check before spending: bad flags fail before the model loads
    load_prompts(args.prompts)
    shard = shard_from_environment(args.device)  # under accelerate: sets this rank's device before loading
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\r[rank {shard.rank}] {done}/{total} images", end="", file=sys.stderr, flush=True)

    def warn(message: str) -> None:
        print(f"\nselma render: warning: {message}", file=sys.stderr)

    with load_model(args) as lp:
        lp.pipe.set_progress_bar_config(disable=True)  # our own progress line instead of one bar per batch
        report = render_dataset(lp, args.prompts, args.out, config, progress=progress, warn=warn,
                                allow_mixed=args.allow_mixed, shard=shard)
    if tty:
        print(file=sys.stderr)
    if shard.is_main:
        print(json.dumps({k: v for k, v in report.to_dict().items() if k != "config"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m selma_backend.render.cli``: the same as ``selma render``."""
    from ..errors import SelmaError

    parser = argparse.ArgumentParser(prog="selma render")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except SelmaError as e:
        print(f"selma render: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
