"""Benchmark: our stage-4 trainer against the reference loop, side by side, on CPU.

Reference (diffusers ``examples/text_to_image/train_text_to_image_lora.py``, which SELMA's training
scripts follow): every step decodes its images from disk, encodes them with the VAE (drawing from the
latent distribution), runs the text encoder on the captions, then the UNet forward and backward.
Ours: ``train_experts`` -- latents and text conditioning cached once (here: before the timed loop,
and reported separately), so a step is the UNet forward and backward only, with the LoRA layers of
``train.fused_lora`` and torch's fused AdamW. A third arm, ours with PEFT's own LoRA layers, shows
what the fused layers add (``fused_lora_gain``).

All arms get the same model, LoRA init, batch order, noise and timesteps (``loop.mix(seed, step)``),
so their loss curves differ only by the VAE sample vs its mean (and bf16 rounding); the table prints
both means, the mean relative step-by-step difference and the largest difference to the fp32 reference.

Precision: each of fp32 (the reference script's default) and bf16 (the script's ``--mixed_precision
bf16``: VAE, text encoder and UNet in bf16, the UNet under autocast; ours: ``mixed_precision="bf16"``,
no autocast) is its own side-by-side pair on a fresh copy of the model. The headline is the fp32
pair; ``best_of_each`` is each method at its faster precision on this machine (which depends on the
CPU: bf16 needs AVX512-BF16 or AMX to be fast).

FLOPs: ``flop_shares`` counts, on the meta device, one sample's UNet training step and its encoders,
for this model and for full-size SD 1.5 at 512 px. The encoders' share is what caching saves; at equal
UNet speed caching alone gives ``1 / (1 - share)``: 1.62x for SD 1.5 (38 %), 1.95x for this model (49 %).

Model: SD 1.5's layout at 1/5 width for the UNet (64-128-256-256 channels, 2 layers a block, 8 heads,
cross-attention on the first three levels), SD's VAE at 1/4 width (32-64-128-128), a CLIP-L-shaped
text encoder at 1/4 width (12 layers, 192 wide), random weights, 256 px. By FLOPs the encoders are
a larger share here than in SD 1.5; in time a smaller one on CPU, because the 8-wide attention heads
(SD 1.5: 40-160) run at a fraction of the convolutions' FLOP rate. The arms' order rotates each round.

    .venv/bin/python bench/bench_train.py              # 16 images, batch 4, 12 steps, best of 2 rounds
    .venv/bin/python bench/bench_train.py --quick      # 8 images, batch 4, 4 steps, 1 round
    .venv/bin/python bench/bench_train.py --repeats 5  # medians of 5 rounds; --precision fp32|bf16|both
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


#: Full-size SD 1.5 (the layout the bench model shrinks), for :func:`flop_shares`.
SD15 = {"unet": {**UNET, "sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768},
        "vae": {**VAE, "block_out_channels": (128, 256, 512, 512), "sample_size": 512},
        "text": {**TEXT, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "projection_dim": 768}}


def flop_shares(unet: dict, vae: dict, text: dict, resolution: int, rank: int) -> dict:
    """FLOPs of one sample: the training step's UNet forward and backward (LoRA of the ``selma`` preset),
    and the encoders the reference runs again every step (VAE encode, text encode), counted by torch's
    ``FlopCounterMode`` on the meta device (no memory, no time); with the encoders' share of the
    reference step and the ratio caching alone gives if both UNet steps ran equally fast."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel

    from selma_backend.train.model import PRESETS, target_modules

    with torch.device("meta"):
        unet_m, vae_m, text_m = UNet2DConditionModel(**unet), AutoencoderKL(**vae), CLIPTextModel(CLIPTextConfig(**text))
    unet_m.requires_grad_(False)
    unet_m.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                  target_modules=target_modules(unet_m, PRESETS.get("selma"))))
    latent = resolution // 8

    def count(fn) -> float:
        with FlopCounterMode(display=False) as m:
            fn()
        return m.get_total_flops() / 1e9

    unet_g = count(lambda: unet_m(torch.randn(1, 4, latent, latent, device="meta"), torch.zeros(1, dtype=torch.long, device="meta"),
                                  torch.randn(1, 77, text["hidden_size"], device="meta")).sample.sum().backward())
    with torch.no_grad():
        vae_g = count(lambda: vae_m.encode(torch.randn(1, 3, resolution, resolution, device="meta")))
        text_g = count(lambda: text_m(torch.zeros(1, 77, dtype=torch.long, device="meta")))
    encoders = vae_g + text_g
    return {"unet_train_gflop": unet_g, "vae_encode_gflop": vae_g, "text_encode_gflop": text_g,
            "encoder_share": encoders / (encoders + unet_g), "caching_only_ratio": (encoders + unet_g) / unet_g,
            "resolution": resolution, "rank": rank}


