"""GPU benchmark of stage-4 training: full-size SD 1.5 (512 px) and SDXL (1024 px), random weights.

Speed does not depend on the weights, so both architectures are built from their published configs
(``gpu_render.build``). For each: samples/s of our trainer (latents and text cached, bf16 base, fp32
LoRA, SELMA's attention targets at rank 128, SDPA, ``train.fused_lora``'s layers or, with
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


def measure(arch: str, toy: bool, device: str, batch: int, steps: int, peak: float | None,
            compile_unet: bool = False, fused_lora: bool = True) -> dict[str, Any]:
    import torch

    from selma_backend.models.base import LoadedPipeline
    from selma_backend.train import TrainConfig, train_experts

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    pipe = gpu_render.build(arch, toy, device, dtype)
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    unet_flops, _ = gpu_render.count_flops(pipe, arch, device, dtype)
    lp = LoadedPipeline(pipe, "sdxl" if arch == "sdxl" else "sd1", "epsilon", f"random-{arch}", "gpu_train.py")
    sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
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
