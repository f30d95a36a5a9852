"""One prepared GPU benchmark for a lent H200: rendering, training and CLIP scoring, under 8 minutes.

Full-size SD 1.5 and SDXL architectures and open_clip ViT-L/14 with random weights (speed does not
depend on the weights; nothing is downloaded), measured by the existing scripts, imported here:

- ``gpu_render``: images/s at batch 1/8/16, bf16, SDPA, CFG 7.5, 20 steps, compile off then on,
  with the share of the FLOP bound (steps x 2 x UNet FLOPs + VAE decode, over the bf16 peak);
- ``gpu_train``: samples/s of our cached trainer vs the reference loop (VAE + text every step),
  rank 128, with the share of the FLOP bound (2 x UNet forward FLOPs a sample); last, SD 1.5 once
  more with PEFT's own LoRA layers in our arm (what ``train.fused_lora`` adds on the GPU);
- ``gpu_clip``: ViT-L/14 images/s at batch 64/256/512 (fp16), with the share of the FLOP bound
  (``encode_image`` FLOPs counted at 224 px).

Not in the default run, named with ``--parts``: ``levers-*``, our trainer under several settings
side by side on one model (``gpu_train.LEVERS``: autocast, layout, cuDNN autotuning, attention
kernel, fused or PEFT LoRA layers, batch, compile), with the reference loop and a kernel profile.

Each part runs in its own process under its own time limit (and the whole under ``--budget``
seconds), so one slow part -- a ``torch.compile``, say -- cannot eat the others' time; a part cut
short keeps the rows it had printed. Parts run most-wanted first; the compiled runs come late.
Everything lands under ``$OUT`` (``--out``): ``gpu.json`` (rewritten after every part), each part's
JSON and log. With ``--toy`` the same parts run on the CPU at toy widths (compiled parts skipped:
compiling on a CPU takes minutes), to check the script works.

    python3 bench/gpu.py                      # device run (carry .whl: wheels installed if diffusers is missing)
    .venv/bin/python bench/gpu.py --toy --out /tmp/gpu-toy
    python3 bench/gpu.py --parts render-sd15 clip --budget 200
    python3 bench/gpu.py --parts levers-sd15 levers-sd15-compiled --budget 350
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: name -> (kind, arch, compiled, time limit in seconds on the GPU, on the CPU with --toy (None: skipped))
PARTS: dict[str, tuple[str, str | None, bool, int, int | None]] = {
    "clip": ("clip", None, False, 50, 60),
    "render-sd15": ("render", "sd15", False, 75, 90),
    "render-sdxl": ("render", "sdxl", False, 110, 90),
    "train-sd15": ("train", "sd15", False, 80, 120),
    "render-sd15-compiled": ("render", "sd15", True, 100, None),
    "train-sdxl": ("train", "sdxl", False, 100, 120),
    "render-sdxl-compiled": ("render", "sdxl", True, 120, None),
    "train-sd15-peft-lora": ("train", "sd15", False, 80, 120),  # ours with PEFT's LoRA layers: the fused gain
    # training settings side by side (gpu_train.LEVERS), not in the default run: --parts names them
    "levers-sd15": ("levers", "sd15", False, 200, 240),
    "levers-sd15-compiled": ("levers", "sd15", True, 260, None),
    "levers-sd15-attention": ("levers", "sd15", False, 120, 120),
    "levers-sdxl": ("levers", "sdxl", False, 150, 180),
    "levers-sd15-compiled-before": ("levers", "sd15", True, 150, None),
}
DEFAULT_PARTS = [p for p in PARTS if not p.startswith("levers")]
#: levers parts: name -> (arms of gpu_train.LEVERS, also time the reference loop, arm to profile or None)
LEVER_ARMS: dict[str, tuple[list[str], bool, str | None]] = {
    "levers-sd15": (["before", "cudnn-benchmark", "channels-last", "no-autocast", "no-autocast+channels-last",
                     "no-autocast+channels-last, PEFT layers", "no-autocast+channels-last, cuDNN attention",
                     "no-autocast+channels-last, batch x2"], True, "no-autocast+channels-last"),
    "levers-sd15-compiled": (["no-autocast"], False, None),
    "levers-sd15-attention": (["no-autocast", "no-autocast, flash attention", "no-autocast, efficient attention",
                               "no-autocast, PEFT layers"], True, "no-autocast"),
    "levers-sdxl": (["before", "no-autocast+channels-last"], False, None),
    "levers-sd15-compiled-before": (["before"], False, None),
}
BUDGET_S = 450  # 7.5 minutes: leaves margin under 8 for start-up and the wheel install
MIN_PART_S = 20  # a part is not started with less time than this left
TRAIN = {"sd15": (32, 10), "sdxl": (8, 10)}  # (batch, steps) on the GPU; --toy: (2, 2)
WHEELS_SITE = "/tmp/site"


# ----------------------------------------------------------------------------------------- parts


def part_render(arch: str, compiled: bool, toy: bool, out: Path) -> dict[str, Any]:
    """gpu_render.main for one architecture, compile off or on; the rows it measured."""
    import gpu_render

    argv = ["--arch", arch, "--compile", "on" if compiled else "off", "--json", str(out)]
    if toy:
        argv += ["--toy", "--batches", "1", "2"]
    else:
        argv += ["--batches", "1", "8", "16"] + (["--calls", "1"] if compiled or arch == "sdxl" else [])
    if compiled or arch == "sdxl":
        argv.append("--no-render-dataset")  # render_dataset end to end: once, for SD 1.5 eager
    gpu_render.main(argv)
    return json.loads(out.read_text())


def part_train(arch: str, toy: bool, fused_lora: bool = True) -> dict[str, Any]:
    """gpu_train.measure: ours vs the reference loop, with both arms' share of the FLOP bound."""
    import gpu_render
    import gpu_train
    import torch

    device = "cuda" if torch.cuda.is_available() and not toy else "cpu"
    peak, source = gpu_render.peak_for(device, None)
    batch, steps = (2, 2) if toy else TRAIN[arch]
    row = gpu_train.measure(arch, toy, device, batch, steps, peak, fused_lora=fused_lora)
    bound = row["flop_bound_samples_per_s"]
    row["reference_share_of_flop_bound"] = row["reference_samples_per_s"] / bound if bound else None
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "peak_bf16_tflops": peak,
            "peak_source": source, "toy": toy, "runs": [row]}


