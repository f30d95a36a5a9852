"""The training loop of one expert: prepare -> run -> (checkpoint | stop | finish).

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` samples (the *global* batch: with
W processes each takes ``batch_size / W`` of it). Everything random in step ``s`` comes from
generators seeded by (seed, s): noise and timesteps from one CPU generator shared by all processes
(each takes its slice), dropout from the global generator seeded by (seed, s, rank). So a resumed
run replays exactly the steps an uninterrupted one would take, and W processes see the same noise
as one process with the same global batch. Gradients are summed across processes (each process's
loss is its share of the global mean), which is what one process computes.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SelmaError
from ..fsio import atomic_write_bytes, atomic_write_text
from ..registry import Registry
from ..render.shard import Shard
from . import checkpoint as ckpt
from .cache import FeatureCache
from .config import LR_SCHEDULE_REGISTRY, TrainConfig
from .data import Sample, View, epoch_batches, loss_weights
from .encode import add_time_ids, encode_text
from .plot import grid, loss_plot, png_bytes

OnLog = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]


class TrainingDiverged(SelmaError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class Run:
    """Everything one expert's loop needs (built by ``run.py``)."""

    pipe: Any
    arch: str
    prediction: str
    samples: list[Sample]
    config: TrainConfig  # resolved: no None left
    cache: FeatureCache
    work_dir: Path
    params: dict[str, torch.nn.Parameter]
    shard: Shard = field(default_factory=Shard)
    weight_dtype: torch.dtype = torch.float32
    cached_text: bool = True
    on_log: OnLog | None = None
    should_stop: ShouldStop | None = None
    channels_last: bool = False  # the UNet and its input in the channels-last layout
    autocast: bool = False  # the UNet under autocast in ``weight_dtype`` (``run.use_autocast``)


