"""``selma prompts``: stage 1 from a shell.

    selma prompts --skill spatial --count 1000 --llm offline --seed 0 --out work/spatial/prompts.jsonl
    selma prompts --skill my_skill.toml --count 500 --llm openai --llm-url http://127.0.0.1:11434/v1 \\
        --llm-model llama3.1:8b --out prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..llm.base import LLMError
from .generate import PromptConfig, backend_names, generate_prompts, report_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = PromptConfig.__dataclass_fields__
    parser.add_argument("--skill", required=True, help="skill id (see `selma skills`) or a .json/.toml skill file")
    parser.add_argument("--count", type=int, default=d["count"].default, help="prompts the output file should hold (default %(default)s)")
    parser.add_argument("--llm", default="offline", choices=backend_names(), help="prompt writer (default: offline, no model)")
    parser.add_argument("--llm-url", default=None, help="openai: base URL of an OpenAI-compatible server")
    parser.add_argument("--llm-model", default=None, help="openai: model name; transformers: model folder")
    parser.add_argument("--temperature", type=float, default=d["temperature"].default)
    parser.add_argument("--max-tokens", type=int, default=d["max_tokens"].default)
    parser.add_argument("--dedup-threshold", type=float, default=d["dedup_threshold"].default,
                        help="drop a prompt whose ROUGE-L F with any earlier one is above this (SELMA: 0.8)")
    parser.add_argument("--seed", type=int, default=d["seed"].default)
    parser.add_argument("--examples-per-request", type=int, default=d["examples_per_request"].default)
    parser.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="prompts asked for per request")
    parser.add_argument("--max-requests", type=int, default=0, help="request budget (default 0: automatic, from --count)")
    parser.add_argument("--min-words", type=int, default=d["min_words"].default)
    parser.add_argument("--block", action="append", default=[], metavar="TERM",
                        help="reject prompts containing TERM (whole words, any case) or matching re:REGEX; repeatable")
    parser.add_argument("--blocklist", action="append", default=[], metavar="FILE",
                        help="file of blocklist entries, one a line (# comments); repeatable")
    parser.add_argument("--eval-prompts", default=None, metavar="FILE",
                        help="evaluation prompts (.txt/.jsonl/.json) that generated prompts must not nearly copy")
    parser.add_argument("--eval-threshold", type=float, default=d["eval_threshold"].default)
    parser.add_argument("--skills-dir", default=None, help="folder of user skill files")
    parser.add_argument("--out", required=True, help="prompts.jsonl to create or extend (resumable)")


def _blocklist(args: argparse.Namespace) -> tuple[str, ...]:
    entries = list(args.block)
    for file in args.blocklist:
        for line in Path(file).read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append(line.strip())
    return tuple(entries)


def _chat_backend(args: argparse.Namespace):  # -> ChatBackend | None
    if args.llm == "offline":
        return None
    from ..llm.backends import ChatConfig, make_chat_backend

    kwargs: dict[str, object] = {"backend": args.llm, "temperature": args.temperature, "max_tokens": args.max_tokens}
    if args.llm_url:
        kwargs["base_url"] = args.llm_url
    if args.llm_model:
        kwargs["model_path" if args.llm == "transformers" else "model"] = args.llm_model
    return make_chat_backend(ChatConfig(**kwargs))


def run(args: argparse.Namespace) -> int:
    config = PromptConfig(
        skill=args.skill, count=args.count, llm=args.llm, seed=args.seed,
        examples_per_request=args.examples_per_request, batch_size=args.batch_size,
        dedup_threshold=args.dedup_threshold, temperature=args.temperature, max_tokens=args.max_tokens,
        max_requests=args.max_requests, min_words=args.min_words, blocklist=_blocklist(args),
        eval_prompts=args.eval_prompts, eval_threshold=args.eval_threshold, skills_dir=args.skills_dir,
    )
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if tty:
            print(f"\r{done}/{total} prompts", end="", file=sys.stderr, flush=True)

    backend = _chat_backend(args)
    try:
        report = generate_prompts(config, args.out, backend=backend, progress=progress)
    except LLMError as e:
        print(f"\nselma prompts: error: {e} (the prompts written so far are kept; re-run to continue)", file=sys.stderr)
        return 1
    finally:
        if backend is not None:
            backend.close()
        if tty:
            print(file=sys.stderr)
    summary = {k: v for k, v in report.to_dict().items() if k != "config"}
    print(json.dumps(summary, indent=2))
    print(f"report: {report_path(args.out)}", file=sys.stderr)
    return 0
