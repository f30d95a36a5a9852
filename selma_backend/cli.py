"""The ``selma`` command: every stage of the pipeline from a shell (and under ``accelerate launch``).

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their command runs, so ``selma --help``
stays fast and a missing optional package breaks only the command that needs it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from . import __version__
from .errors import SelmaError

# name -> (module relative to this package, one-line help). Append; never rename (scripts use them).
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-models": (".tiny_models", "write tiny random-weight models (SD1, SDXL, mini SD1.5 file, CLIP, LLM)"),
    "skills": (".skills_cli", "list the built-in and user skills"),
    "prompts": (".prompts.cli", "stage 1: generate prompts for a skill and deduplicate them"),
    "demo": (".demo", "run the whole pipeline on embedded defaults, offline"),
    "render": (".render.cli", "stage 2: render a dataset from prompts (batched, resumable, shardable)"),
    "filter": (".filter.cli", "stage 3: CLIP-score a dataset and choose what to keep"),
    "eval": (".eval.cli", "stage 6: render base and LoRAs with the same seeds, score them, report with CIs"),
    "train": (".train.cli", "stage 4: train one LoRA expert per skill dataset (resumable, data-parallel)"),
    "merge": (".merge.cli", "stage 5: merge LoRA experts into one file (linear, svd, ties, dare) and report its error"),
    "world": (".world.cli", "the shapes world: ground-truth prompts, images and an exact judge, on a CPU"),
    "reproduce": (".world.reproduce", "SELMA end to end in the shapes world: every arm, bootstrap CIs, claims"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selma", description="SELMA: skill-specific LoRA experts from auto-generated data.")
    parser.add_argument("--version", action="version", version=f"selma {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        # Arguments are added lazily in main() for the chosen command only.
    return parser


def _load(module: str):
    return importlib.import_module(module, __package__)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the command first, then let its module add its own arguments.
    name = next((a for a in argv if not a.startswith("-")), None)
    if name in COMMANDS:
        module = _load(COMMANDS[name][0])
        sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        module.add_arguments(sub_action.choices[name])
    args = parser.parse_args(argv)
    module = _load(args._module)
    try:
        return int(module.run(args) or 0)
    except SelmaError as e:
        print(f"selma {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
