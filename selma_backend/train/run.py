"""Stage 4 entry point: train one LoRA expert per dataset on one loaded base model.

``train_experts(model, [dataset, ...], out_dir, TrainConfig(...))`` checks every input before the
first GPU minute (datasets readable and non-empty, output names free, no unfinished run silently
restarted), loads the base once, fills the shared latent/text cache, then for each dataset attaches
a fresh adapter, trains (resumable), exports ``out_dir/<name>.safetensors`` and removes the adapter.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import SelmaError, invalid
from ..lora.format import provenance
from ..models.base import LoadedPipeline
from ..models.config import ModelConfig
from ..paths import slug
from ..render.shard import Shard
from . import checkpoint as ckpt
from .cache import FeatureCache, default_cache_root
from .config import TrainConfig
from .data import Sample, load_samples
from .loop import OnLog, Run, ShouldStop, train_loop
from .model import attach, dataset_hash, detach, export_lora, named_lora_params, text_encoders

Progress = Callable[[int, int], None]

#: cuDNN picks its fastest convolution algorithms for each new shape while training (benchmarks may switch it off).
CUDNN_BENCHMARK = True


@dataclass
class Expert:
    """One planned expert: where its data is, what it is called, where its file and state go."""

    dataset: Path
    name: str
    out: Path
    work_dir: Path
    samples: list[Sample] = field(default_factory=list)


@dataclass
class ExpertResult:
    name: str
    dataset: str
    path: str | None  # the LoRA file; None when stopped before the end
    steps: int
    stopped: bool
    skipped: bool  # already finished by an earlier run (resume)
    samples: int
    samples_per_s: float
    work_dir: str
    loss_plot: str | None
    final_loss: float | None
    cache: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(datasets: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], config: TrainConfig, *,
         names: Sequence[str] | None = None, work_root: str | os.PathLike[str] | None = None,
         resume: bool = False, overwrite: bool = False, user_dir: str | os.PathLike[str] | None = None) -> list[Expert]:
    """Check everything that can be checked without a model; raise before any work is done."""
    if not datasets:
        raise invalid("datasets", list(datasets), "at least one dataset folder")
    if names is not None and len(names) != len(datasets):
        raise invalid("names", list(names), f"one name per dataset ({len(datasets)})")
    out = Path(out_dir)
    experts = []
    for k, d in enumerate(datasets):
        path = Path(d)
        if not path.is_dir():
            raise invalid("datasets", str(d), "existing dataset folders (with metadata.jsonl)")
        samples = load_samples(path, resolution=config.resolution or 512, buckets=config.buckets, flip=config.flip,
                               user_dir=user_dir)
        name = slug(names[k]) if names is not None else _name(path, samples)
        work = Path(work_root) / name if work_root is not None else out / f"{name}.train"
        experts.append(Expert(path, name, out / f"{name}.safetensors", work, samples))
    seen: dict[str, Path] = {}
    for e in experts:
        if e.name in seen:
            raise invalid("datasets", [str(seen[e.name]), str(e.dataset)], "datasets of different skills",
                          f"both would be written to {e.out.name}; merge them into one folder or pass names")
        seen[e.name] = e.dataset
        _check_outputs(e, resume, overwrite)
    return experts


def _name(path: Path, samples: list[Sample]) -> str:
    skills = {s.skill for s in samples if s.skill}
    return slug(skills.pop()) if len(skills) == 1 else slug(path.name)


def _check_outputs(e: Expert, resume: bool, overwrite: bool) -> None:
    if e.out.exists() and not (resume or overwrite):
        raise SelmaError(f"{e.out} exists; an expert is never overwritten silently. Pass overwrite (--overwrite) to "
                         "replace it, resume (--resume) to skip finished experts, or choose another output folder")
    if ckpt.checkpoints(e.work_dir) and not (resume or overwrite):
        raise SelmaError(f"{e.work_dir} holds checkpoints of an unfinished run; pass resume (--resume) to continue it, "
                         "or overwrite (--overwrite) to start again from scratch")


def weight_dtype(config: TrainConfig, device: torch.device) -> torch.dtype:
    """The dtype of the frozen base during training (LoRA weights are always fp32)."""
    choice = config.mixed_precision
    if choice == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[choice]


def use_autocast(config: TrainConfig, wdtype: torch.dtype) -> bool:
    """Whether the UNet runs under autocast while training (never with fp32 weights; see ``TrainConfig.autocast``)."""
    if wdtype == torch.float32 or config.autocast == "off":
        return False
    return config.autocast == "on" or wdtype == torch.float16


def train_experts(model: LoadedPipeline | ModelConfig, datasets: Sequence[str | os.PathLike[str]],
                  out_dir: str | os.PathLike[str], config: TrainConfig, *, names: Sequence[str] | None = None,
                  work_root: str | os.PathLike[str] | None = None, resume: bool = False, overwrite: bool = False,
                  cache_root: str | os.PathLike[str] | None = None, shard: Shard | None = None,
                  progress: Progress | None = None, on_log: OnLog | None = None, should_stop: ShouldStop | None = None,
                  user_dir: str | os.PathLike[str] | None = None, fused_lora: bool = True) -> list[ExpertResult]:
    """Train one expert per dataset; see the module doc. A ``ModelConfig`` is loaded here and released
    at the end; a given ``LoadedPipeline`` is left loaded (the caller owns it). ``fused_lora=False``
    runs PEFT's own LoRA layers instead of :mod:`.fused_lora` (same result; for benchmarks)."""
    from ..models.loader import load_pipeline

    shard = shard or Shard()
    owned = isinstance(model, ModelConfig)
    lp = load_pipeline(model) if owned else model
    if lp.pipe is None:
        raise SelmaError("the model was released; load it again before training")
    try:
        config = config.resolved(lp.arch)
        experts = plan(datasets, out_dir, config, names=names, work_root=work_root, resume=resume,
                       overwrite=overwrite, user_dir=user_dir)
        with torch.inference_mode(False), torch.enable_grad():
            return _train_all(lp, experts, config, cache_root, shard, resume, overwrite, progress, on_log, should_stop,
                              fused_lora)
    finally:
        if owned:
            lp.release()


