"""kill -9 at random moments during a render; after every kill the folder is consistent and a re-run
completes it exactly: each (prompt, sample) once, no half files, nothing finished rendered again.

SLOW (~40 s): 24+ real SIGKILLs of forked render processes (tests/render_helpers/kill_worker.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from render_helpers.common import assert_images_close, check_dataset, prompt_rows

from selma_backend.fsio import atomic_write_text, read_jsonl
from selma_backend.render import RenderConfig
from selma_backend.tiny_models import write_sd1

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork (POSIX)")]

KILLS = 24
WORKER = Path(__file__).parent / "render_helpers" / "kill_worker.py"


class ForkServer:
    def __init__(self, model: Path, prompts: Path, config: RenderConfig, log: Path) -> None:
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(WORKER), str(model), str(prompts),
                                      json.dumps(config.to_dict())], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env)  # noqa: SIM115
        assert self._line() == "ready"

    def _line(self) -> str:
        line = self.proc.stdout.readline().strip()
        assert line, f"the fork server died:\n{self.log.read_text()[-3000:]}"
        return line

    def start(self, out: Path) -> int:
        self.proc.stdin.write(f"render {out}\n")
        self.proc.stdin.flush()
        return int(self._line().split()[1])

    def wait(self, pid: int) -> int:
        _, got, code = self._line().split()
        assert int(got) == pid
        return int(code)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=30)


def state(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")} if out.exists() else {}


def wait_for_pngs(out: Path, n: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out.exists() and sum(name.endswith(".png") for name in os.listdir(out)) >= n:
            return
        time.sleep(0.002)


def check_after_kill(out: Path, stats: Counter) -> None:
    """Invariants that hold right after a kill, before any repair (see selma_backend.render.dataset)."""
    from PIL import Image

    if not out.exists():
        stats["before_any_file"] += 1
        return
    meta = out / "metadata.jsonl"
    rows = read_jsonl(meta)
    names = [r["file_name"] for r in rows]
    assert len(names) == len(set(names)), "duplicate row"
    pngs = {p.name for p in out.glob("*.png")}
    assert set(names) <= pngs, "a row names an image that was never committed (I2)"
    for name in pngs:
        with Image.open(out / name) as im:
            im.load()  # a committed PNG is complete (I1)
        assert (out / name).with_suffix(".txt").exists(), "a committed PNG without its caption (I1)"
    torn = meta.exists() and meta.stat().st_size and not meta.read_bytes().endswith(b"\n")
    captions = {p.stem for p in out.glob("*.txt")}
    stats["png_without_row"] += bool(pngs - set(names))
    stats["orphan_caption"] += bool(captions - {n[:-4] for n in pngs})
    stats["temp_file"] += bool(list(out.glob(".*.tmp")))
    stats["torn_row"] += bool(torn)


def test_kill_9_at_random_moments_never_loses_duplicates_or_rerenders(tmp_path):
    model = write_sd1(tmp_path / "sd1", seed=0)
    rows = prompt_rows(12)
    prompts = tmp_path / "prompts.jsonl"
    atomic_write_text(prompts, "".join(json.dumps(r) + "\n" for r in rows))
    config = RenderConfig(images_per_prompt=2, steps=2, batch_size=4)
    expected = {f"{r['id']}_s{k}.png" for r in rows for k in range(2)}
    server = ForkServer(model, prompts, config, tmp_path / "worker.log")
    try:
        straight = tmp_path / "straight"
        assert server.wait(server.start(straight)) == 0, (tmp_path / "worker.log").read_text()
        check_dataset(straight, expected)

        rng, kills, stats, rounds = random.Random(20240601), 0, Counter(), 0
        while kills < KILLS:
            out = tmp_path / f"round{rounds}"
            rounds += 1
            while True:
                before = state(out)
                last = kills >= KILLS or len(before) == len(expected)  # then: finish the round
                pid = server.start(out)
                if not last:
                    # A random moment: after 0..(missing-1) more images are committed, plus a random delay
                    # (none, within a commit, or within a batch), so kills spread over every phase.
                    wait_for_pngs(out, len(before) + rng.randrange(len(expected) - len(before)))
                    time.sleep(rng.choice([0.0, rng.uniform(0, 0.03), rng.uniform(0, 0.3)]))
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                code = server.wait(pid)
                assert code in (0, -signal.SIGKILL), (tmp_path / "worker.log").read_text()[-3000:]
                after = state(out)
                assert {k: v for k, v in after.items() if k in before} == before, "a finished image was re-rendered"
                if code == 0:
                    break
                kills += 1
                check_after_kill(out, stats)
            check_dataset(out, expected)
            assert (out / "metadata.jsonl").read_bytes() == (straight / "metadata.jsonl").read_bytes()
            for name in expected:
                assert_images_close(out / name, straight / name)
        print(f"\n{kills} kills in {rounds} rounds; states right after a kill: {dict(stats)}")
        # At least one kill landed inside a commit (~25% of each batch's time is spent there).
        assert stats["png_without_row"] + stats["orphan_caption"] + stats["temp_file"] + stats["torn_row"] >= 1
    finally:
        server.close()
