"""Benchmark: our stage-4 trainer against the reference loop, side by side, on CPU.

Reference (diffusers ``examples/text_to_image/train_text_to_image_lora.py``, which SELMA's training
scripts follow): every step decodes its images from disk, encodes them with the VAE (drawing from the
latent distribution), runs the text encoder on the captions, then the UNet forward and backward.
Ours: ``train_experts`` -- latents and text conditioning cached once (here: before the timed loop,
and reported separately), so a step is the UNet forward and backward only, with the LoRA layers of
``train.fused_lora`` and torch's fused AdamW. A third arm, ours with PEFT's own LoRA layers, shows
what the fused layers add (``fused_lora_gain``).

Both arms get the same model, LoRA init, batch order, noise and timesteps (``loop.mix(seed, step)``),
so their loss curves differ only by the VAE sample vs its mean; the table prints both means and the
mean relative step-by-step difference.

Model: SD 1.5's layout at 1/5 width for the UNet (64-128-256-256 channels, 2 layers a block,
cross-attention on the first three levels), SD's VAE at 1/4 width (32-64-128-128), a CLIP-L-shaped
text encoder at 1/4 width (12 layers, 192 wide), random weights, 256 px. Each component keeps
roughly its share of SD 1.5's compute. Arms alternate and each keeps its best time.

    .venv/bin/python bench/bench_train.py          # 16 images, batch 4, 12 steps, best of 2 rounds
    .venv/bin/python bench/bench_train.py --quick  # 8 images, batch 4, 4 steps, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selma_backend.train import TrainConfig, train_experts  # noqa: E402

RES = 256
UNET = {"sample_size": RES // 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (64, 128, 256, 256),  # SD 1.5: (320, 640, 1280, 1280)
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "attention_head_dim": 8, "cross_attention_dim": 192, "norm_num_groups": 32}
VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (32, 64, 128, 128),
       "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
       "layers_per_block": 2, "norm_num_groups": 32, "sample_size": RES}
TEXT = {"vocab_size": 49408, "max_position_embeddings": 77, "hidden_size": 192, "intermediate_size": 768,
        "num_hidden_layers": 12, "num_attention_heads": 3, "projection_dim": 192, "hidden_act": "quick_gelu"}


def build_model(work: Path):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from selma_backend.models.config import ModelConfig
    from selma_backend.models.loader import load_pipeline
    from selma_backend.tiny_models import write_sd1

    lp = load_pipeline(ModelConfig(path=str(write_sd1(work / "sd1", seed=0)), dtype="fp32", device="cpu"))
    torch.manual_seed(0)
    lp.pipe.unet = UNet2DConditionModel(**UNET)
    lp.pipe.vae = AutoencoderKL(**VAE)
    lp.pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT))
    lp.pipe.set_progress_bar_config(disable=True)
    return lp


def make_data(folder: Path, n: int, res: int = RES) -> Path:
    import numpy as np
    from PIL import Image

    from selma_backend.render.dataset import append_images

    rng = np.random.default_rng(0)
    things = ["apples", "cats", "red cubes", "boats", "kites", "cups", "chairs", "birds"]
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((res, res), Image.BILINEAR)
              for _ in range(n)]
    append_images(folder, images, [f"{i % 4 + 1} {things[i % 8]} on a table, photo" for i in range(n)], "countbench",
                  seed=0, source="bench")
    return folder


class PeakRSS:
    """Highest resident set size (MB) above the starting one while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reference(lp, data: Path, cfg: TrainConfig, sync=lambda: None) -> tuple[float, list[float]]:
    """train_text_to_image_lora.py's step: decode, VAE-encode (sampled), text-encode, UNet, backward."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from selma_backend.train.data import epoch_batches, load_pixels, load_samples
    from selma_backend.train.encode import add_time_ids, encode_images, encode_text
    from selma_backend.train.loop import clip_gradients, mix
    from selma_backend.train.model import attach, detach

    pipe, dev = lp.pipe, lp.pipe.unet.device
    wdtype = pipe.unet.dtype
    samples = load_samples(data, resolution=cfg.resolution, buckets=cfg.buckets, flip=cfg.flip)
    params = attach(pipe, cfg, fused=False)  # PEFT's own LoRA layers, as the diffusers script
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    batches = [b for e in range(100) for b in epoch_batches(samples, cfg.batch_size, cfg.seed, e)]
    losses = []
    pipe.unet.train()
    sync()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        gen = torch.Generator().manual_seed(mix(cfg.seed, step))
        vae_gen = torch.Generator().manual_seed(step)
        views = batches[step]
        pixels = torch.stack([load_pixels(samples[i], f) for i, f in views])
        latents = encode_images(pipe, pixels, sample=True, generator=vae_gen)
        with torch.no_grad():
            embeds, pooled = encode_text(pipe, lp.arch, [samples[i].caption_for(f) for i, f in views])
        noise = torch.randn(latents.shape, generator=gen).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(views),), generator=gen).to(dev)
        extra = None
        if lp.arch == "sdxl":
            extra = {"text_embeds": pooled.to(wdtype), "time_ids": add_time_ids([samples[i].size for i, _ in views], dev).to(wdtype)}
        with torch.autocast(dev.type, dtype=wdtype, enabled=wdtype != torch.float32):
            pred = pipe.unet(sched.add_noise(latents, noise, t).to(wdtype), t, embeds.to(wdtype), added_cond_kwargs=extra).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        clip_gradients(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    sync()
    elapsed = time.perf_counter() - t0
    detach(pipe)
    return elapsed, losses


def ours(lp, data: Path, cfg: TrainConfig, work: Path, fused_lora: bool = True) -> tuple[float, float, list[float]]:
    """(seconds of the training steps, seconds of the whole call -- checkpoint, export, any cache fill --, losses).
    ``fused_lora=False``: our trainer with PEFT's own LoRA layers (shows what the fused layer adds)."""
    t0 = time.perf_counter()
    r = train_experts(lp, [data], work / "out", cfg, cache_root=work / "cache", overwrite=True, fused_lora=fused_lora)[0]
    total = time.perf_counter() - t0
    import csv

    rows = list(csv.DictReader(open(Path(r.work_dir) / "loss.csv")))
    return sum(float(row["seconds"]) for row in rows), total, [float(row["loss"]) for row in rows]


