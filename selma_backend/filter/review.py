"""Human review over the filter: the precedence training uses, and the one safe way to record a review.

A row may carry ``review`` ("keep" / "reject"; absent: not reviewed), ``keep`` (bool, written by the
filter) or neither. Training uses :func:`effective_keep`: review, else filter, else keep.
Re-filtering rewrites ``keep`` and ``clip_score`` only; ``review`` is never touched by it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import SelmaError, invalid
from ..fsio import atomic_write_text, read_jsonl
from ..render.dataset import METADATA, locked

REVIEW_VALUES = ("keep", "reject")
LOCK_WAIT_S = 5.0  # a gallery click waits this long for a filter run to finish its (short) rewrite


def effective_keep(row: dict[str, Any]) -> bool:
    """Whether training uses ``row``: ``review`` if set, else the filter's ``keep``, else True."""
    review = row.get("review")
    if review is not None:
        if review not in REVIEW_VALUES:
            raise invalid("review", review, [*REVIEW_VALUES, None], f"row {row.get('file_name')!r} of {METADATA}")
        return review == "keep"
    keep = row.get("keep")
    if keep is None:
        return True
    if not isinstance(keep, bool):
        raise invalid("keep", keep, [True, False, None], f"row {row.get('file_name')!r} of {METADATA}")
    return keep


def set_review(dataset_dir: str | os.PathLike[str], file_name: str, value: str | None) -> dict[str, Any]:
    """Record a person's decision on one image (None clears it); return the updated row.

    The metadata file is rewritten atomically under the dataset lock; every other row and field is kept.
    """
    if value is not None and value not in REVIEW_VALUES:
        raise invalid("review", value, [*REVIEW_VALUES, None], "None removes the review")
    if not isinstance(file_name, str) or not file_name:
        raise invalid("file_name", file_name, "the file_name of a row of metadata.jsonl")
    found: dict[str, Any] = {}

    def edit(rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if row.get("file_name") == file_name:
                if value is None:
                    row.pop("review", None)
                else:
                    row["review"] = value
                found.update(row)
                return
        raise invalid("file_name", file_name, f"a file_name listed in {Path(dataset_dir) / METADATA}")

    rewrite_metadata(dataset_dir, edit)
    return found


def rewrite_metadata(dataset_dir: str | os.PathLike[str], edit: Callable[[list[dict[str, Any]]], None], *,
                     then: Callable[[], None] | None = None, wait_s: float = LOCK_WAIT_S) -> None:
    """Read metadata.jsonl under the lock, let ``edit`` change the rows in place, write it back atomically.

    If ``edit`` raises, the file is left exactly as it was. Row order is kept. ``then`` runs after
    the write, still under the lock.
    """
    out = Path(dataset_dir)
    path = out / METADATA
    if not out.is_dir():
        raise SelmaError(f"{out}: no such dataset folder")
    with _locked_waiting(out, wait_s):
        if not path.is_file():
            raise SelmaError(f"{out}: no {METADATA}; is this a SELMA dataset folder?")
        rows = read_jsonl(path)
        edit(rows)
        text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
        atomic_write_text(path, text)
        if then is not None:
            then()


@contextlib.contextmanager
def _locked_waiting(out: Path, wait_s: float) -> Iterator[None]:
    """``render.dataset.locked``, retried for ``wait_s`` seconds while another writer holds it."""
    deadline = time.monotonic() + wait_s
    with contextlib.ExitStack() as stack:
        while True:
            try:
                stack.enter_context(locked(out))
                break
            except SelmaError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        yield