@dataclass
class LoopResult:
    steps: int
    stopped: bool
    log: list[dict[str, float]]
    samples_per_s: float
    checkpoint: Path | None


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, machines and processes)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) % (2**63 - 1)
    return h


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), ``(B,)``: ``min(SNR, gamma) / SNR`` for epsilon
    prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction; all ones when ``gamma == 0``."""
    if gamma <= 0:
        return torch.ones(timesteps.shape, dtype=torch.float32)
    a = alphas_cumprod.float()[timesteps.cpu()]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if prediction == "v_prediction" else clipped / snr


def clip_gradients(params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most ``max_norm`` (0: leave them); returns the
    norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in grads]))) if grads else 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm))


def _adamw(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """torch's AdamW, its fused kernel where it has one (fp32 parameters on CPU or CUDA: one kernel a
    parameter instead of a dozen small ops; the same update up to float rounding)."""
    fused = bool(params) and all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def _adamw8bit(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if not torch.cuda.is_available():
        raise SelmaError("optimizer: got 'adamw8bit'; allowed here: 'adamw'. bitsandbytes' 8-bit AdamW runs on "
                         "NVIDIA GPUs only and this machine has no CUDA device")
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise SelmaError("optimizer: got 'adamw8bit', which needs the bitsandbytes package: pip install bitsandbytes "
                         "(or use 'adamw')") from e
    return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)


#: Optimizers: name -> factory(params, config). The config's choices are these names.
OPTIMIZER_REGISTRY: Registry[Callable[[Sequence[torch.nn.Parameter], TrainConfig], torch.optim.Optimizer]] = Registry("optimizer")
OPTIMIZER_REGISTRY.add("adamw", _adamw)
OPTIMIZER_REGISTRY.add("adamw8bit", _adamw8bit)


def make_optimizer(params: Sequence[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZER_REGISTRY.get(config.optimizer)(params, config)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(LR_SCHEDULE_REGISTRY.get(config.lr_schedule), optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.steps)


class _Loop:
    def __init__(self, run: Run) -> None:
        from diffusers import DDPMScheduler

        self.run, self.cfg = run, run.config
        self.params = list(run.params.values())
        self.noise_scheduler = DDPMScheduler.from_config(run.pipe.scheduler.config)
        self.optimizer = make_optimizer(self.params, self.cfg)
        self.schedule = make_schedule(self.optimizer, self.cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=run.weight_dtype == torch.float16)
        self.weights = loss_weights(run.samples, self.cfg.score_weighting)
        self.pos, self.log = ckpt.Position(), []
        self._epoch: tuple[int, list[list[View]]] | None = None
        self.device = run.pipe.unet.device
        self.last_checkpoint: Path | None = None

    # -- state ---------------------------------------------------------------------------------

    def resume(self) -> bool:
        if self.run.shard.is_main:
            ckpt.remove_debris(self.run.work_dir)
        snap = ckpt.load_latest(self.run.work_dir)
        if snap is None:
            return False
        ckpt.restore_params(self.run.params, snap.params, snap.path)
        self.optimizer.load_state_dict(snap.optim["optimizer"])
        self.schedule.load_state_dict(snap.optim["schedule"])
        self.scaler.load_state_dict(snap.optim["scaler"])
        self.pos, self.log, self.last_checkpoint = snap.position, snap.log, snap.path
        return True

    def save(self) -> None:
        if self.run.shard.is_main:
            optim = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                     "scaler": self.scaler.state_dict()}
            snap = ckpt.Snapshot(ckpt.Position(self.pos.step, self.pos.epoch, self.pos.batch), dict(self.run.params),
                                 optim, self.log, self.cfg.to_dict())
            self.last_checkpoint = ckpt.save(self.run.work_dir, snap, self.cfg.keep_checkpoints)
            self.write_log()
        self.run.shard.barrier()

    # -- data ----------------------------------------------------------------------------------

    def next_batch(self) -> list[View]:
        while True:
            if self._epoch is None or self._epoch[0] != self.pos.epoch:
                self._epoch = (self.pos.epoch, epoch_batches(self.run.samples, self.cfg.batch_size, self.cfg.seed,
                                                             self.pos.epoch))
            batches = self._epoch[1]
            if self.pos.batch < len(batches):
                self.pos.batch += 1
                return batches[self.pos.batch - 1]
            self.pos.epoch, self.pos.batch = self.pos.epoch + 1, 0

    # -- one step ------------------------------------------------------------------------------

    def micro(self, views: list[View], gen: torch.Generator) -> torch.Tensor:
        """Forward and backward of one global micro-batch; returns this process's share of the mean loss."""
        run, cfg = self.run, self.cfg
        n = len(views)
        w, h = run.samples[views[0][0]].size
        f = int(getattr(run.pipe, "vae_scale_factor", 8))  # 8 for SD's VAE; the world model's VAE is 4
        noise = torch.randn((n, run.pipe.unet.config.in_channels, h // f, w // f), generator=gen)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((n, 4, 1, 1), generator=gen)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=gen)
        lo, hi = run.shard.rank * n // run.shard.world, (run.shard.rank + 1) * n // run.shard.world
        local, noise, t = views[lo:hi], noise[lo:hi].to(self.device), t[lo:hi].to(self.device)
        latents = run.cache.latents(run.samples, local).to(self.device)
        captions = [run.samples[i].caption_for(f) for i, f in local]
        if run.cached_text:
            embeds, pooled = run.cache.text(captions, pooled=run.arch == "sdxl")
        else:
            embeds, pooled = encode_text(run.pipe, run.arch, captions)
        noisy = self.noise_scheduler.add_noise(latents, noise, t).to(run.weight_dtype)
        if run.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        target = noise if run.prediction == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, t)
        extra = None
        if run.arch == "sdxl":
            extra = {"text_embeds": pooled.to(self.device, run.weight_dtype),
                     "time_ids": add_time_ids([run.samples[i].size for i, _ in local], self.device).to(run.weight_dtype)}
        with torch.autocast(self.device.type, dtype=run.weight_dtype, enabled=run.autocast):
            pred = run.pipe.unet(noisy, t, embeds.to(self.device, run.weight_dtype),
                                 added_cond_kwargs=extra).sample
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        weight = min_snr_weights(self.noise_scheduler.alphas_cumprod, t, cfg.min_snr_gamma, run.prediction)
        weight = weight * torch.tensor([self.weights[i] for i, _ in local])
        loss = (per_sample * weight.to(per_sample.device)).sum() / n
        self.scaler.scale(loss / cfg.grad_accum).backward()
        return loss.detach().float().cpu()

    def step(self) -> float:
        cfg, shard = self.cfg, self.run.shard
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(mix(cfg.seed, self.pos.step))
        torch.manual_seed(mix(cfg.seed, self.pos.step, shard.rank + 1))  # dropout
        total = torch.zeros(())
        for _ in range(cfg.grad_accum):
            total += self.micro(self.next_batch(), gen)
        if shard.world > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
        loss = float(total) / cfg.grad_accum
        if not math.isfinite(loss):
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {loss} at step {self.pos.step + 1}; training stopped ({where}). "
                                   "Lower the learning rate, turn on gradient clipping (max_grad_norm) or use bf16/fp32")
        self.scaler.unscale_(self.optimizer)
        norm = clip_gradients(self.params, cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pos.step += 1
        self.log.append({"step": self.pos.step, "loss": loss, "lr": self.schedule.get_last_lr()[0], "grad_norm": norm,
                         "seconds": time.perf_counter() - start})
        return loss

    # -- outputs -------------------------------------------------------------------------------

    def write_log(self) -> None:
        if not self.run.shard.is_main:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["step", "loss", "lr", "grad_norm", "seconds"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.log)
        atomic_write_text(self.run.work_dir / "loss.csv", buf.getvalue())
        img = loss_plot([r["step"] for r in self.log], [r["loss"] for r in self.log])
        atomic_write_bytes(self.run.work_dir / "loss.png", png_bytes(img))

    @torch.no_grad()
    def validate(self) -> Path | None:
        run, cfg = self.run, self.cfg
        if not run.shard.is_main or not cfg.validation_prompts:
            return None
        unet = run.pipe.unet
        unet.eval()
        try:
            gens = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(cfg.validation_prompts))]
            # always under autocast with half weights: inference, and the VAE may have kept another dtype
            with torch.autocast(self.device.type, dtype=run.weight_dtype, enabled=run.weight_dtype != torch.float32):
                images = run.pipe(prompt=list(cfg.validation_prompts), num_inference_steps=cfg.validation_steps,
                                  height=cfg.resolution, width=cfg.resolution, generator=gens).images
        finally:
            unet.train()
        path = run.work_dir / "validation" / f"step-{self.pos.step:06d}.png"
        atomic_write_bytes(path, png_bytes(grid(images, list(cfg.validation_prompts)), {"step": self.pos.step}))
        return path