def part_levers(name: str, arch: str, compiled: bool, toy: bool) -> dict[str, Any]:
    """gpu_train.levers: our trainer under several settings, side by side on one model."""
    import gpu_render
    import gpu_train
    import torch

    device = "cuda" if torch.cuda.is_available() and not toy else "cpu"
    peak, source = gpu_render.peak_for(device, None)
    batch, steps = (2, 3) if toy else (TRAIN[arch][0], 8)
    arms, reference, profile = LEVER_ARMS[name]
    result = gpu_train.levers(arch, toy, device, batch, steps, peak, arms, compiled, reference, profile)
    return {**result, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "peak_source": source,
            "toy": toy}


def part_clip(toy: bool) -> dict[str, Any]:
    """gpu_clip.build + measure at each batch size, with the share of the FLOP bound."""
    import gpu_clip
    import gpu_render
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    device = "cuda" if torch.cuda.is_available() and not toy else "cpu"
    scorer = gpu_clip.build(toy, device, "fp16")
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        scorer.model.encode_image(torch.randn(1, 3, 224, 224, device=device, dtype=scorer.dtype))
    flops = float(fc.get_total_flops())
    peak, source = gpu_render.peak_for(device, None)  # dense bf16 peak; dense fp16 is the same on Hopper
    rows = []
    for bs in ([4, 16] if toy else [64, 256, 512]):
        probe = gpu_clip.measure(scorer, bs, 1)
        n = 2 if toy else max(2, int(1.5 * probe["images_per_s"] / bs))  # about 1.5 s a batch size
        row = gpu_clip.measure(scorer, bs, n)
        row["achieved_tflops"] = round(row["images_per_s"] * flops / 1e12, 3)
        row["share_of_flop_bound"] = round(row["achieved_tflops"] / peak, 4) if peak else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"model": scorer.info["arch"], "precision": scorer.info["precision"], "device": device,
            "gflop_per_image": round(flops / 1e9, 2), "peak_tflops": peak, "peak_source": source,
            "input": "pre-decoded 224 px tensors (pinned)", "runs": rows}


def run_part(name: str, toy: bool, out: Path) -> int:
    """Child process: one part, its JSON written to ``out``."""
    sys.path[:0] = [str(ROOT), str(HERE)]
    kind, arch, compiled, _, _ = PARTS[name]
    if kind == "render":
        result = part_render(arch, compiled, toy, out)
    elif kind == "train":
        result = part_train(arch, toy, fused_lora=not name.endswith("-peft-lora"))
    elif kind == "levers":
        result = part_levers(name, arch, compiled, toy)
    else:
        result = part_clip(toy)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------- driver


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def environment(log: list[str]) -> dict[str, Any]:
    """Package versions and device, as the parts will see them. On a bare device (diffusers missing),
    the carried wheels (``.whl/``) are installed into /tmp/site first and put on PYTHONPATH."""
    found = versions()
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    if "error" not in found or not wheels:
        return found
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", WHEELS_SITE, *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    log.append(f"installed {len(wheels)} wheels into {WHEELS_SITE}: rc {done.returncode} {done.stderr[-500:]}")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [WHEELS_SITE, os.environ.get("PYTHONPATH")]))
    return versions()