PRECISIONS = ("fp32", "bf16")


def native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX); without them bf16 is emulated."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)


def _pair(precision: str, n: int, cfg: TrainConfig, rounds: int, pick, work: Path) -> dict:
    """The three arms at one precision, on a fresh copy of the model, ``rounds`` rounds in rotating order.

    ``fp32``: everything in fp32 (the reference script's default). ``bf16``: the reference as the script
    runs with ``--mixed_precision bf16`` (VAE, text encoder and UNet cast to bf16, the UNet under
    autocast, fp32 LoRA weights); ours with ``mixed_precision="bf16"`` (its recipe: bf16 base, fp32 LoRA
    weights and AdamW, no autocast -- ``TrainConfig.autocast`` ``auto``)."""
    import torch

    lp = build_model(work / "model")
    if precision == "bf16":
        from diffusers.utils import logging as dlog

        level = dlog.get_verbosity()
        dlog.set_verbosity_error()  # diffusers warns on every cast of a whole model with to()
        try:
            for module in (lp.pipe.unet, lp.pipe.vae, lp.pipe.text_encoder):
                module.to(torch.bfloat16)
        finally:
            dlog.set_verbosity(level)
    cfg = TrainConfig(**{**cfg.to_dict(), "mixed_precision": "no" if precision == "fp32" else "bf16"})
    data = make_data(work / "data", n)
    warm = TrainConfig(**{**cfg.to_dict(), "steps": 1})
    reference(lp, data, warm)  # first calls pay kernel set-up: not timed
    ours(lp, data, warm, work / "warm")  # and this fills the cache, as a first run would
    t_ref, t_ours, t_total, mem_ref, mem_ours, t_peft = [], [], [], [], [], []

    def arm_reference(r: int) -> list[float]:
        with PeakRSS() as m:
            t, losses = reference(lp, data, cfg)
        t_ref.append(t)
        mem_ref.append(m.mb)
        return losses

    def arm_ours(r: int) -> list[float]:
        with PeakRSS() as m:
            t, total, losses = ours(lp, data, cfg, work / f"ours{r}")
        t_ours.append(t)
        t_total.append(total)
        mem_ours.append(m.mb)
        return losses

    def arm_peft(r: int) -> list[float]:
        t, _, losses = ours(lp, data, cfg, work / f"peft{r}", fused_lora=False)
        t_peft.append(t)
        return losses

    arms = [arm_reference, arm_ours, arm_peft]
    try:
        for r in range(rounds):  # the order rotates each round: no arm always runs right after another
            losses = {arm: arm(r) for arm in arms[r % 3:] + arms[:r % 3]}
    finally:
        lp.release()
    ref_losses, our_losses, peft_losses = losses[arm_reference], losses[arm_ours], losses[arm_peft]
    samples, steps = cfg.steps * cfg.effective_batch, cfg.steps
    return {"ours": samples / pick(t_ours), "reference": samples / pick(t_ref), "ratio": pick(t_ref) / pick(t_ours),
            "ours_including_cache_fill_and_export": samples / pick(t_total),
            "ours_with_peft_lora_layers": samples / pick(t_peft), "fused_lora_gain": pick(t_peft) / pick(t_ours),
            "loss_max_rel_diff_fused_vs_peft_layers": _max_rel(our_losses, peft_losses),
            "peak_rss_mb_ours": round(min(mem_ours), 1), "peak_rss_mb_reference": round(min(mem_ref), 1),
            "loss_mean_ours": sum(our_losses) / steps, "loss_mean_reference": sum(ref_losses) / steps,
            "loss_mean_rel_diff_per_step": sum(abs(a - b) / max(abs(b), 1e-12)
                                               for a, b in zip(our_losses, ref_losses, strict=True)) / steps,
            "losses_ours": our_losses, "losses_reference": ref_losses,
            "ours_s": t_ours, "reference_s": t_ref, "ours_with_peft_lora_layers_s": t_peft}