def _train_all(lp: LoadedPipeline, experts: list[Expert], config: TrainConfig, cache_root: Any, shard: Shard,
               resume: bool, overwrite: bool, progress: Progress | None, on_log: OnLog | None,
               should_stop: ShouldStop | None, fused_lora: bool) -> list[ExpertResult]:
    pipe = lp.pipe
    _place(pipe, shard)
    for module in (pipe.unet, pipe.vae, *text_encoders(pipe).values()):
        leave_inference_mode(module)
    wdtype = weight_dtype(config, pipe.unet.device)
    for module in (pipe.unet, *text_encoders(pipe).values()):
        if module.dtype != wdtype:
            module.to(wdtype)
    cache = FeatureCache(cache_root or default_cache_root(), lp.model_hash, wdtype)
    total = config.steps * len(experts)
    results: list[ExpertResult] = []
    for k, e in enumerate(experts):
        if resume and e.out.exists() and _same_run(e, config, e.out):
            results.append(ExpertResult(e.name, str(e.dataset), str(e.out), config.steps, False, True, len(e.samples),
                                        0.0, str(e.work_dir), _plot(e), None))
            continue
        if shard.is_main:
            _clear_other_runs(e, config, resume, overwrite)
        shard.barrier()
        if shard.is_main:
            cache.fill(pipe, lp.arch, e.samples, text=not config.text_encoder_lora)
        shard.barrier()
        if shard.world > 1:
            cache.refresh()  # shards rank 0 wrote
        result = _train_one(lp, e, config, cache, wdtype, shard, resume, overwrite,
                            _offset(progress, k * config.steps, total), on_log, should_stop, fused_lora)
        results.append(result)
        if result.stopped:
            break
    return results


def _train_one(lp: LoadedPipeline, e: Expert, config: TrainConfig, cache: FeatureCache, wdtype: torch.dtype,
               shard: Shard, resume: bool, overwrite: bool, progress: Progress | None, on_log: OnLog | None,
               should_stop: ShouldStop | None, fused_lora: bool) -> ExpertResult:
    pipe = lp.pipe
    attach(pipe, config, fused=fused_lora)
    layout = config.memory_format == "channels_last"
    benchmark = torch.backends.cudnn.benchmark
    try:
        if config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        if layout:
            pipe.unet.to(memory_format=torch.channels_last)
        if config.compile:
            pipe.unet.compile()
        torch.backends.cudnn.benchmark = CUDNN_BENCHMARK  # the shapes repeat every step (a few with buckets)
        run = Run(pipe, lp.arch, lp.prediction_type, e.samples, config, cache, e.work_dir, named_lora_params(pipe),
                  shard, wdtype, not config.text_encoder_lora, _with_progress(on_log, progress, e.name), should_stop,
                  channels_last=layout, autocast=use_autocast(config, wdtype))
        res = train_loop(run, resume)
        path = None
        if not res.stopped and shard.is_main:
            prov = {"skill": e.name, "dataset": str(e.dataset), "dataset_sha256": dataset_hash(e.samples),
                    "samples": len(e.samples), "base_model": Path(lp.source).name, "base_model_sha256": lp.model_hash,
                    "arch": lp.arch, "prediction_type": lp.prediction_type, "steps": res.steps,
                    "config": config.to_dict(), "selma_version": __version__, "kind": "expert"}
            path = str(export_lora(pipe, lp.arch, e.out, config, prov, overwrite=overwrite))
        shard.barrier()
    finally:
        torch.backends.cudnn.benchmark = benchmark
        if layout:
            pipe.unet.to(memory_format=torch.contiguous_format)
        if config.gradient_checkpointing:
            pipe.unet.disable_gradient_checkpointing()
        detach(pipe)
    final = res.log[-1]["loss"] if res.log else None
    return ExpertResult(e.name, str(e.dataset), path, res.steps, res.stopped, False, len(e.samples),
                        res.samples_per_s, str(e.work_dir), _plot(e), final, dict(cache.stats))


