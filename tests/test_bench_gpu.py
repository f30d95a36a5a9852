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
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--toy", "--parts", "render-sd15-compiled", "clip",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["parts"]["render-sd15-compiled"]["status"] == "skipped"  # compiling on a CPU: minutes
    assert result["versions"]["torch"] and result["versions"]["cuda"] is False
    assert result["toy"] is True and list(result["parts"]) == ["render-sd15-compiled", "clip"]
    clip = result["parts"]["clip"]
    assert clip["status"] == "ok" and clip["gflop_per_image"] > 0
    assert [r["batch_size"] for r in clip["runs"]] == [4, 16]
    assert all(r["images_per_s"] > 0 and r["achieved_tflops"] >= 0 for r in clip["runs"])
    assert all(r["share_of_flop_bound"] is None for r in clip["runs"])  # no peak known for a CPU
    assert (tmp_path / "gpu_clip.log").exists() and "clip" in proc.stdout


def test_toy_training_part_with_peft_lora_layers(tmp_path):
    """The last training part measures our arm with PEFT's own LoRA layers (what the fused layers add)."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--toy", "--parts", "train-sd15-peft-lora",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    part = json.loads((tmp_path / "gpu.json").read_text())["parts"]["train-sd15-peft-lora"]
    assert part["status"] == "ok"
    (row,) = part["runs"]
    assert row["arch"] == "sd15" and row["lora_layers"] == "peft"
    assert row["ours_samples_per_s"] > 0 and row["reference_samples_per_s"] > 0


def test_part_over_its_limit_is_killed_and_reported(tmp_path):
    """A part that cannot finish in its limit is stopped there; the driver records it and goes on."""
    entry = gpu.launch("render-sd15", True, tmp_path, limit=2.0)  # imports alone take longer than 2 s
    assert entry["status"] == "timed out" and entry["seconds"] < 15
    assert entry["partial_runs"] == [] and not (tmp_path / "gpu_render-sd15.json").exists()


def test_parts_past_the_budget_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "versions", lambda: {"torch": "(not probed in this test)"})
    args = gpu.argparse.Namespace(toy=True, parts=["clip", "train-sd15"], budget=5.0, out=tmp_path)
    result = gpu.drive(args)
    assert [p["status"] for p in result["parts"].values()] == ["skipped", "skipped"]
    assert result["parts"]["clip"]["why"].startswith("budget")
    assert json.loads((tmp_path / "gpu.json").read_text())["parts"] == result["parts"]


def test_rows_printed_before_a_kill_are_recovered():
    log = ('sd15: 512 px, UNet 803.3 GFLOP/pass\n{"arch": "sd15", "batch": 1, "images_per_s": 0.9}\n'
           "{'not': 'json'}\n" '{"arch": "sd15", "batch": 8, "images_per_s": 5.1}\n{"arch": "sd15", "ba')
    assert [r["batch"] for r in gpu.printed_rows(log)] == [1, 8]


def test_toy_levers_part_measures_each_setting_side_by_side(tmp_path):
    """``levers-*`` parts: our trainer under several settings on one model, each row with its rate and loss
    curve; an arm that cannot run here (a CUDA-only attention kernel) is recorded as failed, the others go on."""
    proc = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--toy", "--parts", "levers-sd15-attention",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    part = json.loads((tmp_path / "gpu.json").read_text())["parts"]["levers-sd15-attention"]
    assert part["status"] == "ok" and part["reference_samples_per_s"] > 0
    rows = {r["arm"]: r for r in part["runs"]}
    assert list(rows) == gpu.LEVER_ARMS["levers-sd15-attention"][0]
    assert rows["no-autocast, efficient attention"]["status"] == "failed"  # no such kernel on a CPU
    ok = [r for r in rows.values() if r["status"] == "ok"]
    assert len(ok) == 3 and all(r["samples_per_s"] > 0 and len(r["losses"]) == 3 for r in ok)
    assert all(r["loss_max_rel_diff_vs_first_arm"] < 1e-3 for r in ok)  # settings change speed, not the curve
    assert set(part["profile"]["groups"]) >= {"convolution", "other"} and part["profile"]["top"]
