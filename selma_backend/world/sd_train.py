"""Train the world's text-to-image model on CPU: ``selma world train-sd``.

Two stages, each a function of its config and seed (on one torch version):

1. ``vae``: the ``AutoencoderKL`` learns to reconstruct world scenes (pixel MSE + L1, a small KL term as
   SD's first stage); its latent scaling factor is measured on fresh scenes (1 / std, as SD's 0.18215).
2. ``unet``: the UNet learns to denoise those latents conditioned on the frozen world-CLIP text tower, with
   SD's noise schedule and loss (epsilon prediction, Min-SNR-5 weighting), 10 % of captions dropped
   for classifier-free guidance, AdamW with warm-up and cosine decay, and an exponential moving average
   of the weights that is what gets saved.

The training data is drawn fresh every step from the TRAIN split of the world (held-out meanings are
never seen): mostly common scenes, the skills' kinds of scene rarer (:data:`BASE_MIX`) — as a web-trained
model sees many single objects and few exact counts, relations or unusual colourings. A checkpoint
is written every ``checkpoint_every`` steps in ``<out>.work/`` and a rerun resumes from it.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SelmaError, check_int, check_number, invalid
from ..fsio import atomic_write_json
from .captions import caption
from .clip_eval import WORLD_CLIP
from .folders import check_target, publish_folder
from .scene import render_scene, sample_scene
from .sd_model import (
    RECORD_FILE,
    RESOLUTION,
    SD_BETAS,
    SD_PRESETS,
    build_unet,
    build_vae,
    load_text_encoder,
    save_pipeline,
)
from .skills import WORLD_SKILLS, split_of
from .spec import PromptSpec

MADE_BY = "selma world train-sd"
#: The base model's diet: skill -> share of training scenes.
BASE_MIX = {"world_common": 0.6, "world_counting": 0.1, "world_spatial": 0.1, "world_binding": 0.1, "world_whoops": 0.1}
VAE_FILE = "vae.pt"


@dataclass(frozen=True)
class SdTrainConfig:
    """One run. ``minutes`` > 0 stops the UNet stage after that much wall time (the step count then says)."""

    preset: str = "large"
    steps: int = 3000
    minutes: float = 0.0
    batch_size: int = 32
    lr: float = 6e-4
    warmup: int = 100
    ema: float = 0.998
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    noise_offset: float = 0.1
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_lr: float = 2e-3
    seed: int = 0
    threads: int = 1
    checkpoint_every: int = 200
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.preset not in SD_PRESETS:
            raise invalid("preset", self.preset, list(SD_PRESETS))
        for name, hi in (("steps", 10_000_000), ("batch_size", 4096), ("vae_steps", 10_000_000), ("vae_batch_size", 4096),
                         ("threads", 256),
                         ("checkpoint_every", 10_000_000), ("log_every", 10_000_000)):
            check_int(name, getattr(self, name), 1, hi)
        check_int("warmup", self.warmup, 0, 10_000_000)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_number("minutes", self.minutes, 0, 10_000)
        check_number("ema", self.ema, 0, 0.99999)
        check_number("cfg_dropout", self.cfg_dropout, 0, 1)
        check_number("min_snr_gamma", self.min_snr_gamma, 0, 1000)
        check_number("noise_offset", self.noise_offset, 0, 1)
        for name in ("lr", "vae_lr"):
            check_number(name, getattr(self, name), 1e-8, 1.0)


def sample_spec(rng: random.Random, mix: dict[str, float] | None = None) -> PromptSpec:
    """A TRAIN-split spec of a skill drawn by ``mix`` (default :data:`BASE_MIX`)."""
    mix = mix or BASE_MIX
    skill = WORLD_SKILLS.get(rng.choices(list(mix), weights=list(mix.values()))[0])
    while True:
        spec = skill.sample(rng)
        if split_of(spec) == "train":
            return spec


def sample_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` fresh scenes: pixels (n, 3, 64, 64) in [-1, 1] and one caption each."""
    import numpy as np

    images, captions = [], []
    while len(images) < n:
        spec = sample_spec(rng)
        try:
            scene = sample_scene(spec, rng)
        except SelmaError:  # no room for this spec this time: draw another
            continue
        images.append(np.asarray(render_scene(scene, RESOLUTION), dtype=np.float32))
        captions.append(caption(spec, rng))
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1.0
    return pixels, captions


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# --- stage 1: the VAE ------------------------------------------------------------------------------------


