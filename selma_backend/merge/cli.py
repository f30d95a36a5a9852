"""``selma merge``: stage 5 from a shell -- merge LoRA experts into one file and report its error.

    selma merge counting.safetensors spatial.safetensors --method svd --rank 64 --out merged.safetensors
    selma merge a.safetensors b.safetensors c.safetensors --method linear --weights 0.5,0.25,0.25 --out m.safetensors
    selma merge a.safetensors b.safetensors --method ties --density 0.3 --rank 32 --block-weights mid=0.5 --out m.safetensors
    selma merge a.safetensors b.safetensors --method svd --rank 32 --search-weights --model models/sd15 \\
        --heldout counting=heldout/counting.jsonl,spatial=heldout/spatial.jsonl --clip models/clip/ViT-B-32 --out m.safetensors

Experts may be kohya, PEFT/diffusers or ComfyUI-native files (--base names the base model when a
PEFT/ComfyUI file's metadata does not). The output is kohya layout; an existing --out is refused
unless --overwrite. The report (per-module and overall relative error, rank, file size) is printed
and written into the file's metadata (selma.provenance).

--search-weights first searches the expert weights on held-out prompts (each skill's prompts rendered
with the merged LoRA on --model and scored by CLIP), then merges with the best weights found.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import invalid
from ..lora.names import BASE_VERSIONS
from .config import DENSITY_METHODS, DTYPES, SEED_METHODS, MergeConfig, parse_block_weights, parse_weights
from .math import MERGE_METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("experts", nargs="+", metavar="FILE", help="LoRA .safetensors files to merge, in order")
    parser.add_argument("--method", default="svd", choices=MERGE_METHODS.names(),
                        help="linear: exact (rank = sum of ranks); svd: best rank-R approximation; "
                        "ties/dare_linear/dare_ties/magnitude_prune: task arithmetic, then rank R (default svd)")
    parser.add_argument("--weights", default="", metavar="W1,W2,...", help="one weight per expert (default 1/N each)")
    parser.add_argument("--rank", type=int, metavar="R", help="target rank (default: the largest expert rank); not for linear")
    parser.add_argument("--density", type=float, metavar="D",
                        help=f"fraction of each delta kept, (0, 1] (for {', '.join(DENSITY_METHODS)}; default 0.5)")
    parser.add_argument("--block-weights", default="", metavar="B=W,...", help="per-block multipliers, e.g. down=1,mid=0.5,up=1,te=0")
    parser.add_argument("--seed", type=int, metavar="S", help=f"random drops of {', '.join(SEED_METHODS)} (default 0)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="stored dtype (auto: the first expert's)")
    parser.add_argument("--strict-keys", action="store_true", help="refuse experts whose modules differ")
    parser.add_argument("--base", choices=BASE_VERSIONS, help="base model of PEFT/ComfyUI-layout experts without metadata")
    parser.add_argument("--out", required=True, metavar="FILE", help="merged LoRA file to write (kohya layout)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    search = parser.add_argument_group("data-driven weights (--search-weights)")
    search.add_argument("--search-weights", action="store_true", help="search the expert weights on held-out prompts first")
    search.add_argument("--model", metavar="PATH", help="the base checkpoint or diffusers folder to render with")
    search.add_argument("--heldout", metavar="SKILL=FILE,...", help="held-out prompts per skill (JSONL with 'prompt', or one per line)")
    search.add_argument("--clip", metavar="PATH", help="open_clip folder or weight file that scores the renders")
    search.add_argument("--clip-arch", default="", metavar="ARCH", help="open_clip architecture of a bare weight file")
    search.add_argument("--budget", type=int, default=6, metavar="K", help="weight candidates to render (default 6)")
    search.add_argument("--grid", type=int, default=4, metavar="G", help="simplex grid resolution: weights are multiples of 1/G")
    search.add_argument("--steps", type=int, default=20, metavar="N", help="denoising steps per render")
    search.add_argument("--size", type=int, default=0, metavar="PX", help="render size (0: the model's default)")
    search.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")


def config_from_args(args: argparse.Namespace) -> MergeConfig:
    """Flags -> MergeConfig; flags a method does not use are errors, not silently ignored."""
    if args.density is not None and args.method not in DENSITY_METHODS:
        raise invalid("--density", args.density, f"only with --method {'/'.join(DENSITY_METHODS)}")
    if args.seed is not None and args.method not in SEED_METHODS:
        raise invalid("--seed", args.seed, f"only with --method {'/'.join(SEED_METHODS)}")
    return MergeConfig(method=args.method, weights=parse_weights(args.weights, "--weights"), rank=args.rank,
                       density=0.5 if args.density is None else args.density,
                       block_weights=parse_block_weights(args.block_weights, "--block-weights"),
                       seed=0 if args.seed is None else args.seed, dtype=args.dtype, strict_keys=args.strict_keys)


def run(args: argparse.Namespace) -> int:
    from .files import merge_files

    config = config_from_args(args)
    config.expert_weights(len(args.experts))
    if args.search_weights:
        config = _search(args, config)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\r{done}/{total} modules", end="", file=sys.stderr, flush=True)

    report = merge_files(args.experts, args.out, config, overwrite=args.overwrite, base=args.base, progress=progress)
    if tty:
        print(file=sys.stderr)
    print(json.dumps(report.to_dict(), indent=2, sort_keys=True) if args.json else report.text())
    return 0


def _search(args: argparse.Namespace, config: MergeConfig) -> MergeConfig:
    from dataclasses import replace

    from .search import SearchConfig, parse_heldout, search_weights_cli

    if config.weights is not None:
        raise invalid("--weights", args.weights, "none with --search-weights", "the search chooses the weights")
    missing = [f for f in ("model", "heldout", "clip") if not getattr(args, f)]
    if missing:
        raise invalid("--search-weights", True, "with --model, --heldout and --clip",
                      f"missing: {', '.join('--' + m for m in missing)}")
    search = SearchConfig(budget=args.budget, grid=args.grid, steps=args.steps, size=args.size)
    result = search_weights_cli(args.experts, config, search, model=args.model, heldout=parse_heldout(args.heldout),
                                clip=args.clip, clip_arch=args.clip_arch, device=args.device, base=args.base)
    print(result.text(), file=sys.stderr)
    return replace(config, weights=tuple(result.best))
