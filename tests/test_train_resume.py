"""Stage 4 robustness through the real ``selma train`` command: killed with SIGKILL at random moments
and resumed, it ends with the same weights and step count as an uninterrupted run; two CPU
processes under ``accelerate launch`` (gloo) match one process with the same global batch.

SLOW (~2 min): every run is a fresh interpreter importing torch + diffusers.
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_helpers import make_dataset

from selma_backend.lora.format import load_lora
from selma_backend.tiny_models import write_sd1

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LR = 1e-3


def _args(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--rank", "4", "--alpha", "8",
            "--steps", str(steps), "--batch-size", "2", "--grad-accum", "2", "--resolution", "64", "--lr", str(LR),
            "--checkpoint-every", "1", "--keep-checkpoints", "2", "--device", "cpu", *extra]


def _selma(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "selma_backend", *args], capture_output=True, text=True, timeout=300,
                         env={**ENV, "SELMA_CACHE_DIR": str(cache)}, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return write_sd1(root / "sd1", seed=0), make_dataset(root / "spatial", "spatial"), root


def _steps_done(work: Path) -> int:
    ckpts = [p for p in (work / "checkpoints").glob("step-*") if (p / "state.json").is_file()] if work.exists() else []
    return max((int(p.name[5:]) for p in ckpts), default=0)


def test_kill_9_at_random_moments_then_resume_gives_the_uninterrupted_weights(setup):
    model, data, root = setup
    steps = 10
    _selma(_args(model, data, root / "straight", steps), root / "cache")
    rng = random.Random(1234)
    out, work = root / "killed", root / "killed" / "spatial.train"
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "selma_backend", *_args(model, data, out, steps, "--resume")],
                                env={**ENV, "SELMA_CACHE_DIR": str(root / "cache")}, cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        target = min(steps - 1, _steps_done(work) + rng.randint(1, 3))
        deadline = time.monotonic() + 240
        while _steps_done(work) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere inside the next step or checkpoint write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2 and _steps_done(work) < steps
    _selma(_args(model, data, out, steps, "--resume"), root / "cache")
    a, _ = load_lora(root / "straight" / "spatial.safetensors")
    b, meta = load_lora(out / "spatial.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # tolerance: none (same ops in the same order on CPU)
    assert json.loads(meta["selma.provenance"])["steps"] == steps
    log = list(csv.DictReader(open(work / "loss.csv")))
    assert [int(r["step"]) for r in log] == list(range(1, steps + 1))
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["step-000009", "step-000010"]  # last K=2


def test_two_processes_match_one_with_the_same_global_batch(setup):
    model, data, root = setup
    _selma(_args(model, data, root / "one", 3, "--batch-size", "4", "--grad-accum", "1"), root / "cache")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "selma_backend", *_args(model, data, root / "two", 3, "--batch-size", "4", "--grad-accum", "1")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**ENV, "SELMA_CACHE_DIR": str(root / "cache")},
                         cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    one, _ = load_lora(root / "one" / "spatial.safetensors")
    two, _ = load_lora(root / "two" / "spatial.safetensors")
    assert one.keys() == two.keys()
    # tolerance: 1e-4 relative (gradient sums in another order), or 2 % of one AdamW step (lr) for factors still
    # of the order of lr * steps (lora_up starts at zero): AdamW divides each gradient by its own RMS, so the
    # reordering's rounding in gradients near zero reaches the update at ~1e-3 of lr (observed 0.4 % on an AMD CPU's
    # BLAS, on one mid-block lora_up; a process that skipped the all-reduce differs by whole steps)
    excess = {k: float((one[k] - two[k]).abs().max()) / max(1e-4 * float(one[k].abs().max()), 0.02 * LR) for k in one}
    worst = max(excess, key=excess.get)
    assert excess[worst] <= 1.0, (worst, excess[worst])
    changed = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert any(float(one[k].abs().sum()) > 0 for k in one if k.endswith("lora_up.weight"))
    losses = [list(csv.DictReader(open(root / d / "spatial.train" / "loss.csv"))) for d in ("one", "two")]
    assert [round(float(r["loss"]), 4) for r in losses[0]] == [round(float(r["loss"]), 4) for r in losses[1]], changed