def train_vae(config: SdTrainConfig, say: Callable[[str], None] = print) -> tuple[Any, float, list[dict]]:
    """Train the VAE; return it (eval mode), its scaling factor and the loss curve.

    The loss weighs the shapes' pixels 10x the background's (they are a tenth of the image and all
    that matters to the judge); the posterior starts near-deterministic (log-variance bias -8), since
    unit noise on untrained means drowns them.
    """
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    vae = build_vae(config.preset)
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    curve, start = [], time.perf_counter()
    for step in range(config.vae_steps):
        for g in opt.param_groups:
            g["lr"] = config.vae_lr * min(1.0, (step + 1) / 30)
        pixels, _ = sample_batch(rng, config.vae_batch_size)
        dist = vae.encode(pixels).latent_dist
        recon = vae.decode(dist.sample()).sample
        err = (recon - pixels).pow(2) + 0.5 * (recon - pixels).abs()
        shape = ((pixels - pixels[:, :, :1, :1]).abs().sum(1, keepdim=True) > 0.05).float()  # not the corner's colour
        weight = 1 + 9 * shape
        loss = (err * weight / weight.mean()).mean() + 1e-6 * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % config.log_every == 0 or step + 1 == config.vae_steps:
            curve.append({"step": step + 1, "loss": round(loss.item(), 5)})
            say(f"vae step {step + 1}/{config.vae_steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f} s")
    vae.eval().requires_grad_(False)
    return vae, set_scaling_factor(vae, config.seed), curve


def set_scaling_factor(vae: Any, seed: int) -> float:
    """SD's recipe: 1 / the std of latent means of fresh scenes, stored in the VAE's config."""
    with torch.no_grad():
        pixels, _ = sample_batch(random.Random(f"world-sd-vae-scale:{seed}"), 256)
        scale = 1.0 / float(vae.encode(pixels).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(scale, 5))
    return round(scale, 5)


# --- stage 2: the UNet -----------------------------------------------------------------------------------


class _Encoder:
    """Captions -> frozen text-tower hidden states (B, 32, width), with the pipeline's own tokenizer."""

    def __init__(self, text_encoder: Any, tokenizer: Any) -> None:
        self.text_encoder, self.tokenizer = text_encoder, tokenizer

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(captions, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]


def snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights for epsilon prediction: min(SNR, gamma) / SNR (Hang et al., 2023)."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr if gamma > 0 else torch.ones_like(snr)


def training_noise(latents: torch.Tensor, offset: float) -> torch.Tensor:
    """Gaussian noise for ``latents`` plus ``offset`` x one Gaussian per sample and channel (Guttenberg's noise offset).

    SD's schedule leaves 7 % of the image in the noisiest step (``sqrt(alphas_cumprod[-1])`` = 0.068). On a
    16 x 16 latent the per-channel mean of pure noise varies by only 1/16, so without an offset the UNet learns
    to read a flat background from the channel means of the noised latent, and at sampling time the prompt's
    background loses to the random mean of the seed. The offset makes those means noise the model must not trust.
    """
    noise = torch.randn_like(latents)
    if offset:
        noise = noise + offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1)
    return noise


