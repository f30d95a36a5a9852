"""What a filter run did: counts per skill and reason, and a histogram of the scores (PNG, drawn with PIL).

Written under ``<dataset>/.selma_report/`` (a hidden folder, so dataset loaders that scan the dataset
folder for images never take the histogram for training data).
"""

from __future__ import annotations

import io
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..fsio import atomic_write_bytes

REPORT_DIR = ".selma_report"
SUMMARY_FILE = "filter.json"
HISTOGRAM_FILE = "filter_scores.png"


@dataclass
class FilterReport:
    dataset_dir: str
    status: str = "complete"  # complete | stopped (nothing written to metadata when stopped)
    total: int = 0  # rows decided
    kept: int = 0
    dropped: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # drop reason -> rows
    per_skill: dict[str, dict[str, Any]] = field(default_factory=dict)  # skill -> {total, kept, dropped: {reason: n}}
    score_stats: dict[str, float] = field(default_factory=dict)  # min, mean, max over scored rows
    embedded: int = 0  # images embedded in this run
    cached: int = 0  # images whose embedding came from the cache
    unscored_rows: int = 0  # rows added to metadata.jsonl while this run scored (left untouched)
    histogram: str = ""  # path of the PNG
    summary: str = ""  # path of the JSON summary
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    scorer: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tally(report: FilterReport, rows: list[dict[str, Any]], reasons: list[str], scores: list[float | None]) -> None:
    """Fill the counts of ``report`` from the decisions (one reason per row, "" = kept)."""
    report.total, report.kept = len(rows), reasons.count("")
    report.dropped = report.total - report.kept
    report.reasons = dict(sorted(Counter(r for r in reasons if r).items()))
    per: dict[str, dict[str, Any]] = {}
    for row, why in zip(rows, reasons, strict=True):
        entry = per.setdefault(str(row.get("skill") or ""), {"total": 0, "kept": 0, "dropped": {}})
        entry["total"] += 1
        if why:
            entry["dropped"][why] = entry["dropped"].get(why, 0) + 1
        else:
            entry["kept"] += 1
    report.per_skill = dict(sorted(per.items()))
    valid = [s for s in scores if s is not None]
    if valid:
        report.score_stats = {"min": min(valid), "mean": sum(valid) / len(valid), "max": max(valid)}


def histogram_png(scores: list[float | None], kept: list[bool], *, marks: dict[str, float] | None = None,
                  bins: int = 40, size: tuple[int, int] = (720, 360)) -> bytes:
    """PNG bytes: stacked histogram of ``scores`` (kept green, dropped grey), ``marks`` as labelled lines."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    left, right, top, bottom = 48, 16, 28, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pairs = [(s, k) for s, k in zip(scores, kept, strict=True) if s is not None and math.isfinite(s)]
    draw.text((left, 6), f"CLIP score (cosine), {len(pairs)} images: kept {sum(k for _, k in pairs)} "
              f"(green), dropped {sum(not k for _, k in pairs)} (grey)", fill="black", font=font)
    draw.line([(left, h - bottom), (w - right, h - bottom)], fill="black")
    draw.line([(left, top), (left, h - bottom)], fill="black")
    if not pairs:
        return _png(img)
    values = [s for s, _ in pairs] + list((marks or {}).values())
    lo, hi = min(values), max(values)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.01, hi + 0.01
    kept_n, drop_n = [0] * bins, [0] * bins
    for s, k in pairs:
        b = min(bins - 1, int((s - lo) / (hi - lo) * bins))
        (kept_n if k else drop_n)[b] += 1
    tallest = max(a + b for a, b in zip(kept_n, drop_n, strict=True)) or 1
    plot_w, plot_h = w - left - right, h - top - bottom
    bar = plot_w / bins
    for b in range(bins):
        x0, x1 = left + b * bar + 1, left + (b + 1) * bar - 1
        y_drop = h - bottom - drop_n[b] / tallest * plot_h
        y_keep = y_drop - kept_n[b] / tallest * plot_h
        if drop_n[b]:
            draw.rectangle([x0, y_drop, x1, h - bottom], fill=(160, 160, 160))
        if kept_n[b]:
            draw.rectangle([x0, y_keep, x1, y_drop], fill=(46, 160, 67))
    for t in range(5):
        v = lo + (hi - lo) * t / 4
        x = left + plot_w * t / 4
        draw.line([(x, h - bottom), (x, h - bottom + 4)], fill="black")
        draw.text((x - 14, h - bottom + 8), f"{v:.3f}", fill="black", font=font)
    draw.text((4, top), str(tallest), fill="black", font=font)
    for name, v in (marks or {}).items():
        x = left + (v - lo) / (hi - lo) * plot_w
        draw.line([(x, top), (x, h - bottom)], fill=(200, 30, 30), width=2)
        draw.text((x + 3, top + 2), f"{name} {v:.3f}", fill=(200, 30, 30), font=font)
    return _png(img)


def _png(img: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_histogram(dataset_dir: Path, data: bytes) -> Path:
    return atomic_write_bytes(dataset_dir / REPORT_DIR / HISTOGRAM_FILE, data)
