"""``selma train``: stage 4 from a shell, on one device or data-parallel under ``accelerate launch``.

    selma train --model models/sd15.safetensors --data work/spatial/data work/count/data --out work/experts
    selma train ... --resume            # continue after a crash or Ctrl-C (same command, plus --resume)
    accelerate launch --num_processes 2 -m selma_backend train --model ... --data ... --out ...

Writes ``OUT/<skill>.safetensors`` per dataset (kohya layout; ``--format peft`` for diffusers/PEFT)
and keeps each run's checkpoints, loss.csv, loss.png and validation grids in ``OUT/<skill>.train/``.
``--batch-size`` is the global batch of one micro-step (split across processes); the effective batch
is ``batch-size x grad-accum``. Two CPU processes without a GPU: ``accelerate launch --multi_gpu
--num_processes 2`` (gloo).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

from .config import (
    AUTOCAST,
    FLIP_MODES,
    LR_SCHEDULES,
    MEMORY_FORMATS,
    MIXED_PRECISION,
    OPTIMIZERS,
    PRESETS,
    SCORE_WEIGHTING,
    TrainConfig,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--model", required=True, help="diffusers folder or single-file checkpoint (.safetensors)")
    parser.add_argument("--data", required=True, nargs="+", metavar="D", help="dataset folder(s), one expert each")
    parser.add_argument("--out", required=True, help="folder for the expert files")
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--alpha", type=float, default=d.alpha)
    parser.add_argument("--dropout", type=float, default=d.dropout)
    parser.add_argument("--preset", default=d.preset, choices=PRESETS.names())
    parser.add_argument("--text-encoder", action="store_true", help="also train LoRA on the text encoder(s)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 5000; SDXL 10000)")
    parser.add_argument("--batch-size", type=int, default=None, help="global micro-batch (default 8; SDXL 4)")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per step (default 8)")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--lr-schedule", default=d.lr_schedule, choices=LR_SCHEDULES)
    parser.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    parser.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping")
    parser.add_argument("--min-snr-gamma", type=float, default=d.min_snr_gamma, help="0: off; 5 is the paper's value")
    parser.add_argument("--noise-offset", type=float, default=d.noise_offset)
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (SDXL 1024)")
    parser.add_argument("--no-buckets", action="store_true", help="crop every image square")
    parser.add_argument("--flip", default=d.flip, choices=FLIP_MODES, help="skill: each skill's flip policy")
    parser.add_argument("--score-weighting", default=d.score_weighting, choices=SCORE_WEIGHTING)
    parser.add_argument("--mixed-precision", default=d.mixed_precision, choices=MIXED_PRECISION)
    parser.add_argument("--autocast", default=d.autocast, choices=AUTOCAST,
                        help="with fp16/bf16: on = the UNet under autocast (norms in fp32), off = in that dtype "
                             "throughout; auto = off with bf16, on with fp16")
    parser.add_argument("--memory-format", default=d.memory_format, choices=MEMORY_FORMATS,
                        help="the UNet's activation layout while training")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    parser.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    parser.add_argument("--validation-every", type=int, default=d.validation_every)
    parser.add_argument("--validation-prompt", action="append", default=[], metavar="TEXT")
    parser.add_argument("--validation-steps", type=int, default=d.validation_steps)
    parser.add_argument("--format", default=d.export_format, choices=("kohya", "peft"), dest="export_format")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoints; skip finished experts")
    parser.add_argument("--overwrite", action="store_true", help="replace existing expert files and runs")
    parser.add_argument("--dtype", default="auto", help="dtype the model loads in: auto, fp16, bf16, fp32")
    parser.add_argument("--device", default="auto", help="auto, cuda, mps, cpu")
    parser.add_argument("--cache-dir", default=None, help="latent/text cache (default $SELMA_CACHE_DIR/train)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(text_encoder_lora=args.text_encoder, buckets=not args.no_buckets,
                  validation_prompts=tuple(args.validation_prompt))
    return TrainConfig(**values)


def run(args: argparse.Namespace) -> int:
    from ..models.config import ModelConfig
    from ..render.shard import shard_from_environment
    from .run import train_experts

    config = config_from_args(args)  # bad flags fail before the model loads
    model = ModelConfig(path=args.model, dtype=args.dtype, device=args.device)
    shard = shard_from_environment(args.device)
    tty = sys.stderr.isatty()

    def on_log(info: dict) -> None:
        if tty and shard.is_main:
            print(f"\r[{info['expert']}] step {info['step']}/{info['steps']} loss {info['loss']:.4f} lr {info['lr']:.2e}",
                  end="", file=sys.stderr, flush=True)

    stop = _stop_on_signals()
    results = train_experts(model, args.data, args.out, config, resume=args.resume, overwrite=args.overwrite,
                            cache_root=args.cache_dir, shard=shard, on_log=on_log, should_stop=lambda: stop["requested"])
    if shard.is_main:
        if tty:
            print(file=sys.stderr)
        print(json.dumps([r.to_dict() for r in results], indent=2))
    return 130 if any(r.stopped for r in results) else 0


def _stop_on_signals() -> dict[str, bool]:
    """Ctrl-C / SIGTERM: finish the current step, write a checkpoint, exit (``--resume`` continues)."""
    import signal

    state = {"requested": False}

    def handler(signum: int, _frame: object) -> None:
        if state["requested"]:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        state["requested"] = True
        print(f"\nselma train: signal {signum}: writing a checkpoint, then stopping", file=sys.stderr)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return state
