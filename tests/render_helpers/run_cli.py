"""``selma render`` with a diffusers-folder loader, for subprocess tests (kill -9, accelerate launch).

Runs the real ``selma_backend.render.cli.main``; only the model loading seam is replaced while
``selma_backend.models.loader`` may not exist yet.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (for render_helpers)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository (selma_backend)

from render_helpers.common import load_tiny  # noqa: E402

from selma_backend.render import cli  # noqa: E402


def _load(args):
    lp = load_tiny(args.model)
    if args.device not in ("auto", "cpu"):
        lp.pipe.to(args.device)
    return lp


if __name__ == "__main__":
    cli.load_model = _load
    sys.exit(cli.main(sys.argv[1:]))
