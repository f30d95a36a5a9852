"""GPU benchmark of stage-3 scoring: open_clip ViT-L/14 (random weights; speed does not depend on them).

The model is built from open_clip's bundled ``ViT-L-14`` config (nothing is downloaded) and driven
through ``ClipScorer.embed_pixels`` — the code ``filter_dataset`` uses — on pre-decoded,
preprocessed images (224 px, pinned host memory; host->device copy and the copy of the embeddings
back are included, PNG decoding is not). For each batch size: images/s, after a warm-up, and the
peak GPU memory. Target: >= 2,000 images/s on an H200 in fp16.

    python bench/gpu_clip.py --json $OUT/gpu_clip.json            # on the GPU machine
    python bench/gpu_clip.py --toy --json /tmp/gpu_clip_toy.json  # CPU, tiny model: checks the script works
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selma_backend.filter.config import ScorerConfig  # noqa: E402
from selma_backend.filter.scorer import ClipScorer  # noqa: E402
from selma_backend.fsio import atomic_write_json  # noqa: E402

TOY_CFG = {"embed_dim": 64, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def build(toy: bool, device: str, dtype: str) -> ClipScorer:
    import open_clip
    import torch

    precision = "fp32" if device == "cpu" else dtype
    torch.manual_seed(0)
    if toy:
        model = open_clip.CLIP(**TOY_CFG).to(device)
        arch = "toy (ViT-B-32-shaped, 2 layers, width 64)"
    else:
        model = open_clip.create_model("ViT-L-14", pretrained=None, precision=precision, device=device)
        arch = "ViT-L-14"
    model.eval()
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    cfg = ScorerConfig(path="(random weights)", device=device if device != "cpu" else "cpu", dtype=precision)
    return ClipScorer(model, None, open_clip.get_tokenizer("ViT-L-14"), device, torch_dtype, cfg, "bench",
                      {"arch": arch, "precision": precision})


def measure(scorer: ClipScorer, batch: int, n_batches: int) -> dict[str, Any]:
    import torch

    pixels = torch.randn(batch, 3, 224, 224)
    if scorer.device == "cuda":
        pixels = pixels.pin_memory()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        scorer.embed_pixels(pixels)  # warm-up (kernel selection)
    _sync(scorer)
    start = time.perf_counter()
    for _ in range(n_batches):
        emb = scorer.embed_pixels(pixels)  # returns float32 on the CPU: includes both copies
    _sync(scorer)
    elapsed = time.perf_counter() - start
    assert emb.shape[0] == batch and torch.isfinite(emb).all()
    out = {"batch_size": batch, "images": batch * n_batches, "images_per_s": round(batch * n_batches / elapsed, 1)}
    if scorer.device == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _sync(scorer: ClipScorer) -> None:
    import torch

    if scorer.device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--toy", action="store_true", help="tiny model on the CPU, a few batches")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 64 256 512)")
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--seconds", type=float, default=3.0, help="about how long to time each batch size")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    device = "cpu" if args.toy or not torch.cuda.is_available() else "cuda"
    batches = args.batches or ([4, 16] if args.toy else [64, 256, 512])
    scorer = build(args.toy, device, args.dtype)
    results = []
    for bs in batches:
        probe = measure(scorer, bs, 1)  # rough rate, to size the timed run
        n = max(2, int(args.seconds * probe["images_per_s"] / bs)) if not args.toy else 2
        results.append(measure(scorer, bs, n))
        print(json.dumps(results[-1]), flush=True)
    best = max(results, key=lambda r: r["images_per_s"])
    result = {"model": scorer.info["arch"], "precision": scorer.info["precision"], "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "unit": "images/s", "input": "pre-decoded 224 px tensors (pinned)",
              "results": results, "best": best, "target_images_per_s": 2000,
              "meets_target": device == "cuda" and best["images_per_s"] >= 2000}
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
