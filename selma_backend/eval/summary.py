"""From per-image scores to the tables of a report: per metric, skill and model, the mean with its
bootstrap interval and the paired difference against the base (see :mod:`.stats`).

A record is one image: ``{"model", "prompt_id", "skill", "sample", "clip", "dsg", "dsg_categories"}``.
Metrics: ``clip`` (cosine of CLIP image and prompt embeddings, as stage 3), and with a vision
endpoint ``dsg`` (share of DSG questions passed) and ``dsg.<category>``. ``overall`` pools every
prompt of every skill.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import EvalConfig
from .dsg import CATEGORIES
from .models import ModelEntry
from .stats import bootstrap_ci, derive_seed, paired_difference, per_prompt_means, verdict

METRIC_LABELS = {"clip": "CLIP score (cosine similarity of image and prompt)",
                 "dsg": "DSG question score (share of questions passed)",
                 **{f"dsg.{c}": f"DSG {c} questions (share passed)" for c in CATEGORIES}}
METRIC_SHORT = {"clip": "CLIP score", "dsg": "DSG question score", **{f"dsg.{c}": f"DSG {c}" for c in CATEGORIES}}
OVERALL = "overall"


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    if metric.startswith("dsg."):
        return (record.get("dsg_categories") or {}).get(metric[4:])
    value = record.get(metric)
    return None if value is None else float(value)


def metrics_present(records: Sequence[dict[str, Any]]) -> list[str]:
    """``clip``, then ``dsg`` and the DSG categories some record has, in a fixed order."""
    out = ["clip"]
    if any(r.get("dsg") is not None for r in records):
        out.append("dsg")
        out += [f"dsg.{c}" for c in CATEGORIES if any(c in (r.get("dsg_categories") or {}) for r in records)]
    return out


def summarize(records: Sequence[dict[str, Any]], models: Sequence[ModelEntry], skills: Sequence[str],
              config: EvalConfig) -> dict[str, Any]:
    """``{metric: {"label", "skills": {skill: {model: cell}}, "overall": {model: cell}}}``.

    A cell: ``{"mean", "lo", "hi", "n", "confidence", "diff"}`` where ``diff`` (None for the base)
    is the paired difference to the base over the prompts both have, with its ``verdict``.
    """
    out: dict[str, Any] = {}
    for metric in metrics_present(records):
        table: dict[str, Any] = {"label": METRIC_LABELS.get(metric, metric), "short": METRIC_SHORT.get(metric, metric),
                                 "skills": {}}
        for group in [*skills, OVERALL]:
            chosen = [r for r in records if group == OVERALL or r["skill"] == group]
            cells = _cells(chosen, metric, models, derive_seed(config.stats_seed, metric, group), config)
            if group == OVERALL:
                table["overall"] = cells
            elif cells:
                table["skills"][group] = cells
        out[metric] = table
    return out


def _per_prompt(records: Sequence[dict[str, Any]], metric: str, model: str) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for r in records:
        v = metric_value(r, metric) if r["model"] == model else None
        if v is not None:
            scores.setdefault(r["prompt_id"], []).append(v)
    return per_prompt_means(scores)


def _cells(records: Sequence[dict[str, Any]], metric: str, models: Sequence[ModelEntry], seed: int,
           config: EvalConfig) -> dict[str, Any]:
    kw = {"resamples": config.resamples, "confidence": config.confidence, "seed": seed}
    base = _per_prompt(records, metric, "base")
    cells: dict[str, Any] = {}
    for model in models:
        mine = _per_prompt(records, metric, model.key)
        if not mine:
            continue
        cell: dict[str, Any] = {**bootstrap_ci(list(mine.values()), **kw).to_dict(), "diff": None}
        common = [pid for pid in mine if pid in base]
        if model.key != "base" and common:
            diff = paired_difference([mine[p] for p in common], [base[p] for p in common], **kw)
            cell["diff"] = {**diff.to_dict(), "verdict": verdict(diff)}
        cells[model.key] = cell
    return cells


def text_table(summary: dict[str, Any], models: Sequence[ModelEntry]) -> str:
    """The tables as plain text (the node's STRING output, the CLI's stdout)."""
    labels = {m.key: m.label for m in models}
    lines: list[str] = []
    for table in summary.values():
        cell = next(iter(table.get("overall", {}).values()), {"confidence": 0.95})
        pct = f"{round(100 * cell['confidence'])}% CI"
        lines.append(f"{table['label']} -- mean [{pct}]; difference to base [{pct}]")
        groups = [*table["skills"].items(), (OVERALL, table.get("overall", {}))]
        for group, cells in groups:
            for key, cell in cells.items():
                row = f"  {group[:20]:<20} {labels.get(key, key)[:24]:<24} {_interval(cell)}"
                if cell["diff"]:
                    d = cell["diff"]
                    row += f"   {_interval(d, signed=True)} {d['verdict']}"
                lines.append(row)
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _interval(cell: dict[str, Any], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(cell['mean'])} [{fmt.format(cell['lo'])}, {fmt.format(cell['hi'])}] n={cell['n']}"
