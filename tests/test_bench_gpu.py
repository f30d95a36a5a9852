"""bench/gpu.py: the prepared H200 driver runs its parts in child processes under time limits (CPU, toy size)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("selma_bench_gpu", BENCH / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def test_toy_clip_part_writes_json_with_flop_share(tmp_path):
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--toy", "--parts", "clip", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["toy"] is True and list(result["parts"]) == ["clip"]
    clip = result["parts"]["clip"]
    assert clip["status"] == "ok" and clip["gflop_per_image"] > 0
    assert [r["batch_size"] for r in clip["runs"]] == [4, 16]
    assert all(r["images_per_s"] > 0 and r["achieved_tflops"] >= 0 for r in clip["runs"])
    assert all(r["share_of_flop_bound"] is None for r in clip["runs"])  # no peak known for a CPU
    assert (tmp_path / "gpu_clip.log").exists() and "clip" in proc.stdout


def test_part_over_its_limit_is_killed_and_reported(tmp_path):
    """A part that cannot finish in its limit is stopped there; the driver records it and goes on."""
    entry = gpu.launch("render-sd15", True, tmp_path, limit=2.0)  # imports alone take longer than 2 s
    assert entry["status"] == "timed out" and entry["seconds"] < 15
    assert entry["partial_runs"] == [] and not (tmp_path / "gpu_render-sd15.json").exists()


def test_toy_skips_compiled_parts_and_budget_skips_the_rest(tmp_path):
    args = gpu.argparse.Namespace(toy=True, parts=["render-sd15-compiled", "clip"], budget=5.0, out=tmp_path)
    result = gpu.drive(args)
    assert result["parts"]["render-sd15-compiled"]["status"] == "skipped"
    assert result["parts"]["clip"] == {"status": "skipped", "why": result["parts"]["clip"]["why"], "seconds": 0.0}
    assert result["parts"]["clip"]["why"].startswith("budget")
