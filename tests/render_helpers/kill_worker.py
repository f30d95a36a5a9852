"""A fork server for the kill -9 test: import torch/diffusers and load the tiny model once, then fork
one real child process per render, which the test kills with SIGKILL at a random moment.

Forking saves the ~10 s interpreter start-up per kill (torch + diffusers imports), so the test can
afford many kills. The children run the production ``render_dataset``; the only addition is a
short sleep inside the three commit steps (caption, PNG, row), which changes no behaviour but
widens those windows so random kills land in them often.

Protocol (stdin/stdout lines): ``render <out_dir>`` -> ``pid <n>`` then ``exit <n> <status>``
(status: exit code, or -signal); ``quit`` ends the server.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

torch.set_num_threads(1)  # no OpenMP pool in the parent: forking stays safe

from render_helpers.common import load_tiny  # noqa: E402
from selma_backend.render import RenderConfig, render_dataset  # noqa: E402
from selma_backend.render import dataset as ds  # noqa: E402

COMMIT_SLEEP_S = 0.01


def _slowed(fn):
    def wrapper(*args, **kwargs):
        time.sleep(COMMIT_SLEEP_S)
        return fn(*args, **kwargs)

    return wrapper


def child(lp, prompts_path: str, out_dir: str, config: RenderConfig) -> None:
    ds.atomic_write_text = _slowed(ds.atomic_write_text)  # before the caption
    ds.atomic_write_bytes = _slowed(ds.atomic_write_bytes)  # before the PNG commit
    ds.append_rows = _slowed(ds.append_rows)  # between the PNG commit and its row
    try:
        report = render_dataset(lp, prompts_path, out_dir, config)
        Path(out_dir + ".report.json").write_text(json.dumps(report.to_dict()))
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    os._exit(0)


def warm_up(lp, config: RenderConfig) -> None:
    """Run every batch size once here, so children do not each pay the first-call cost (kernel setup)."""
    for n in range(1, config.batch_size + 1):
        lp.pipe([f"warm up {i}" for i in range(n)], num_inference_steps=config.steps, height=64, width=64)


def main() -> None:
    model, prompts_path, config_json = sys.argv[1:4]
    config = RenderConfig.from_dict(json.loads(config_json))
    lp = load_tiny(model)
    warm_up(lp, config)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "quit":
            return
        pid = os.fork()
        if pid == 0:
            child(lp, prompts_path, rest[0], config)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"exit {pid} {code}", flush=True)


if __name__ == "__main__":
    main()
