"""Every CPU benchmark in one run: each stage ours against the reference method, side by side.

Each stage runs its ``bench/bench_<stage>.py`` module in this process, on the same machine and the
same model for both arms, alternating reference and ours ``--repeats`` times (at least 3) and
reporting the MEDIAN of each arm. ``ratio`` is always ours_speed / reference_speed. Stages:

- ``dedup``  -- ROUGE-L filtering of 1,000 candidates vs rouge_score pair by pair, with ``same_output``;
- ``render`` -- images/s, batched ``render_dataset`` vs one prompt per pipeline call (reduced SD 1.5 layout);
- ``clip``   -- images/s scored, batched ``embed_files`` vs one image at a time;
- ``train``  -- samples/s, cached ``train_experts`` vs a loop re-encoding VAE and text every step;
- ``merge``  -- 5 experts x rank 128, our ``svd`` vs PEFT ``add_weighted_adapter(svd)``, equal error checked;
- ``e2e``    -- ``selma demo`` (tiny models, small settings) wall seconds; it has no reference arm.

``--quick`` targets about 10 minutes on 2 cores; ``--tiny`` is the smallest size (tests, seconds);
neither is the full run, which is for quieter machines. Each stage's entry gets its CPU ``target``
(the ratio ``--quick`` should reach) and ``meets_target``. The JSON is rewritten after every stage,
so an interrupted run keeps what it measured.

    .venv/bin/python bench/run.py --quick --json perf.json
    .venv/bin/python bench/run.py --tiny --stages dedup --json /tmp/d.json
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from selma_backend.fsio import atomic_write_json  # noqa: E402

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no weight-loading bars between the figures

STAGES = ("dedup", "render", "clip", "train", "merge", "e2e")
#: CPU targets for --quick: the ratio ours/reference each stage should reach (dedup also identical output).
TARGETS = {"dedup": 200.0, "render": 1.3, "clip": 3.0, "train": 1.5, "merge": 3.0}
MIN_REPEATS = 3


def size_of(args: argparse.Namespace) -> str:
    return "tiny" if args.tiny else "quick" if args.quick else "full"


def bench_stage(name: str, size: str, repeats: int) -> dict[str, Any]:
    """Run ``bench_<name>.run`` at ``size`` with ``repeats`` alternating rounds; its result dict."""
    try:
        module = importlib.import_module(f"bench_{name}")
        fn = module.run
    except Exception as exc:  # any import failure is reported; the other stages still run
        return {"error": f"stage not available: {type(exc).__name__}: {exc}"}
    kwargs: dict[str, Any] = {}
    params = inspect.signature(fn).parameters
    if "tiny" in params:
        kwargs["tiny"] = size == "tiny"
    if name == "dedup" and size != "tiny":
        kwargs["n"] = 1000  # the workload, also with --quick
    if "repeats" in params:
        return fn(size != "full", repeats=repeats, **kwargs)
    return repeat_calls(lambda: fn(size != "full", **kwargs), repeats)


def repeat_calls(call: Callable[[], dict[str, Any]], repeats: int) -> dict[str, Any]:
    """For a module without ``repeats`` (each call measures reference and ours once): call it
    ``repeats`` times and report the median of each arm; the other fields come from the last call."""
    results = [call() for _ in range(repeats)]
    out = dict(results[-1])
    out["ours"] = statistics.median(r["ours"] for r in results)
    out["reference"] = statistics.median(r["reference"] for r in results)
    out["ours_runs"] = [r["ours"] for r in results]
    out["reference_runs"] = [r["reference"] for r in results]
    if any(isinstance(r.get("same_output"), bool) for r in results):
        out["same_output"] = all(r.get("same_output") is True for r in results)
    out["repeats"] = repeats
    return out


E2E_SETTINGS = {  # selma demo: skills, prompts per skill, images per prompt, denoising steps
    "tiny": (["countbench"], 2, 1, 2),
    "quick": (["countbench", "spatial"], 8, 2, 4),
    "full": (["countbench", "spatial"], 24, 2, 8),
}


def e2e_stage(size: str, repeats: int) -> dict[str, Any]:
    """Wall seconds of ``selma demo`` (selma_backend.demo.run_demo) into a fresh temp folder; median of runs."""
    from selma_backend.demo import run_demo

    skills, count, per_prompt, steps = E2E_SETTINGS[size]
    runs = repeats if size == "full" else 1  # no A/B to compare; one run keeps --quick near 10 minutes
    seconds = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="selma-bench-e2e-") as tmp:
            t0 = time.perf_counter()
            manifest = run_demo(Path(tmp) / "demo", skills, count, 0, say=lambda _m: None,
                                images_per_prompt=per_prompt, steps=steps, tiny=True, eval_count=4)
            seconds.append(time.perf_counter() - t0)
    wall = statistics.median(seconds)
    print(f"e2e  selma demo ({', '.join(skills)}; {count} prompts a skill, {per_prompt} images a prompt, "
          f"{steps} steps): {wall:.1f} s wall (median of {runs})")
    return {"ours": wall, "reference": None, "unit": "s", "ratio": None, "runs_s": seconds, "repeats": runs,
            "skills": skills, "prompts_per_skill": count, "images_per_prompt": per_prompt, "steps": steps,
            "demo_artefacts": [k for k, v in manifest.items() if v and k not in ("seconds", "pending_stages")],
            "pending_stages": manifest.get("pending_stages", []),
            "note": "no reference arm: wall seconds of the whole small pipeline (selma demo on the tiny models); "
                    "lower is better"}


def finish_entry(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """Add ``ratio`` (recomputed: ours/reference), ``target`` and ``meets_target`` to a stage's figures."""
    if "error" in entry:
        return {"ours": None, "reference": None, "unit": None, "ratio": None, "target": TARGETS.get(name),
                "meets_target": None, **entry}
    if entry.get("reference"):
        entry["ratio"] = entry["ours"] / entry["reference"]
    target = TARGETS.get(name)
    entry["target"] = target
    if target is None or entry.get("ratio") is None:
        entry["meets_target"] = None
    else:
        same = entry.get("same_output")
        entry["meets_target"] = entry["ratio"] >= target and same is not False
    return entry


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads_default": torch.get_num_threads(), "git_commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_before": [round(x, 2) for x in os.getloadavg()]}


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def table(stages: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'stage':<7} {'ours':>10} {'reference':>10} {'unit':<10} {'ratio':>8} {'target':>7} {'meets':>6}  note",
             "-" * 78]
    for name, e in stages.items():
        ratio = "-" if e.get("ratio") is None else f"{e['ratio']:.2f}x"
        target = "-" if e.get("target") is None else f">={e['target']:g}x"
        note = e.get("error") or ""
        if isinstance(e.get("same_output"), bool):
            note = f"same_output={e['same_output']}"
        if name == "e2e" and "error" not in e:
            note = "wall time, no reference arm"
        lines.append(f"{name:<7} {_fmt(e.get('ours')):>10} {_fmt(e.get('reference')):>10} {e.get('unit') or '-':<10} "
                     f"{ratio:>8} {target:>7} {_fmt(e.get('meets_target')):>6}  {note}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    size = size_of(args)
    threads = torch.get_num_threads()
    result: dict[str, Any] = {"stages": {}, "machine": machine_info(), "quick": size == "quick", "size": size,
                              "repeats": args.repeats, "statistic": "median", "targets_for": "--quick on a CPU",
                              "seconds": None}
    print(f"bench/run.py: {size}, stages {' '.join(args.stages)}, median of {args.repeats}; "
          f"load average before {result['machine']['loadavg_before']}", flush=True)
    start = time.perf_counter()
    for name in args.stages:
        print(f"\n=== {name} ===", flush=True)
        torch.set_num_threads(threads)  # a stage may change it (render uses 1): each starts from the default
        t0, load = time.perf_counter(), os.getloadavg()[0]
        try:
            entry = e2e_stage(size, args.repeats) if name == "e2e" else bench_stage(name, size, args.repeats)
        except Exception as exc:  # report the failure, keep the other stages
            traceback.print_exc()
            entry = {"error": f"failed: {type(exc).__name__}: {exc}"}
        entry = finish_entry(name, entry)
        entry["stage_seconds"] = round(time.perf_counter() - t0, 1)
        entry["loadavg_1min_before_after"] = [round(load, 2), round(os.getloadavg()[0], 2)]
        print(f"--> {table(result['stages'] | {name: entry}).splitlines()[-1]}  [{entry['stage_seconds']} s, "
              f"load {entry['loadavg_1min_before_after'][0]} -> {entry['loadavg_1min_before_after'][1]}]", flush=True)
        result["stages"][name] = entry
        result["seconds"] = round(time.perf_counter() - start, 1)
        if args.json:
            atomic_write_json(args.json, result)
    torch.set_num_threads(threads)
    result["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        atomic_write_json(args.json, result)
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="reduced sizes: about 10 minutes on 2 cores")
    mode.add_argument("--tiny", action="store_true", help="smallest sizes (tests): seconds a stage")
    parser.add_argument("--json", type=Path, help="write the figures here (rewritten after every stage)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
                        help=f"stages to run, in this order (default: all of {' '.join(STAGES)})")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS,
                        help=f"alternating rounds per stage, median reported (at least {MIN_REPEATS})")
    args = parser.parse_args(argv)
    if args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be at least {MIN_REPEATS} (a median of fewer says little); got {args.repeats}")
    return args


def main(argv: list[str] | None = None) -> int:
    """0 when every requested stage produced figures, 1 when one failed or was not available."""
    args = parse_args(argv)
    result = run(args)
    print("\n" + table(result["stages"]))
    m = result["machine"]
    print(f"{m['cpus']} CPUs ({m['cpu']}), torch {m['torch']}; load average before {m['loadavg_before']}, "
          f"after {m['loadavg_after']}; {result['seconds']} s in all" + (f"; JSON: {args.json}" if args.json else ""))
    return 1 if any("error" in e for e in result["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
