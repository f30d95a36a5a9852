"""GPU benchmark of stage-2 rendering: full-size SD 1.5 and SDXL architectures with random weights.

Speed does not depend on the weights, so the models are built from their published configurations
(UNets below; VAE and text towers from the pack's bundled configs) directly on the device: nothing
is downloaded. For each architecture, compile off/on, and batch size (default 1, 8, 16): images/s of
the diffusers pipeline with a multi-prompt batch (bf16, SDPA attention, CFG, DPM++ 2M Karras) and
its share of the FLOP bound:

    FLOPs per image = steps x 2 (CFG: two UNet passes) x UNet FLOPs + VAE decode FLOPs

counted with ``torch.utils.flop_counter`` on the real modules at the real size (SD 1.5 UNet at
512 px: ~0.8 TFLOP a pass, the "803 GFLOP" figure). The bound is the device's dense bf16 peak
(from a table, or ``--peak-tflops``); a measured large bf16 matmul is reported beside it. At the
largest batch it also runs ``render_dataset`` end to end (PNG + caption + fsync + metadata), to
show what writing the dataset costs on top of the GPU work.

    python bench/gpu_render.py                 # on the GPU machine; JSON to $OUT/gpu_render.json
    python bench/gpu_render.py --toy           # tiny widths on CPU in ~20 s: checks the script works
    python bench/gpu_render.py --toy --compile on --arch sd15 --batches 1   # the compile path (~3 min on CPU)
    python bench/gpu_render.py --arch sd15 --batches 1 8 --compile off --json result.json

Budget on one H200 (estimate, not yet measured): compile off for both architectures ~3 min
(SDXL batch 16 at 1024 px, 20 steps: ~8 s a call); compile on adds a compilation per new batch
shape (minutes for SDXL). On a short lease run ``--compile off`` first, then
``--compile on --batches 1 16 --no-render-dataset``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

UNET = {
    "sd15": {  # runwayml/stable-diffusion-v1-5 unet/config.json
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32,
    },
    "sdxl": {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "cross_attention_dim": 2048, "norm_num_groups": 32,
    },
}
#: --toy: the same block structure at ~1/10 width and 64 px, so the script runs on a CPU in about a minute.
TOY_UNET = {
    "sd15": {"sample_size": 8, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 32},
    "sdxl": {"sample_size": 8, "block_out_channels": (32, 64, 64), "transformer_layers_per_block": (1, 1, 2),
             "attention_head_dim": (2, 4, 4), "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 32, "cross_attention_dim": 64},
}
TOY_TEXT = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
            "projection_dim": 32}
TOY_VAE = {"block_out_channels": (16, 16, 32, 32), "layers_per_block": 1, "norm_num_groups": 8}
#: Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 756.0,
                    "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2, "RTX 3090": 71.0}
SCHEDULER = "dpmpp_2m_karras"
CFG = 7.5


def build(arch: str, toy: bool, device: str, dtype: Any) -> Any:
    """The diffusers pipeline for ``arch`` with random weights, created on ``device`` in ``dtype``."""
    import diffusers
    import torch
    import transformers

    from selma_backend.models.configs import bundled_config
    from selma_backend.models.single_file import clip_tokenizer
    from selma_backend.render.schedulers import build_scheduler

    unet_cfg = {**UNET[arch], **(TOY_UNET[arch] if toy else {})}
    vae_cfg = {**bundled_config("vae_sd"), **(TOY_VAE if toy else {}), "sample_size": unet_cfg["sample_size"] * 8,
               "scaling_factor": 0.13025 if arch == "sdxl" else 0.18215}
    texts = [("clip_l_text", "CLIPTextModel", "<|endoftext|>")]
    if arch == "sdxl":
        texts.append(("openclip_bigg_text", "CLIPTextModelWithProjection", "!"))
    base = diffusers.EulerDiscreteScheduler.from_config(bundled_config("scheduler_sd"))
    scheduler = build_scheduler(SCHEDULER, base)  # outside the device context: schedulers keep CPU tensors
    with torch.device(device):
        torch.manual_seed(0)
        parts: dict[str, Any] = {"unet": diffusers.UNet2DConditionModel(**unet_cfg),
                                 "vae": diffusers.AutoencoderKL(**vae_cfg), "scheduler": scheduler}
        for i, (name, cls, pad) in enumerate(texts):
            suffix = "" if i == 0 else "_2"
            cfg = {**bundled_config(name), **(TOY_TEXT if toy else {})}
            config = transformers.CLIPTextConfig(**cfg, attn_implementation="sdpa")
            parts[f"text_encoder{suffix}"] = getattr(transformers, cls)(config)
            parts[f"tokenizer{suffix}"] = clip_tokenizer(pad)
    if arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_flops(pipe: Any, arch: str, device: str, dtype: Any) -> tuple[float, float]:
    """(UNet FLOPs of one pass for one image, VAE decode FLOPs for one image) at the pipeline's size."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, latent = pipe.unet, pipe.unet.config.sample_size
    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    kwargs: dict[str, Any] = {}
    if arch == "sdxl":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.zeros(1, 6, device=device, dtype=dtype)}
    with torch.no_grad():
        with FlopCounterMode(display=False) as fc:
            unet(x, torch.tensor([500], device=device), ctx, **kwargs)
        unet_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            pipe.vae.decode(x / pipe.vae.config.scaling_factor)
    return float(unet_flops), float(fc.get_total_flops())


