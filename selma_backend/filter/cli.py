"""``selma filter``: stage 3 from a shell — CLIP-score a dataset and choose what to keep.

    selma filter --data work/spatial/data --clip models/clip/ViT-B-32 --threshold 0.28
    selma filter --data D --clip models/clip/vit_b32.safetensors --arch ViT-B-32 --keep-fraction 0.5
    selma filter --data D --clip C --top-k-per-prompt 1 --floor 0.2
    selma filter --data D --clip C --per-skill spatial=0.3,countbench=0.25 [--threshold 0.28 for other skills]

Embeddings are cached in <data>/.selma_cache, so running again with another threshold takes seconds.
Writes clip_score, keep (and drop_reason) into metadata.jsonl; a person's review is never changed.
Summary and score histogram: <data>/.selma_report/.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import invalid
from .config import DEVICES, DTYPES, FilterConfig, ScorerConfig, parse_per_skill


def add_arguments(parser: argparse.ArgumentParser) -> None:
    fdef, sdef = FilterConfig(threshold=0.0), ScorerConfig(path="-")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument("--data", required=True, help="dataset folder (metadata.jsonl + images)")
    parser.add_argument("--clip", required=True, help="open_clip folder (open_clip_config.json + weights) or weight file")
    parser.add_argument("--arch", default="", help="open_clip architecture of a bare weight file, e.g. ViT-B-32")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--keep-fraction", type=float, metavar="F", help="keep the best F (0-1] of each skill")
    mode.add_argument("--top-k-per-prompt", type=int, metavar="K", help="keep the K best images of each prompt")
    mode.add_argument("--per-skill", metavar="S=T,...", help="thresholds per skill, e.g. spatial=0.3,countbench=0.25")
    parser.add_argument("--threshold", type=float, metavar="T",
                        help="keep cosine >= T (LAION: 0.28 with ViT-B/32); with --per-skill: the other skills' threshold")
    parser.add_argument("--floor", type=float, metavar="F", help="in any mode, drop scores below F")
    parser.add_argument("--min-pixel-std", type=float, default=fdef.min_pixel_std, metavar="S",
                        help=f"blank-image check: grey-level std below S (0-255) is blank (default {fdef.min_pixel_std})")
    parser.add_argument("--max-caption-tokens", type=int, default=fdef.max_caption_tokens, metavar="N",
                        help="drop captions longer than N tokens (0: the model's context, 75 for CLIP)")
    parser.add_argument("--dedup-cosine", type=float, default=fdef.dedup_cosine, metavar="C",
                        help=f"near-duplicate images: embedding cosine above C (0 disables; default {fdef.dedup_cosine})")
    parser.add_argument("--batch-size", type=int, default=sdef.batch_size, metavar="B", help="images per forward pass")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--dtype", default="auto", choices=DTYPES, help="auto: fp16 on cuda, fp32 elsewhere")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def config_from_args(args: argparse.Namespace) -> FilterConfig:
    common = {"floor": args.floor, "min_pixel_std": args.min_pixel_std, "max_caption_tokens": args.max_caption_tokens,
              "dedup_cosine": args.dedup_cosine, "threshold": args.threshold}
    if args.per_skill is not None:
        return FilterConfig(mode="per_skill", per_skill=parse_per_skill(args.per_skill, field="--per-skill"), **common)
    if args.keep_fraction is not None or args.top_k_per_prompt is not None:
        if args.threshold is not None:
            raise invalid("--threshold", args.threshold, "only with --per-skill or alone",
                          "use --floor for a minimum score in this mode")
        if args.keep_fraction is not None:
            return FilterConfig(mode="keep_fraction", keep_fraction=args.keep_fraction, **common)
        return FilterConfig(mode="top_k_per_prompt", top_k=args.top_k_per_prompt, **common)
    if args.threshold is None:
        raise invalid("mode", None, ["--threshold T", "--keep-fraction F", "--top-k-per-prompt K", "--per-skill S=T"],
                      "choose how to select, e.g. --threshold 0.28")
    return FilterConfig(mode="threshold", **common)


def run(args: argparse.Namespace) -> int:
    from .run import filter_dataset
    from .scorer import load_scorer

    config = config_from_args(args)  # check before spending: bad flags fail before the model loads
    scorer_config = ScorerConfig(path=args.clip, arch=args.arch, device=args.device, dtype=args.dtype,
                                 batch_size=args.batch_size)
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\r{done}/{total} images", end="", file=sys.stderr, flush=True)

    with load_scorer(scorer_config) as scorer:
        report = filter_dataset(args.data, scorer, config, progress=progress)
    if tty:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
        return 0
    print(f"{report.kept} kept, {report.dropped} dropped of {report.total} ({report.embedded} embedded, "
          f"{report.cached} from cache, {report.elapsed_s:.1f} s)")
    for skill, entry in report.per_skill.items():
        why = ", ".join(f"{k} {v}" for k, v in sorted(entry["dropped"].items())) or "none dropped"
        print(f"  {skill or '(no skill)'}: {entry['kept']}/{entry['total']} kept; {why}")
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(f"histogram: {report.histogram}\nsummary: {report.summary}")
    return 0
