"""GPU benchmark of stage 6: what evaluating base + LoRAs costs on a full-size SD 1.5 architecture.

Random weights (speed does not depend on them; nothing is downloaded): the SD 1.5 pipeline of
``gpu_render.build`` and random kohya LoRAs of rank ``--rank`` on every UNet attention projection,
written with ``selma_backend.lora.format``. Measured, each after a warm-up call:

* swap: seconds to apply one LoRA file (``load_lora_weights`` + ``set_adapters``) and to remove it;
* render: images/s of ``render_models`` (batched, PNG files written) for the base and with a LoRA
  applied unfused (PEFT layers add a low-rank matmul per projection per step);
* evaluate: ``evaluate()`` end to end, base + ``--loras`` LoRAs on ``--prompts`` prompts: render, CLIP
  scoring (the tiny open_clip model: CLIP cost at full size is ``gpu_clip.py``'s), statistics, report.

Measured on one H200 (bf16, 512 px, 20 steps, DPM++ 2M Karras, CFG 7.5, batch 8, rank 32, diffusers
0.42.1, torch 2.11): base 4.79 images/s, LoRA unfused 3.73 images/s (-22%); apply 0.28 s, remove
0.02 s (24 MB file); ``evaluate`` base + 2 LoRAs x 32 prompts = 96 images in 28.0 s (3.42 images/s).

    python bench/gpu_eval.py                 # on the GPU machine; JSON to $OUT/gpu_eval.json
    python bench/gpu_eval.py --toy           # tiny widths at 64 px on CPU: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gpu_render  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(unet: Any, path: Path, rank: int, seed: int, provenance: dict[str, Any]) -> Path:
    """A kohya LoRA with random A and B on every attention projection of ``unet`` (B not zero)."""
    import torch

    from selma_backend.lora import LoraArch, kohya_metadata, peft_to_kohya, save_lora

    gen = torch.Generator().manual_seed(seed)
    peft: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if name.endswith(TARGETS) and isinstance(module, torch.nn.Linear):
            peft[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.01
            peft[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.01
    arch = LoraArch.from_unet_config(unet.config, "sd_v1")
    kohya = peft_to_kohya(peft, arch=arch, alpha_by_module=float(rank))
    return save_lora(path, kohya, kohya_metadata(arch=arch, rank=rank, alpha=rank, provenance=provenance))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_swap(pipe: Any, entry: Any, device: str, reps: int = 3) -> tuple[float, float]:
    """(seconds to apply, seconds to remove) one LoRA, mean of ``reps`` after one warm-up."""
    from selma_backend.eval.models import lora_applied

    apply_s, remove_s = [], []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        ctx = lora_applied(pipe, entry)
        ctx.__enter__()
        _sync(device)
        t1 = time.perf_counter()
        ctx.__exit__(None, None, None)
        _sync(device)
        if i:
            apply_s.append(t1 - t0)
            remove_s.append(time.perf_counter() - t1)
    return sum(apply_s) / reps, sum(remove_s) / reps


def time_render(pipe: Any, entry: Any, rows: list[dict[str, Any]], config: Any, device: str) -> float:
    """images/s of ``render_models`` for one model on ``rows`` (after one warm-up batch)."""
    from selma_backend.eval.render import plan_items, render_models

    items = plan_items(rows, config)
    with tempfile.TemporaryDirectory(prefix="selma-gpu-eval-") as tmp:
        render_models(pipe, [entry], items[: config.render.batch_size], Path(tmp) / "warm", config)
        _sync(device)
        t0 = time.perf_counter()
        render_models(pipe, [entry], items, Path(tmp) / "timed", config)
        _sync(device)
    return len(items) / (time.perf_counter() - t0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from selma_backend.eval import EvalConfig, evaluate
    from selma_backend.eval.models import describe_models
    from selma_backend.filter import ScorerConfig
    from selma_backend.models.base import LoadedPipeline
    from selma_backend.render.config import RenderConfig
    from selma_backend.tiny.openclip import write_clip

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    pipe = gpu_render.build("sd15", args.toy, device, dtype)
    size = pipe.unet.config.sample_size * 8
    rows = [{"id": f"p{i:04d}", "skill": ("counting", "spatial")[i % 2],
             "prompt": f"photo of {i % 5 + 1} red apples left of a blue cup, detailed"} for i in range(args.prompts)]
    config = EvalConfig(render=RenderConfig(steps=args.steps, batch_size=args.batch, scheduler=gpu_render.SCHEDULER,
                                            seed=0), resamples=2000)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
                              "dtype": args.dtype, "toy": args.toy, "size": size, "steps": args.steps,
                              "batch": args.batch, "rank": args.rank, "prompts": args.prompts, "loras": args.loras}
    with tempfile.TemporaryDirectory(prefix="selma-gpu-eval-") as tmp:
        work = Path(tmp)
        files = [random_lora(pipe.unet, work / f"expert-{k}.safetensors", args.rank, k, {"skill": f"skill{k}"})
                 for k in range(args.loras)]
        models = describe_models(files, "sd1")
        result["lora_mb"] = round(files[0].stat().st_size / 2**20, 2)
        result["apply_s"], result["remove_s"] = (round(v, 4) for v in time_swap(pipe, models[1], device))
        result["render_base_images_per_s"] = round(time_render(pipe, models[0], rows, config, device), 3)
        result["render_lora_images_per_s"] = round(time_render(pipe, models[1], rows, config, device), 3)
        print(json.dumps(result), flush=True)
        clip = ScorerConfig(path=str(write_clip(work / "clip")), device="cuda" if device.startswith("cuda") else "cpu")
        lp = LoadedPipeline(pipe, "sd1", "epsilon", "random-weights", "gpu_eval.py")
        t0 = time.perf_counter()
        report = evaluate(lp, files, rows, clip, work / "report", config)
        result["evaluate_s"] = round(time.perf_counter() - t0, 2)
        result["evaluate_images"] = report.images
        result["evaluate_images_per_s"] = round(report.images / result["evaluate_s"], 3)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny widths at 64 px (CPU check of the script)")
    parser.add_argument("--prompts", type=int, default=None, help="default 32 (toy: 4)")
    parser.add_argument("--loras", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="default 8 (toy: 2)")
    parser.add_argument("--steps", type=int, default=None, help="default 20 (toy: 2)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu_eval.json")
    args = parser.parse_args(argv)
    args.prompts = args.prompts or (4 if args.toy else 32)
    args.batch = args.batch or (2 if args.toy else 8)
    args.steps = args.steps or (2 if args.toy else 20)
    result = run(args)
    print(json.dumps(result, indent=2), flush=True)
    path = args.json or (Path(os.environ["OUT"]) / "gpu_eval.json" if os.environ.get("OUT") else None)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