def run(quick: bool = False, threads: int = 2, repeats: int | None = None, tiny: bool = False) -> dict:
    """``repeats``: that many alternating rounds, medians reported (default: the best of 1 round with
    ``quick``, of 2 otherwise); ``tiny``: 4 images, 2 steps (tests)."""
    import torch

    n, steps, rounds = (4, 2, 1) if tiny else (8, 4, 1) if quick else (16, 12, 2)
    rounds, pick = (repeats, statistics.median) if repeats else (rounds, min)
    torch.set_num_threads(threads)
    cfg = TrainConfig(rank=16, alpha=16, steps=steps, batch_size=4, grad_accum=1, resolution=RES, flip="never",
                      buckets=False, checkpoint_every=10_000, lr=1e-4)
    work = Path(tempfile.mkdtemp(prefix="selma-bench-train-"))
    try:
        lp = build_model(work)
        data = make_data(work / "data", n)
        warm = TrainConfig(**{**cfg.to_dict(), "steps": 1})
        reference(lp, data, warm)  # first calls pay kernel set-up: not timed
        ours(lp, data, warm, work / "warm")  # and this fills the cache, as a first run would
        t_ref, t_ours, t_total, mem_ref, mem_ours, t_peft = [], [], [], [], [], []
        for r in range(rounds):
            with PeakRSS() as m:
                t, ref_losses = reference(lp, data, cfg)
            t_ref.append(t)
            mem_ref.append(m.mb)
            with PeakRSS() as m:
                t, total, our_losses = ours(lp, data, cfg, work / f"ours{r}")
            t_ours.append(t)
            t_total.append(total)
            mem_ours.append(m.mb)
            t, _, peft_losses = ours(lp, data, cfg, work / f"peft{r}", fused_lora=False)
            t_peft.append(t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    samples = steps * cfg.effective_batch
    diff = sum(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(our_losses, ref_losses, strict=True)) / steps
    result = {"ours": samples / pick(t_ours), "reference": samples / pick(t_ref), "unit": "samples/s",
              "ratio": pick(t_ref) / pick(t_ours), "ours_including_cache_fill_and_export": samples / pick(t_total),
              "ours_with_peft_lora_layers": samples / pick(t_peft), "fused_lora_gain": pick(t_peft) / pick(t_ours),
              "loss_max_rel_diff_fused_vs_peft_layers": max(abs(a - b) / max(abs(b), 1e-12)
                                                            for a, b in zip(our_losses, peft_losses, strict=True)),
              "peak_rss_mb_ours": round(min(mem_ours), 1), "peak_rss_mb_reference": round(min(mem_ref), 1),
              "loss_mean_ours": sum(our_losses) / steps, "loss_mean_reference": sum(ref_losses) / steps,
              "loss_mean_rel_diff_per_step": diff, "images": n, "steps": steps, "batch": cfg.batch_size,
              "resolution": RES, "threads": threads, "rounds": rounds, "statistic": pick.__name__,
              "ours_s": t_ours, "reference_s": t_ref, "ours_with_peft_lora_layers_s": t_peft}
    print(f"train  ours {result['ours']:.2f} samples/s  reference {result['reference']:.2f} samples/s  "
          f"ratio {result['ratio']:.2f}x  (with cache fill + export: {result['ours_including_cache_fill_and_export']:.2f}; "
          f"with PEFT's LoRA layers: {result['ours_with_peft_lora_layers']:.2f}, fused gain {result['fused_lora_gain']:.2f}x)  "
          f"peak RSS +{result['peak_rss_mb_ours']:.0f} MB vs +{result['peak_rss_mb_reference']:.0f} MB  "
          f"loss {result['loss_mean_ours']:.4f} vs {result['loss_mean_reference']:.4f} (mean step diff {diff:.2%})")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    result = run(args.quick, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
