"""The report folder: ``scores.json``, bar charts, grids, ``index.html`` -- written whole or not at all.

Everything is written into a hidden staging folder beside the destination (``.<name>.partial-<id>``)
and renamed into place at the end (:func:`publish`), so a crashed or cancelled run leaves no half
report and a reader never sees one. A destination that already holds files is refused unless
``overwrite``; then the old folder is moved aside and removed only after the new one is in place.
Nodes ask :func:`next_run_dir` for a fresh numbered folder instead.

Layout::

    scores.json                 everything: config, models, prompts, per-image scores, summary
    index.html                  opens offline (inline CSS, relative links, no scripts, no fonts)
    chart-<metric>.png          per-skill bars with confidence intervals
    grid.png, grid-<skill>.png  base | experts | merged, prompts as captions
    images/<model>/<prompt>_s<k>.png, prompts/  (held-out prompt files)
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import SelmaError
from ..fsio import atomic_write_bytes, atomic_write_json, atomic_write_text
from ..paths import slug
from .chart import bar_chart, colours
from .grid import GridRow, grid_image, stack
from .html import render_html
from .models import ModelEntry

REPORT_FORMAT = "selma-eval-1"
CHART_METRICS = ("clip", "dsg")


def open_staging(out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Check ``out`` may receive a report and make the staging folder beside it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SelmaError(f"{out}: is a file; the report needs a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise SelmaError(f"{out}: holds files already (an earlier report?); choose another output folder, "
                         "or overwrite it explicitly (--overwrite)")
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, out: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Rename the finished ``staging`` folder to ``out`` (moving an old report aside first if ``overwrite``).

    If ``out`` filled up meanwhile and may not be overwritten, the report goes to a fresh numbered
    folder beside it instead (returned), so the work is never lost.
    """
    out = Path(out)
    old = None
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            out = next_run_dir(out.parent, out.name)
        else:
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
    elif out.is_dir():
        out.rmdir()
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def next_run_dir(root: str | os.PathLike[str], name: str) -> Path:
    """``root/name`` if free, else ``root/name-002``, ``-003`` ... (the first that does not exist)."""
    root = Path(root)
    if not (root / name).exists():
        return root / name
    n = 2
    while (root / f"{name}-{n:03d}").exists():
        n += 1
    return root / f"{name}-{n:03d}"


def write_report(folder: Path, data: dict[str, Any], models: Sequence[ModelEntry], grid_prompts: int) -> dict[str, Any]:
    """Write charts, grids, ``scores.json`` and ``index.html`` into ``folder``; returns the file map."""
    files: dict[str, Any] = {"scores": "scores.json", "html": "index.html", "charts": {}, "grids": {}}
    for metric in CHART_METRICS:
        if metric in data["summary"]:
            name = f"chart-{metric}.png"
            _save_png(folder / name, _chart(data["summary"][metric], models, data["skills"]))
            files["charts"][metric] = name
    grids = []
    names = _unique_slugs(data["skills"])
    for skill in data["skills"]:
        image = _grid(folder, skill, data, models, grid_prompts)
        name = f"grid-{names[skill]}.png"
        _save_png(folder / name, image)
        files["grids"][skill] = name
        grids.append(image)
    _save_png(folder / "grid.png", stack(grids))
    files["overview"] = "grid.png"
    data = {**data, "files": files}
    atomic_write_json(folder / "scores.json", data)
    atomic_write_text(folder / "index.html", render_html(data, models))
    return files


def _unique_slugs(skills: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for skill in skills:
        name, n = slug(skill), 2
        while name in out.values():
            name, n = f"{slug(skill)}-{n}", n + 1
        out[skill] = name
    return out


def _save_png(path: Path, image: Any) -> None:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    atomic_write_bytes(path, buf.getvalue())


def _chart(table: dict[str, Any], models: Sequence[ModelEntry], skills: Sequence[str]) -> Any:
    groups = [s for s in skills if s in table["skills"]] + ["all skills"]
    values = {}
    for group in groups:
        cells = table["overall"] if group == "all skills" else table["skills"][group]
        for m in models:
            c = cells.get(m.key)
            values[(group, m.label)] = (c["mean"], c["lo"], c["hi"]) if c else None
    return bar_chart(f"{table['short']}: mean and {_pct(table)} bootstrap interval per skill", groups, [m.label for m in models],
                     [m.kind for m in models], values)


def _pct(table: dict[str, Any]) -> str:
    cells = next(iter(table.get("overall", {}).values()), None)
    return f"{round(100 * cells['confidence'])}%" if cells else "95%"


def _grid(folder: Path, skill: str, data: dict[str, Any], models: Sequence[ModelEntry], limit: int) -> Any:
    by_key = {(r["model"], r["prompt_id"], r["sample"]): r for r in data["records"]}
    prompts = [p for p in data["prompts"] if p["skill"] == skill][:limit]
    rows = []
    for p in prompts:
        recs = [by_key[(m.key, p["id"], 0)] for m in models]
        rows.append(GridRow(p["prompt"], [folder / r["file"] for r in recs], [_note(r) for r in recs]))
    columns = [m.label if m.label == m.kind else f"{m.label} ({m.kind}{': ' + m.skill if m.skill else ''})"
               for m in models]
    return grid_image(f"{skill}: {len(prompts)} of {sum(p['skill'] == skill for p in data['prompts'])} prompts, "
                      "sample 0", columns, colours([m.kind for m in models]), rows)


def _note(record: dict[str, Any]) -> str:
    note = f"CLIP {record['clip']:.3f}"
    if record.get("dsg") is not None:
        note += f" · DSG {record['dsg']:.2f}"
    return note

