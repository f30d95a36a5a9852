"""Sharded rendering: two CPU processes under ``accelerate launch`` (torch.distributed, gloo) make the same
dataset as one process -- also when resuming a dataset a single process started.

SLOW (~30 s): two fresh interpreters import torch + diffusers.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from render_helpers.common import assert_images_close, check_dataset, load_tiny, one_thread, prompt_rows

from selma_backend.fsio import atomic_write_text
from selma_backend.render import RenderConfig, render_dataset
from selma_backend.tiny_models import write_sd1

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_make_the_same_dataset_as_one(tmp_path):
    model = write_sd1(tmp_path / "sd1", seed=0)
    rows = prompt_rows(7)
    prompts = tmp_path / "prompts.jsonl"
    atomic_write_text(prompts, "".join(json.dumps(r) + "\n" for r in rows))
    config = RenderConfig(images_per_prompt=2, steps=2, batch_size=3)
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    with one_thread():
        lp = load_tiny(model)
        render_dataset(lp, prompts, single, config)
        # The sharded run resumes a dataset that one process began (sample 0 of every prompt).
        render_dataset(lp, prompts, sharded, RenderConfig(images_per_prompt=1, steps=2, batch_size=3))
    started = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sharded.glob("*.png")}

    # Without GPUs, --multi_gpu makes accelerate start torchrun workers; the backend picks gloo on CPU.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), "-m", "selma_backend", "render",
           "--model", str(model), "--prompts", str(prompts), "--out", str(sharded), "--images-per-prompt", "2",
           "--steps", "2", "--batch-size", "3", "--device", "cpu"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout[out.stdout.index("{"):])  # rank 0 prints its report
    assert (report["world"], report["existing"], report["present"], report["planned"]) == (2, 7, 14, 14)
    assert report["rendered"] + report["rows_from_pngs"] == 7  # rank 0's images + rank 1's, indexed by rank 0
    assert report["rendered"] in (3, 4)  # the 7 missing images were split between the ranks

    expected = {f"{r['id']}_s{k}.png" for r in rows for k in range(2)}
    check_dataset(sharded, expected)
    assert {k: (p.stat().st_ino, p.stat().st_mtime_ns) for k, p in ((k, sharded / k) for k in started)} == started
    assert (sharded / "metadata.jsonl").read_bytes() == (single / "metadata.jsonl").read_bytes()
    info = [json.loads((d / "dataset.json").read_text()) for d in (sharded, single)]
    assert info[0]["render"]["settings"] == info[1]["render"]["settings"]
    for name in expected:
        assert_images_close(sharded / name, single / name)