def train_loop(run: Run, resume: bool) -> LoopResult:
    """Train until ``config.steps`` optimizer steps are done (from the last checkpoint if ``resume``),
    or until ``should_stop()`` (then a checkpoint is written). Raises :class:`TrainingDiverged`."""
    loop = _Loop(run)
    if resume:
        loop.resume()
    cfg = run.config
    run.pipe.unet.train()
    start, first = time.perf_counter(), loop.pos.step
    stopped = False
    while loop.pos.step < cfg.steps:
        if run.should_stop is not None and run.should_stop():
            stopped = True
            loop.save()
            break
        loss = loop.step()
        if run.on_log is not None:
            run.on_log({"step": loop.pos.step, "steps": cfg.steps, "loss": loss, "lr": loop.log[-1]["lr"]})
        if loop.pos.step % cfg.checkpoint_every == 0 or loop.pos.step == cfg.steps:
            loop.save()
        if cfg.validation_every and (loop.pos.step % cfg.validation_every == 0 or loop.pos.step == cfg.steps):
            loop.validate()
    if not stopped:
        loop.write_log()
    elapsed = time.perf_counter() - start
    done = loop.pos.step - first
    rate = done * cfg.effective_batch / elapsed if elapsed > 0 and done else 0.0
    return LoopResult(loop.pos.step, stopped, loop.log, rate, loop.last_checkpoint)