def _same_run(e: Expert, config: TrainConfig, out: Path | None) -> bool:
    """Whether the finished file ``out`` (or, with None, the newest checkpoint) was made from this
    dataset with this config. For a file, also False when it has no SELMA provenance."""
    if out is None:
        snap = ckpt.checkpoints(e.work_dir)
        if not snap:
            return False
        import json

        state = json.loads((snap[-1] / "state.json").read_text(encoding="utf-8"))
        return _recipe(state.get("config")) == _recipe(config.to_dict())
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        prov = provenance(f.metadata() or {})
    return (prov.get("dataset_sha256") == dataset_hash(e.samples)
            and _recipe(prov.get("config")) == _recipe(config.to_dict()))


#: Settings of how a run executes, not of what it learns: a run may resume with them changed (say, to
#: turn on gradient checkpointing after running out of memory), and older runs that lack one still match.
RUNTIME_FIELDS = ("autocast", "memory_format", "compile", "gradient_checkpointing", "checkpoint_every",
                  "keep_checkpoints", "validation_every", "validation_prompts", "validation_steps")


def _recipe(config: Any) -> dict[str, Any] | None:
    if not isinstance(config, dict):
        return None
    return {k: v for k, v in config.items() if k not in RUNTIME_FIELDS}


def _clear_other_runs(e: Expert, config: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Before training ``e``: a finished file or checkpoints of a *different* run are an error, unless
    ``overwrite`` (then the checkpoints go; the file is replaced at export)."""
    other_file = e.out.exists() and (not resume or not _same_run(e, config, e.out))
    has_ckpt = bool(ckpt.checkpoints(e.work_dir))
    other_ckpt = has_ckpt and (not resume or not _same_run(e, config, None))
    if (other_file or other_ckpt) and not overwrite:
        what = e.out if other_file else e.work_dir / "checkpoints"
        raise SelmaError(f"{what} comes from a run with other data or settings; an expert is never overwritten "
                         "silently. Pass overwrite (--overwrite) to train it again from scratch, or use another output folder")
    if other_ckpt or (overwrite and not resume):
        shutil.rmtree(e.work_dir / "checkpoints", ignore_errors=True)


def _plot(e: Expert) -> str | None:
    p = e.work_dir / "loss.png"
    return str(p) if p.is_file() else None


def leave_inference_mode(module: torch.nn.Module) -> int:
    """Replace weights created under ``torch.inference_mode`` (ComfyUI runs nodes in it) by normal copies,
    which autograd may save for backward; returns how many were replaced."""
    n = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is not None and t.is_inference():
                        copy = t.detach().clone()
                        store[name] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) if store is m._parameters else copy
                        n += 1
    return n


def _place(pipe: Any, shard: Shard) -> None:
    """Each process of a multi-GPU run on its own GPU (``LOCAL_RANK``)."""
    if shard.world > 1 and torch.cuda.is_available():
        pipe.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", shard.rank))))


def _offset(progress: Progress | None, base: int, total: int) -> Progress | None:
    if progress is None:
        return None
    return lambda done, _n: progress(base + done, total)


def _with_progress(on_log: OnLog | None, progress: Progress | None, name: str) -> OnLog | None:
    if on_log is None and progress is None:
        return None

    def log(info: dict[str, Any]) -> None:
        if progress is not None:
            progress(info["step"], info["steps"])
        if on_log is not None:
            on_log({**info, "expert": name})

    return log