def _max_rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def run(quick: bool = False, threads: int = 2, repeats: int | None = None, tiny: bool = False,
        precisions: tuple[str, ...] = PRECISIONS) -> dict:
    """``repeats``: that many alternating rounds, medians reported (default: the best of 1 round with
    ``quick``, of 2 otherwise); ``tiny``: 4 images, 2 steps (tests). Each of ``precisions`` is measured
    as its own side-by-side pair (:func:`_pair`). The headline ``ours``, ``reference`` and ``ratio`` are
    the fp32 pair's (the reference script's default; what the targets were set against), ``best_of_each``
    is each method at its faster precision on this machine, and every arm's loss curve is compared with
    the fp32 reference's."""
    import torch

    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ValueError(f"precisions: got {list(precisions)}; allowed: a non-empty selection of {list(PRECISIONS)}")
    n, steps, rounds = (4, 2, 1) if tiny else (8, 4, 1) if quick else (16, 12, 2)
    rounds, pick = (repeats, statistics.median) if repeats else (rounds, min)
    torch.set_num_threads(threads)
    cfg = TrainConfig(rank=16, alpha=16, steps=steps, batch_size=4, grad_accum=1, resolution=RES, flip="never",
                      buckets=False, checkpoint_every=10_000, lr=1e-4)
    pairs = {}
    for precision in precisions:
        work = Path(tempfile.mkdtemp(prefix=f"selma-bench-train-{precision}-"))
        try:
            pairs[precision] = _pair(precision, n, cfg, rounds, pick, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    best_ours = max(pairs, key=lambda p: pairs[p]["ours"])
    best_ref = max(pairs, key=lambda p: pairs[p]["reference"])
    if "fp32" in pairs:
        base = pairs["fp32"]["losses_reference"]
        for pair in pairs.values():
            pair["loss_max_rel_diff_vs_fp32_reference"] = {"ours": _max_rel(pair["losses_ours"], base),
                                                            "reference": _max_rel(pair["losses_reference"], base)}
    head = "fp32" if "fp32" in pairs else precisions[0]
    best = {"ours": pairs[best_ours]["ours"], "reference": pairs[best_ref]["reference"],
            "ratio": pairs[best_ours]["ours"] / pairs[best_ref]["reference"], "ours_precision": best_ours,
            "reference_precision": best_ref}
    result = {"ours": pairs[head]["ours"], "reference": pairs[head]["reference"], "unit": "samples/s",
              "ratio": pairs[head]["ratio"], "precision": head, "best_of_each": best, "native_bf16": native_bf16(),
              "by_precision": pairs, "images": n, "steps": steps, "batch": cfg.batch_size, "resolution": RES,
              "threads": threads, "rounds": rounds, "statistic": pick.__name__,
              "flops": {"bench_model": flop_shares(UNET, VAE, TEXT, RES, cfg.rank),
                        "sd15_512px_rank128": flop_shares(SD15["unet"], SD15["vae"], SD15["text"], 512, 128)}}
    for precision, p in pairs.items():
        print(f"train {precision}  ours {p['ours']:.2f} samples/s  reference {p['reference']:.2f} samples/s  "
              f"ratio {p['ratio']:.2f}x  (with cache fill + export: {p['ours_including_cache_fill_and_export']:.2f}; "
              f"with PEFT's LoRA layers: {p['ours_with_peft_lora_layers']:.2f}, fused gain {p['fused_lora_gain']:.2f}x)  "
              f"peak RSS +{p['peak_rss_mb_ours']:.0f} MB vs +{p['peak_rss_mb_reference']:.0f} MB  "
              f"loss {p['loss_mean_ours']:.4f} vs {p['loss_mean_reference']:.4f} "
              f"(mean step diff {p['loss_mean_rel_diff_per_step']:.2%}"
              + (f"; largest vs the fp32 reference {p['loss_max_rel_diff_vs_fp32_reference']['ours']:.2%})"
                 if "loss_max_rel_diff_vs_fp32_reference" in p else ")"))
    print(f"train  each at its faster precision: ours {best['ours']:.2f} samples/s ({best_ours})  reference "
          f"{best['reference']:.2f} samples/s ({best_ref})  ratio {best['ratio']:.2f}x  "
          f"(this CPU {'has' if result['native_bf16'] else 'lacks'} native bf16)")
    for name, f in result["flops"].items():
        print(f"train  FLOPs a sample, {name}: UNet step {f['unet_train_gflop']:.1f} G, encoders "
              f"{f['vae_encode_gflop'] + f['text_encode_gflop']:.1f} G ({f['encoder_share']:.1%} of the reference step): "
              f"caching alone gives {f['caching_only_ratio']:.2f}x at equal UNet speed")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, help="rounds (arms in rotating order), medians reported")
    ap.add_argument("--precision", choices=[*PRECISIONS, "both"], default="both")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    precisions = PRECISIONS if args.precision == "both" else (args.precision,)
    result = run(args.quick, args.threads, args.repeats, precisions=precisions)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
