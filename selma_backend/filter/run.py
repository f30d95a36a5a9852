"""``filter_dataset``: score a dataset with CLIP, choose what to keep, write the decision into its metadata.

prepare (read rows, check the plan) -> score (cached embeddings) -> choose (pure) -> save (one atomic
metadata rewrite under the dataset lock, dataset.json, summary, histogram).

Each row gets ``clip_score`` (cosine of image and caption embeddings, 6 decimals; null when the image
is broken), ``keep`` (bool) and, when dropped, ``drop_reason``. Every other field — ``review``
above all — is kept as it was. Rows appended while the run scored are left untouched.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SelmaError
from ..fsio import atomic_write_json
from ..render.dataset import DATASET_JSON, FORMAT, METADATA, read_index, read_info
from .config import FilterConfig
from .report import REPORT_DIR, SUMMARY_FILE, FilterReport, histogram_png, tally, write_histogram
from .review import rewrite_metadata
from .scorer import ClipScorer, EmbeddingCache, Progress, ShouldStop, embed_captions, embed_files
from .select import Scored, check_plan, choose

FIELDS = ("clip_score", "keep", "drop_reason")  # what this stage writes into a row


def filter_dataset(dataset_dir: str | os.PathLike[str], scorer: ClipScorer, config: FilterConfig, *,
                   progress: Progress | None = None, should_stop: ShouldStop | None = None) -> FilterReport:
    """Score and filter the dataset at ``dataset_dir``; see the module doc. Stopped runs write no decision."""
    start = time.perf_counter()
    out = Path(dataset_dir)
    rows = _rows(out)
    check_plan(config, rows)
    report = FilterReport(str(out), config=config.to_dict(), scorer=dict(scorer.info))
    scored = _score(out, rows, scorer, config, report, progress, should_stop)
    if scored is None:
        report.status = "stopped"
        report.elapsed_s = time.perf_counter() - start
        return report
    reasons = choose(scored, config)
    scores = [None if i in scored.broken else float(scored.scores[i]) for i in range(len(rows))]
    _save(out, rows, scores, reasons, config, report)
    report.elapsed_s = time.perf_counter() - start
    atomic_write_json(Path(report.summary), report.to_dict())
    return report


def _rows(out: Path) -> list[dict[str, Any]]:
    if not (out / METADATA).is_file():
        raise SelmaError(f"{out}: no {METADATA}; render a dataset into it first (selma render / the render node)")
    rows = list(read_index(out).values())  # raises on a file listed twice
    if not rows:
        raise SelmaError(f"{out / METADATA}: no rows; nothing to filter")
    return rows


def _image_path(out: Path, name: str) -> Path:
    """The image of a row; a file_name that leads outside the dataset reads as a missing file."""
    path = (out / name).resolve()
    return path if path.is_relative_to(out.resolve()) else out / ".selma-outside-dataset"


def _score(out: Path, rows: list[dict[str, Any]], scorer: ClipScorer, config: FilterConfig, report: FilterReport,
           progress: Progress | None, should_stop: ShouldStop | None) -> Scored | None:
    cache = EmbeddingCache.open(out, scorer.model_key)
    if cache.warning:
        report.warnings.append(cache.warning)
    texts = [str(r.get("text") or "") for r in rows]
    try:
        files = embed_files(scorer, [_image_path(out, str(r["file_name"])) for r in rows], cache, progress,
                            should_stop)
        if files.stopped:
            return None
        text_emb = embed_captions(scorer, texts, cache)
    finally:
        cache.save()  # what was embedded is kept, even when stopped or failed
    report.embedded, report.cached = files.computed, len(rows) - files.computed - len(files.errors)
    image_emb = files.emb.numpy()
    scores = np.round((image_emb.astype(np.float64) * text_emb.numpy()).sum(axis=1), 6)  # cosine: both are unit vectors
    scores[list(files.errors)] = np.nan
    return Scored(rows=rows, scores=scores, image_emb=image_emb, pixel_std=np.asarray(files.pixel_std),
                  broken=files.errors, caption_tokens=scorer.token_counts(texts),
                  max_tokens=config.max_caption_tokens or scorer.context_length - 2)


def _save(out: Path, rows: list[dict[str, Any]], scores: list[float | None], reasons: list[str],
          config: FilterConfig, report: FilterReport) -> None:
    decided = {r["file_name"]: (s, why) for r, s, why in zip(rows, scores, reasons, strict=True)}
    tally(report, rows, reasons, scores)

    def apply(current: list[dict[str, Any]]) -> None:
        for row in current:
            if row.get("file_name") not in decided:
                report.unscored_rows += 1
                continue
            score, why = decided[row["file_name"]]
            row["clip_score"], row["keep"] = score, not why
            if why:
                row["drop_reason"] = why
            else:
                row.pop("drop_reason", None)

    def record() -> None:  # under the same lock, after metadata.jsonl is in place
        info = read_info(out) or {"format": FORMAT, "sources": []}
        info["filter"] = {"config": config.to_dict(), "scorer": report.scorer, "kept": report.kept,
                          "dropped": report.dropped, "reasons": report.reasons,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_json(out / DATASET_JSON, info)

    rewrite_metadata(out, apply, then=record)
    report.histogram = str(write_histogram(out, histogram_png(scores, [not r for r in reasons],
                                                              marks=_marks(config))))
    report.summary = str(out / REPORT_DIR / SUMMARY_FILE)


def _marks(config: FilterConfig) -> dict[str, float]:
    marks = {"threshold": config.threshold} if config.mode == "threshold" else {}
    if config.mode == "per_skill":
        marks.update({f"{s}": v for s, v in config.per_skill})
    if config.floor is not None:
        marks["floor"] = config.floor
    return {k: float(v) for k, v in marks.items() if v is not None}
