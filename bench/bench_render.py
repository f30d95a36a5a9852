"""Benchmark: our stage-2 renderer against the SELMA reference approach, side by side, on CPU.

Reference (SELMA ``image-generation/img_gen_gpt.py``): a diffusers pipeline called with one prompt at
a time (its ``--batch_size`` defaults to 1) and each image saved as it comes. Here it gets the same
per-image seeds as ours (one ``torch.Generator`` per image), so both make the same images and the
output check is meaningful.

Ours: ``render_dataset`` with multi-prompt batches, including everything a dataset costs (PNG with
its record, caption, fsyncs, metadata.jsonl, dataset.json). Also measured at batch size 1, which
isolates our overhead from the gain of batching.

Model: SD 1.5's UNet layout (4 levels, CrossAttn x3 + plain, 2 layers a block, 8 heads) at reduced
width (32-64-128-128 channels), with the tiny SD1 VAE and text encoder, random weights, 128 px
(16x16 latents); same scheduler (DPM++ 2M Karras), steps and CFG for both. Runs alternate
(reference, ours, ...) and each side keeps its best time, to damp noise from other processes.

    .venv/bin/python bench/bench_render.py          # 32 prompts, 20 steps, batch 16, best of 2 rounds
    .venv/bin/python bench/bench_render.py --quick  # 12 prompts, 8 steps, batch 12, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selma_backend.render import RenderConfig, derive_seed, render_dataset  # noqa: E402

UNET_SD15_LAYOUT_REDUCED = {
    "sample_size": 16,  # 128 px
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (32, 64, 128, 128),  # SD 1.5: (320, 640, 1280, 1280)
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "attention_head_dim": 8,
    "cross_attention_dim": 32,  # the tiny text encoder's width (SD 1.5: 768)
    "norm_num_groups": 32,
}
SCHEDULER = "dpmpp_2m_karras"
CFG = 7.5


def build_model(work: Path):
    """The tiny SD1 pipeline with a reduced-width SD 1.5-layout UNet, as a LoadedPipeline."""
    import torch
    from diffusers import UNet2DConditionModel

    from selma_backend.models.config import ModelConfig
    from selma_backend.models.loader import load_pipeline
    from selma_backend.tiny_models import write_sd1

    lp = load_pipeline(ModelConfig(path=str(write_sd1(work / "sd1", seed=0)), dtype="fp32", device="cpu"))
    torch.manual_seed(0)
    lp.pipe.unet = UNet2DConditionModel(**UNET_SD15_LAYOUT_REDUCED).eval()
    lp.pipe.set_progress_bar_config(disable=True)
    return lp


def prompts(n: int) -> list[dict]:
    things = ["apples", "cats", "red cubes", "boats", "kites", "cups", "chairs", "birds"]
    return [{"id": f"bench-{i:06d}", "skill": "countbench", "prompt": f"{i % 7 + 1} {things[i % 8]} on a table, photo"}
            for i in range(n)]


def reference(lp, rows: list[dict], steps: int, out: Path) -> float:
    """SELMA's loop: one prompt per pipeline call, image saved straight away."""
    import torch

    from selma_backend.render.schedulers import build_scheduler

    pipe = lp.pipe
    original, pipe.scheduler = pipe.scheduler, build_scheduler(SCHEDULER, pipe.scheduler)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    for row in rows:
        seed = derive_seed(0, row["id"], 0)
        image = pipe(row["prompt"], num_inference_steps=steps, guidance_scale=CFG,
                     generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        image.save(out / f"{row['id']}_s0.png")
    elapsed = time.perf_counter() - t0
    pipe.scheduler = original
    return elapsed


def ours(lp, rows: list[dict], steps: int, batch: int, out: Path) -> float:
    config = RenderConfig(steps=steps, batch_size=batch, cfg=CFG, scheduler=SCHEDULER)
    t0 = time.perf_counter()
    report = render_dataset(lp, rows, out, config)
    elapsed = time.perf_counter() - t0
    assert report.rendered == len(rows), report
    return elapsed


def compare(a: Path, b: Path) -> dict:
    import numpy as np
    from PIL import Image

    worst, share = 0, 0.0
    for p in sorted(a.glob("*.png")):
        x = np.asarray(Image.open(p).convert("RGB"), dtype=np.int16)
        y = np.asarray(Image.open(b / p.name).convert("RGB"), dtype=np.int16)
        d = np.abs(x - y)
        worst, share = max(worst, int(d.max())), max(share, float((d > 0).mean()))
    return {"max_level_diff": worst, "max_share_differing": round(share, 6)}


def run(quick: bool = False, threads: int = 1, repeats: int | None = None, tiny: bool = False) -> dict:
    """Measure and print; return figures for bench/run.py (throughput in images/s).

    ``repeats``: that many alternating rounds, reporting the median of each arm (default: the best of
    1 round with ``quick``, of 2 otherwise); ``tiny``: 4 prompts, 2 steps (tests).
    """
    import torch

    n, steps, batch, rounds = (4, 2, 4, 1) if tiny else (12, 8, 12, 1) if quick else (32, 20, 16, 2)
    rounds, pick = (repeats, statistics.median) if repeats else (rounds, min)
    torch.set_num_threads(threads)
    rows = prompts(n)
    work = Path(tempfile.mkdtemp(prefix="selma-bench-render-"))
    try:
        lp = build_model(work)
        ours(lp, rows[:2], 2, 2, work / "warm-ours")  # first calls pay kernel set-up: not timed
        reference(lp, rows[:2], 2, work / "warm-ref")
        t_ref, t_ours, t_b1 = [], [], []
        for r in range(rounds):
            t_ref.append(reference(lp, rows, steps, work / f"ref{r}"))
            t_ours.append(ours(lp, rows, steps, batch, work / f"ours{r}"))
            t_b1.append(ours(lp, rows, steps, 1, work / f"ours-b1-{r}"))
        same = compare(work / "ours0", work / "ref0")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "ours": n / pick(t_ours),
        "reference": n / pick(t_ref),
        "unit": "images/s",
        "ratio": pick(t_ref) / pick(t_ours),
        "ours_batch1": n / pick(t_b1),
        "images": n, "steps": steps, "batch_size": batch, "size": "128x128", "cfg": CFG, "scheduler": SCHEDULER,
        "rounds": rounds, "torch_threads": threads, "cpus": os.cpu_count(), "same_output": same,
        "statistic": pick.__name__, "ours_s": t_ours, "reference_s": t_ref,
    }
    print(f"render {n} images, SD1.5-layout UNet at reduced width, 128 px, {steps} steps, {SCHEDULER}, "
          f"CFG {CFG}; torch threads {threads} of {os.cpu_count()} CPUs; {'best' if pick is min else 'median'} of {rounds}")
    print(f"  reference (1 prompt/call): {result['reference']:.2f} images/s")
    print(f"  ours, batch {batch}:         {result['ours']:.2f} images/s  ({result['ratio']:.2f}x)")
    print(f"  ours, batch 1:          {result['ours_batch1']:.2f} images/s")
    print(f"  ours vs reference pixels: {same}")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable on shared CPUs)")
    args = parser.parse_args()
    print(json.dumps(run(args.quick, args.threads)))
