"""bench/gpu_render.py works (toy size, CPU) and its FLOP count matches the published SD 1.5 figure."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from render_helpers.common import one_thread

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_render  # noqa: E402


def test_gpu_render_toy_runs_on_cpu_and_writes_json(tmp_path):
    with one_thread():
        assert gpu_render.main(["--toy", "--batches", "1", "--json", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    runs = [r for r in result["runs"] if "images_per_s" in r]
    assert {r["arch"] for r in runs} == {"sd15", "sdxl"} and all(r["images_per_s"] > 0 for r in runs)
    assert all(r["achieved_tflops"] > 0 and r["share_of_peak"] is None for r in runs)  # no CPU peak in the table
    assert {r["arch"] for r in result["runs"] if "render_dataset_images_per_s" in r} == {"sd15", "sdxl"}


@pytest.mark.parametrize("arch,gflop", [("sd15", 803.3), ("sdxl", 6761.2)])
def test_full_size_unet_flops(arch, gflop):
    """Counted on the meta device (no memory, no time): SD 1.5 at 512 px is the 803 GFLOP of the issue."""
    import diffusers
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**gpu_render.UNET[arch])
        n = unet.config.sample_size
        kwargs = {}
        if arch == "sdxl":
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.zeros(1, 6)}
        with FlopCounterMode(display=False) as fc:
            unet(torch.randn(1, 4, n, n), torch.tensor([500]), torch.randn(1, 77, unet.config.cross_attention_dim),
                 **kwargs)
    assert fc.get_total_flops() / 1e9 == pytest.approx(gflop, rel=1e-3)