def matmul_tflops(device: str, dtype: Any, toy: bool) -> float:
    """Achieved TFLOP/s of a large square matmul: what this device really reaches."""
    import torch

    n = 1024 if toy else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    reps = 3 if toy else 50
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pipeline(pipe: Any, batch: int, steps: int, device: str, calls: int, warmup: int) -> float:
    """Seconds per call of a batch of ``batch`` different prompts (after ``warmup`` untimed calls)."""
    import torch

    prompts = [f"photo of {i + 1} red apples and a blue cup on a wooden table, detailed" for i in range(batch)]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def call() -> None:
        pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=CFG, width=size, height=size,
             generator=[torch.Generator("cpu").manual_seed(i) for i in range(batch)], output_type="pt")

    for _ in range(warmup):
        call()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    _sync(device)
    return (time.perf_counter() - t0) / calls


def time_render_dataset(pipe: Any, arch: str, batch: int, steps: int) -> float:
    """images/s of render_dataset (PNG, caption, fsync, metadata included) for 2 batches."""
    from selma_backend.models.base import LoadedPipeline
    from selma_backend.render import RenderConfig, render_dataset

    rows = [{"id": f"gpu-{i:04d}", "skill": "bench", "prompt": f"photo of {i + 1} red apples"} for i in range(2 * batch)]
    lp = LoadedPipeline(pipe, "sdxl" if arch == "sdxl" else "sd1", "epsilon", "random-weights", "gpu_render.py")
    with tempfile.TemporaryDirectory(prefix="selma-gpu-render-") as tmp:
        report = render_dataset(lp, rows, tmp, RenderConfig(steps=steps, batch_size=batch, cfg=CFG, scheduler=SCHEDULER))
    return report.images_per_s


def peak_for(device: str, override: float | None) -> tuple[float | None, str]:
    import torch

    if override:
        return override, "--peak-tflops"
    if not device.startswith("cuda"):
        return None, "unknown for this device"
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value, f"data sheet ({name})"
    return None, f"not in the table ({name}); pass --peak-tflops"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import diffusers
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    peak, peak_source = peak_for(device, args.peak_tflops)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "dtype": args.dtype, "toy": args.toy, "steps": args.steps, "cfg": CFG, "scheduler": SCHEDULER,
        "attention": "sdpa (diffusers AttnProcessor2_0)", "torch": torch.__version__,
        "diffusers": diffusers.__version__, "peak_tflops": peak, "peak_source": peak_source,
        "matmul_tflops": round(matmul_tflops(device, dtype, args.toy), 2), "runs": [],
    }
    for arch in args.arch:
        pipe = build(arch, args.toy, device, dtype)
        unet_flops, vae_flops = count_flops(pipe, arch, device, dtype)
        per_image = args.steps * 2 * unet_flops + vae_flops
        size = pipe.unet.config.sample_size * 8
        print(f"{arch}: {size} px, UNet {unet_flops / 1e9:.1f} GFLOP/pass, VAE decode {vae_flops / 1e9:.1f} GFLOP, "
              f"{per_image / 1e12:.3f} TFLOP/image", flush=True)
        for compiled in [c == "on" for c in args.compile]:
            if compiled:
                pipe.unet = torch.compile(pipe.unet)
            for batch in args.batches:
                seconds = time_pipeline(pipe, batch, args.steps, device, args.calls, 2 if compiled else 1)
                ips = batch / seconds
                achieved = ips * per_image / 1e12
                run_ = {"arch": arch, "size": size, "compile": compiled, "batch": batch, "images_per_s": round(ips, 4),
                        "achieved_tflops": round(achieved, 3), "unet_gflop_per_pass": round(unet_flops / 1e9, 2),
                        "vae_gflop": round(vae_flops / 1e9, 2),
                        "share_of_peak": round(achieved / peak, 4) if peak else None,
                        "share_of_matmul": round(achieved / result["matmul_tflops"], 4)}
                result["runs"].append(run_)
                print(json.dumps(run_), flush=True)
            if compiled:
                pipe.unet = pipe.unet._orig_mod
        if args.render_dataset:
            batch = max(args.batches)
            ips = time_render_dataset(pipe, arch, batch, args.steps)
            result["runs"].append({"arch": arch, "size": size, "compile": False, "batch": batch,
                                   "render_dataset_images_per_s": round(ips, 4)})
            print(json.dumps(result["runs"][-1]), flush=True)
        del pipe
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny widths at 64 px (CPU check of the script)")
    parser.add_argument("--arch", nargs="+", choices=list(UNET), default=list(UNET))
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="default 1 8 16 (toy: 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (toy: 2)")
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=None,
                        help="default: off on (toy: off; on CPU compiling the toy UNet alone takes ~3 min)")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--calls", type=int, default=None, help="timed calls per setting (default 2, toy 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense peak, if not in the table")
    parser.add_argument("--no-render-dataset", dest="render_dataset", action="store_false",
                        help="skip the end-to-end render_dataset run at the largest batch")
    parser.add_argument("--json", type=Path, default=None, help="write the result here (default: $OUT/gpu_render.json)")
    args = parser.parse_args(argv)
    args.batches = args.batches or ([1, 2] if args.toy else [1, 8, 16])
    args.steps = args.steps or (2 if args.toy else 20)
    args.calls = args.calls or (1 if args.toy else 2)
    args.compile = args.compile or (["off"] if args.toy else ["off", "on"])
    result = run(args)
    path = args.json or (Path(os.environ["OUT"]) / "gpu_render.json" if os.environ.get("OUT") else None)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