def train_unet(config: SdTrainConfig, vae: Any, encode: _Encoder, work: Path,
               say: Callable[[str], None] = print) -> tuple[Any, dict[str, Any]]:
    """Train the UNet (resuming from ``work``'s checkpoint); return the EMA UNet and the run's record."""
    from diffusers import DDPMScheduler

    torch.manual_seed(config.seed)
    unet = build_unet(config.preset)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=1e-2)
    state = {"step": 0, "curve": [], "seconds": 0.0, "rng": None, "torch_rng": None}
    ckpt = work / "unet.pt"
    if ckpt.exists():
        saved = torch.load(ckpt, map_location="cpu", weights_only=False)
        unet.load_state_dict(saved["unet"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        say(f"resumed at step {state['step']}")
    rng = random.Random(f"world-sd-unet:{config.seed}")
    if state["rng"] is not None:
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
    sched = DDPMScheduler(**SD_BETAS)
    acp = sched.alphas_cumprod
    empty = encode([""])
    scale = float(vae.config.scaling_factor)
    start = time.perf_counter() - state["seconds"]
    step = state["step"]
    while step < config.steps and not (config.minutes and time.perf_counter() - start > config.minutes * 60):
        for g in opt.param_groups:
            g["lr"] = config.lr * lr_factor(step, config.warmup, config.steps)
        pixels, captions = sample_batch(rng, config.batch_size)
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * scale
            text = encode(captions)
            drop = torch.rand(len(captions)) < config.cfg_dropout
            text[drop] = empty[0]
        noise = training_noise(latents, config.noise_offset)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(captions),))
        pred = unet(sched.add_noise(latents, noise, t), t, text).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * snr_weights(acp, t, config.min_snr_gamma)).mean()
        if not torch.isfinite(loss):
            raise SelmaError(f"world-sd training diverged at step {step} (loss {float(loss)}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(config.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)
        if step % config.log_every == 0:
            state["curve"].append({"step": step, "loss": round(per.mean().item(), 5)})
            elapsed = time.perf_counter() - start
            say(f"unet step {step}/{config.steps}  loss {per.mean().item():.4f}  {step * config.batch_size / elapsed:.1f} samples/s")
        if step % config.checkpoint_every == 0:
            state.update(step=step, seconds=time.perf_counter() - start, rng=rng.getstate(), torch_rng=torch.get_rng_state())
            _save_checkpoint(ckpt, {"unet": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                                    "state": state})
    state.update(step=step, seconds=time.perf_counter() - start)
    return ema.eval(), {"steps": step, "seconds": round(state["seconds"], 1), "curve": state["curve"],
                        "samples": step * config.batch_size}


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


# --- the whole run ---------------------------------------------------------------------------------------


def train_world_sd(config: SdTrainConfig, out: str | os.PathLike[str], *, vae_from: str | os.PathLike[str] | None = None,
                   force: bool = False, say: Callable[[str], None] = print) -> Path:
    """Train (or resume) and write the diffusers folder ``out``. ``vae_from``: reuse that world-sd folder's VAE."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    out = Path(out)
    _check_target(out, force)
    work = out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        record: dict[str, Any] = {"made_by": MADE_BY, "config": asdict(config), "mix": BASE_MIX,
                                  "torch": torch.__version__}
        if vae_from:
            vae = AutoencoderKL.from_pretrained(Path(vae_from) / "vae", torch_dtype=torch.float32).eval().requires_grad_(False)
            source = Path(vae_from) / RECORD_FILE
            kept = json.loads(source.read_text()).get("vae", {}) if source.is_file() else {}
            record["vae"] = {**kept, "from": str(vae_from), "scaling_factor": float(vae.config.scaling_factor)}
        elif (work / VAE_FILE).exists():
            vae = torch.load(work / VAE_FILE, map_location="cpu", weights_only=False)
            record["vae"] = {"resumed": True, "scaling_factor": float(vae.config.scaling_factor)}
        else:
            t0 = time.perf_counter()
            vae, scale, curve = train_vae(config, say)
            _save_checkpoint(work / VAE_FILE, vae)
            record["vae"] = {"scaling_factor": scale, "curve": curve, "seconds": round(time.perf_counter() - t0, 1)}
        text_encoder = load_text_encoder(WORLD_CLIP)
        from .sd_model import write_tokenizer

        tok_dir = write_tokenizer(work / "tokenizer") if not (work / "tokenizer").exists() else work / "tokenizer"
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        unet, record["unet"] = train_unet(config, vae, _Encoder(text_encoder, tokenizer), work, say)
        _publish(out, unet, vae, text_encoder, record)
        shutil.rmtree(work, ignore_errors=True)
        return out
    finally:
        torch.set_num_threads(threads)


def _check_target(out: Path, force: bool) -> None:
    check_target(out, force, RECORD_FILE, MADE_BY, "world-sd")


def _publish(out: Path, unet: Any, vae: Any, text_encoder: Any, record: dict[str, Any]) -> None:
    def fill(tmp: Path) -> None:
        save_pipeline(tmp, unet, vae, text_encoder)
        atomic_write_json(tmp / RECORD_FILE, record)

    publish_folder(out, fill)
