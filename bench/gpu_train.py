"""GPU benchmark of stage-4 training: full-size SD 1.5 (512 px) and SDXL (1024 px), random weights.

Speed does not depend on the weights, so both architectures are built from their published configs
(``gpu_render.build``). For each: samples/s of our trainer (latents and text cached, bf16 throughout, fp32
LoRA parameters, SELMA's attention targets at rank 128, SDPA, ``train.fused_lora``'s layers or, with
``--peft-lora``, PEFT's own) and of the reference loop that re-encodes VAE and
text every step (``bench_train.reference``), same batch, steps, noise and timesteps; peak GPU memory
of each; and the share of the FLOP bound, with

    training FLOPs per sample ~= 2 x UNet forward FLOPs (forward + the input-gradient backward;
    LoRA weight gradients are a rounding error at rank 128)

counted by ``torch.utils.flop_counter`` at the real size. Target: >= 200 samples/s for SD 1.5 at 512 px
on an H200.

    python bench/gpu_train.py                     # on the GPU machine; JSON to $OUT/gpu_train.json
    python bench/gpu_train.py --toy               # tiny widths on CPU: checks the script works
    python bench/gpu_train.py --arch sd15 --batch 32 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import bench_train  # noqa: E402
import gpu_render  # noqa: E402

RES = {"sd15": 512, "sdxl": 1024}


def _model(arch: str, toy: bool, device: str) -> tuple[Any, int, float, Any]:
    """The architecture with random weights as a LoadedPipeline, its resolution, UNet forward FLOPs, a device sync."""
    import torch

    from selma_backend.models.base import LoadedPipeline

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pipe = gpu_render.build(arch, toy, device, dtype)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    unet_flops, _ = gpu_render.count_flops(pipe, arch, device, dtype)
    lp = LoadedPipeline(pipe, "sdxl" if arch == "sdxl" else "sd1", "epsilon", f"random-{arch}", "gpu_train.py")
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    return lp, res, unet_flops, sync


def measure(arch: str, toy: bool, device: str, batch: int, steps: int, peak: float | None,
            compile_unet: bool = False, fused_lora: bool = True) -> dict[str, Any]:
    from selma_backend.train import TrainConfig, train_experts

    lp, res, unet_flops, sync = _model(arch, toy, device)
    with tempfile.TemporaryDirectory(prefix="selma-gpu-train-") as tmp:
        data = bench_train.make_data(Path(tmp) / "data", 2 * batch, res)
        cfg = TrainConfig(rank=4 if toy else 128, alpha=4 if toy else 128, steps=steps, batch_size=batch, grad_accum=1,
                          resolution=res, flip="never", buckets=False, checkpoint_every=100_000,
                          mixed_precision="no" if device == "cpu" else "bf16", compile=compile_unet)
        warm = TrainConfig(**{**cfg.to_dict(), "steps": 2})
        bench_train.reference(lp, data, warm, sync)
        train_experts(lp, [data], Path(tmp) / "warm", warm, cache_root=Path(tmp) / "cache")  # fills the cache
        _reset_peak(device)
        t_ref, _ = bench_train.reference(lp, data, cfg, sync)
        mem_ref = _peak(device)
        _reset_peak(device)
        t_ours, total, _ = bench_train.ours(lp, data, cfg, Path(tmp) / "ours", fused_lora=fused_lora)
        mem_ours = _peak(device)
        import csv

        secs = [float(r["seconds"]) for r in csv.DictReader(open(Path(tmp) / "ours" / "out" / "countbench.train" / "loss.csv"))]
    ours, ref = steps * batch / t_ours, steps * batch / t_ref
    steady = (len(secs) - 1) * batch / sum(secs[1:]) if len(secs) > 1 else ours  # without step 1 (compilation)
    bound = peak * 1e12 / (2 * unet_flops) if peak else None
    return {"arch": arch, "resolution": res, "batch": batch, "steps": steps, "rank": cfg.rank,
            "ours_samples_per_s": ours, "reference_samples_per_s": ref, "ratio": ours / ref, "compile": compile_unet,
            "lora_layers": "fused" if fused_lora else "peft",
            "ours_after_first_step_samples_per_s": steady,
            "ours_with_export_samples_per_s": steps * batch / total,
            "peak_mem_gb_ours": mem_ours, "peak_mem_gb_reference": mem_ref,
            "unet_forward_gflops": unet_flops / 1e9,
            "flop_bound_samples_per_s": bound, "share_of_flop_bound": ours / bound if bound else None}


#: Training settings measured side by side by :func:`levers` (``bench/gpu.py --parts levers-*``): name -> TrainConfig fields,
#: plus ``cudnn_benchmark``, ``fused_lora``, ``sdpa`` (a torch SDPBackend name) and ``batch_factor``.
#: "before" is the trainer as it was until 2026-11-30 (autocast, contiguous layout, no cuDNN autotuning);
#: "no-autocast" is its default since.
LEVERS: dict[str, dict[str, Any]] = {
    "before": {"autocast": "on", "memory_format": "contiguous", "cudnn_benchmark": False},
    "cudnn-benchmark": {"autocast": "on", "memory_format": "contiguous"},
    "channels-last": {"autocast": "on", "memory_format": "channels_last"},
    "no-autocast": {"autocast": "off", "memory_format": "contiguous"},
    "no-autocast+channels-last": {"autocast": "off", "memory_format": "channels_last"},
    "no-autocast+channels-last, PEFT layers": {"autocast": "off", "memory_format": "channels_last", "fused_lora": False},
    "no-autocast+channels-last, cuDNN attention": {"autocast": "off", "memory_format": "channels_last",
                                                   "sdpa": "CUDNN_ATTENTION"},
    "no-autocast+channels-last, batch x2": {"autocast": "off", "memory_format": "channels_last", "batch_factor": 2},
    "no-autocast, flash attention": {"autocast": "off", "memory_format": "contiguous", "sdpa": "FLASH_ATTENTION"},
    "no-autocast, efficient attention": {"autocast": "off", "memory_format": "contiguous",
                                         "sdpa": "EFFICIENT_ATTENTION"},
    "no-autocast, PEFT layers": {"autocast": "off", "memory_format": "contiguous", "fused_lora": False},
}


def levers(arch: str, toy: bool, device: str, batch: int, steps: int, peak: float | None, names: list[str],
           compile_unet: bool = False, reference: bool = True, profile: str | None = None) -> dict[str, Any]:
    """Our trainer under each setting of ``LEVERS`` named in ``names``, one after another on one model:
    steady samples/s (without the first step), peak memory, the loss curve against the first arm's;
    then the reference loop, and a CUDA kernel profile of the arm named ``profile``. Each row is
    printed as it is measured (a part killed at its limit keeps them); an arm that fails records why."""
    import csv
    import time
    import traceback

    from selma_backend.train import TrainConfig, train_experts
    from selma_backend.train import run as train_run

    lp, res, unet_flops, sync = _model(arch, toy, device)
    bound = peak * 1e12 / (2 * unet_flops) if peak else None
    rows: list[dict[str, Any]] = []
    first_losses: list[float] | None = None
    with tempfile.TemporaryDirectory(prefix="selma-gpu-levers-") as tmp:
        factor = max(LEVERS[n].get("batch_factor", 1) for n in names)
        data = bench_train.make_data(Path(tmp) / "data", 2 * batch * factor, res)
        base = dict(rank=4 if toy else 128, alpha=4 if toy else 128, steps=steps, batch_size=batch, grad_accum=1,
                    resolution=res, flip="never", buckets=False, checkpoint_every=100_000,
                    mixed_precision="no" if device == "cpu" else "bf16", compile=compile_unet)
        train_experts(lp, [data], Path(tmp) / "warm", TrainConfig(**{**base, "steps": 1, "compile": False}),
                      cache_root=Path(tmp) / "cache")  # fills the cache
        for k, name in enumerate(names):
            lever = LEVERS[name]
            b = batch * lever.get("batch_factor", 1)
            cfg = TrainConfig(**{**base, "batch_size": b, **{f: v for f, v in lever.items()
                                                              if f in ("autocast", "memory_format")}})
            row: dict[str, Any] = {"arch": arch, "arm": name, "batch": b, "steps": steps, "compile": compile_unet,
                                   "resolution": res, "rank": cfg.rank}
            train_run.CUDNN_BENCHMARK = lever.get("cudnn_benchmark", True)
            ctx = _sdpa(lever.get("sdpa"))
            _reset_peak(device)
            t0 = time.perf_counter()
            try:
                with ctx:
                    r = train_experts(lp, [data], Path(tmp) / f"arm{k}", cfg, cache_root=Path(tmp) / "cache",
                                      fused_lora=lever.get("fused_lora", True))[0]
            except Exception as e:  # noqa: BLE001 (a bench arm: record, go on)
                row.update(status="failed", error=f"{type(e).__name__}: {e}"[:600], trace=traceback.format_exc()[-800:])
            else:
                log = list(csv.DictReader(open(Path(r.work_dir) / "loss.csv")))
                secs, losses = [float(x["seconds"]) for x in log], [float(x["loss"]) for x in log]
                steady = (len(secs) - 1) * b / sum(secs[1:]) if len(secs) > 1 else steps * b / sum(secs)
                row.update(status="ok", samples_per_s=steady, first_step_s=secs[0], call_s=time.perf_counter() - t0,
                           peak_mem_gb=_peak(device), losses=[round(x, 5) for x in losses],
                           share_of_flop_bound=steady / bound if bound else None)
                if b == batch:
                    if first_losses is None:
                        first_losses = losses
                    row["loss_max_rel_diff_vs_first_arm"] = max(abs(a - c) / abs(c) for a, c in zip(losses, first_losses, strict=True))
            finally:
                train_run.CUDNN_BENCHMARK = True
            rows.append(row)
            print(json.dumps(row), flush=True)
        out: dict[str, Any] = {"arch": arch, "device": device, "peak_bf16_tflops": peak,
                               "unet_forward_gflops": unet_flops / 1e9, "flop_bound_samples_per_s": bound, "runs": rows}
        if reference:
            cfg = TrainConfig(**base)
            bench_train.reference(lp, data, TrainConfig(**{**base, "steps": 1}), sync)
            t_ref, _ = bench_train.reference(lp, data, cfg, sync)
            out["reference_samples_per_s"] = steps * batch / t_ref
            print(json.dumps({"arm": "reference", "samples_per_s": out["reference_samples_per_s"]}), flush=True)
        if profile:
            try:
                arm = {f: v for f, v in LEVERS[profile].items() if f in ("autocast", "memory_format")}
                out["profile"] = _profile(lp, data, TrainConfig(**{**base, "steps": 3, **arm}), Path(tmp), device)
            except Exception as e:  # noqa: BLE001 (the rows above are what matters)
                out["profile"] = {"error": f"{type(e).__name__}: {e}"[:600]}
            print(json.dumps({"profile": profile, **{k: v for k, v in out["profile"].items() if k != "top"}}), flush=True)
    return out


def _sdpa(backend: str | None) -> Any:
    import contextlib

    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend))


#: Kernel-name patterns -> the share of device time they are grouped into by ``_profile``.
KERNEL_GROUPS = (("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated_fort_native_sdpa")),
                 ("convolution", ("conv", "implicit", "winograd", "dgrad", "wgrad", "fprop", "nchwtonhwc",
                                  "nhwctonchw")),
                 ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "matmul")),
                 ("normalization", ("norm", "welford")),
                 ("optimizer", ("adam", "multi_tensor")))


def _profile(lp: Any, data: Path, cfg: Any, tmp: Path, device: str) -> dict[str, Any]:
    """Device time of a 3-step training call by kernel, grouped (``KERNEL_GROUPS``), with the top 25 kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from selma_backend.train import train_experts

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts) as prof:
        train_experts(lp, [data], tmp / "profiled", cfg, cache_root=tmp / "cache")
    attr = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    kernels = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0
               and (not device.startswith("cuda") or e.device_type == torch.autograd.DeviceType.CUDA)]
    total = sum(getattr(e, attr) for e in kernels) or 1.0
    groups: dict[str, float] = {}
    for e in kernels:
        low = e.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in low for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + getattr(e, attr)
    top = sorted(kernels, key=lambda e: -getattr(e, attr))[:25]
    return {"device_ms": total / 1e3, "steps": cfg.steps, "groups": {g: round(v / total, 4) for g, v in sorted(groups.items())},
            "top": [{"kernel": e.key[:160], "ms": round(getattr(e, attr) / 1e3, 2), "calls": e.count,
                     "share": round(getattr(e, attr) / total, 4)} for e in top]}


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--toy", action="store_true", help="tiny widths on CPU")
    ap.add_argument("--batch", type=int, default=0, help="default: 32 (SDXL 8); --toy: 2")
    ap.add_argument("--steps", type=int, default=0, help="default 10; --toy: 2")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet in our arm")
    ap.add_argument("--peft-lora", action="store_true", help="our arm with PEFT's own LoRA layers (not train.fused_lora)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "gpu_train.json"))
    args = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.toy else "cpu"
    peak, peak_source = gpu_render.peak_for(device, args.peak_tflops)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "peak_bf16_tflops": peak,
               "peak_source": peak_source, "toy": args.toy, "runs": []}
    for arch in args.arch:
        batch = args.batch or (2 if args.toy else (8 if arch == "sdxl" else 32))
        steps = args.steps or (2 if args.toy else 10)
        row = measure(arch, args.toy, device, batch, steps, peak, args.compile, not args.peft_lora)
        results["runs"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