def versions() -> dict[str, Any]:
    code = ("import json, torch, diffusers, transformers, peft; print(json.dumps({'torch': torch.__version__, "
            "'diffusers': diffusers.__version__, 'transformers': transformers.__version__, 'peft': peft.__version__, "
            "'cuda': torch.cuda.is_available(), 'device': torch.cuda.get_device_name() if torch.cuda.is_available() "
            "else 'cpu'}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=120)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"error": done.stderr[-1000:]}


def launch(name: str, toy: bool, out: Path, limit: float) -> dict[str, Any]:
    """Run one part in its own process group, killed (with its compile workers) after ``limit`` seconds."""
    part_json, log_path = out / f"gpu_{name}.json", out / f"gpu_{name}.log"
    part_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-json", str(part_json)]
    cmd += ["--toy"] if toy else []
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    entry: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 1), "limit_s": round(limit), "log": log_path.name}
    if rc == 0 and part_json.exists():
        return {"status": "ok", **entry, **json.loads(part_json.read_text())}
    rows = printed_rows(log_path.read_text(errors="replace"))
    entry["status"] = "timed out" if rc is None else f"failed (rc {rc})"
    entry["partial_runs"] = rows  # the rows the part had printed before it stopped
    entry["log_tail"] = log_path.read_text(errors="replace")[-1500:]
    return entry


def printed_rows(log: str) -> list[dict[str, Any]]:
    """The one-line JSON objects a part printed (each measured setting prints one as it finishes)."""
    rows = []
    for line in log.splitlines():
        if line.startswith("{") and line.rstrip().endswith("}"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def summary(name: str, part: dict[str, Any]) -> str:
    runs = part.get("runs") or part.get("partial_runs") or []
    bits = []
    for r in runs:
        if "images_per_s" in r and "batch" in r:
            bits.append(f"b{r['batch']} {r['images_per_s']:.3g} img/s ({_pct(r.get('share_of_peak'))})")
        elif "images_per_s" in r:
            bits.append(f"b{r['batch_size']} {r['images_per_s']:.4g} img/s ({_pct(r.get('share_of_flop_bound'))})")
        elif "ours_samples_per_s" in r:
            bits.append(f"ours {r['ours_samples_per_s']:.3g} vs ref {r['reference_samples_per_s']:.3g} samples/s "
                        f"({r['ratio']:.2f}x; {_pct(r.get('share_of_flop_bound'))})")
        elif "arm" in r:
            bits.append(f"{r['arm']}: " + (f"{r['samples_per_s']:.3g} samples/s" if r.get("status", "ok") == "ok"
                                           else r.get("status", "?")))
        elif "render_dataset_images_per_s" in r:
            bits.append(f"render_dataset {r['render_dataset_images_per_s']:.3g} img/s")
    return f"{name:<22} {part['status']:<14} {part['seconds']:>6.1f}s  " + "; ".join(bits)


def _pct(share: float | None) -> str:
    return "share of bound n/a" if share is None else f"{share:.1%} of bound"


def drive(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    found = environment(notes)
    result: dict[str, Any] = {"toy": args.toy, "budget_s": args.budget, "versions": found, "notes": notes,
                              "parts": {}, "seconds": None}
    print(f"bench/gpu.py: {'toy (CPU)' if args.toy else 'full size'}; {result['versions']}", flush=True)
    for name in args.parts:
        limit = PARTS[name][4] if args.toy else PARTS[name][3]
        left = args.budget - (time.perf_counter() - start)
        if limit is None:
            result["parts"][name] = {"status": "skipped", "why": "--toy: compiling on a CPU takes minutes", "seconds": 0.0}
        elif left < MIN_PART_S:
            result["parts"][name] = {"status": "skipped", "why": f"budget: {left:.0f} s left", "seconds": 0.0}
        else:
            print(f"--- {name} (limit {min(limit, left):.0f} s)", flush=True)
            result["parts"][name] = launch(name, args.toy, out, min(limit, left))
        print(summary(name, result["parts"][name]), flush=True)
        result["seconds"] = round(time.perf_counter() - start, 1)
        (out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="toy widths on the CPU: checks the script works")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=DEFAULT_PARTS, metavar="PART",
                        help=f"parts to run, in this order (default: {' '.join(DEFAULT_PARTS)}; also: "
                             f"{' '.join(p for p in PARTS if p not in DEFAULT_PARTS)})")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for everything (default %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "/tmp/selma-gpu"),
                        help="folder for the JSON and logs (default: $OUT, else /tmp/selma-gpu)")
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)  # child process: run this part
    parser.add_argument("--part-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.part:
        return run_part(args.part, args.toy, args.part_json)
    result = drive(args)
    print(f"wrote {args.out / 'gpu.json'} in {result['seconds']} s")
    return 0 if all(p["status"] in ("ok", "skipped") for p in result["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
