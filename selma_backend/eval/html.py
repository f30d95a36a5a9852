"""``index.html``: the report for a person, readable offline.

One self-contained page: inline CSS, no scripts, no web fonts (the system's sans-serif), every link
and image relative to the report folder. Every value taken from data is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape
from typing import Any

from .models import ModelEntry

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Hiragino Sans",sans-serif;margin:24px;
color:#222;max-width:1400px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
font-variant-numeric:tabular-nums}th{background:#f4f4f4}.better{color:#1a7f37;font-weight:600}
.worse{color:#c62828;font-weight:600}.unclear{color:#666}.note{color:#555;font-size:.92em}
.warn{background:#fff4e5;border:1px solid #f0b45a;padding:8px 12px}img{max-width:100%;height:auto}
code{background:#f4f4f4;padding:0 3px}
"""


def render_html(data: dict[str, Any], models: Sequence[ModelEntry]) -> str:
    """The whole page for the report ``data`` (the content of scores.json)."""
    parts = [_head(data), _models(models), _warnings(data)]
    for metric, table in data["summary"].items():
        parts.append(_table(metric, table, models, data["files"]["charts"].get(metric)))
    parts.append(_grids(data))
    parts.append(_settings(data))
    return "\n".join(["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">',
                      f"<title>SELMA evaluation: {escape(data['base_model']['name'])}</title>",
                      f"<style>{CSS}</style></head><body>", *parts, "</body></html>", ""])


def _head(data: dict[str, Any]) -> str:
    n_prompts, skills = len(data["prompts"]), data["skills"]
    r = data["settings"]
    return (f"<h1>SELMA evaluation of {escape(data['base_model']['name'])}</h1>"
            f"<p>{n_prompts} prompts in {len(skills)} skill(s) ({escape(', '.join(skills))}), "
            f"{r['images_per_prompt']} image(s) per prompt and model, {r['width']}×{r['height']} px, "
            f"{r['steps']} steps, guidance {r['cfg']:g}, seed {r['seed']}; every model renders every prompt from the "
            f"same seed. Made {escape(data['created'])} in {data['elapsed_s']:.0f} s. "
            f'All numbers: <a href="scores.json">scores.json</a>.</p>'
            f'<p class="note">Intervals are {round(100 * data["config"]["confidence"])}% percentile-bootstrap intervals '
            "over prompts (\u201call skills\u201d pools every prompt). A difference to the base is "
            "<span class=better>better</span> or "
            "<span class=worse>worse</span> only when its whole interval is above or below zero; otherwise it is "
            "<span class=unclear>unclear</span>: more prompts would be needed to tell.</p>")


def _models(models: Sequence[ModelEntry]) -> str:
    rows = "".join(f"<tr><td>{escape(m.label)}</td><td>{escape(m.kind)}</td><td>{escape(m.skill)}</td>"
                   f"<td><code>{escape(m.path) or '—'}</code></td><td><code>{escape(m.sha256[:12])}</code></td></tr>"
                   for m in models)
    return ("<h2>Models</h2><table><tr><th>model</th><th>kind</th><th>skill</th><th>LoRA file</th>"
            f"<th>sha256</th></tr>{rows}</table>")


def _warnings(data: dict[str, Any]) -> str:
    hits = data.get("contamination") or []
    if not hits:
        return ""
    items = "".join(f"<li>{escape(h['prompt'])} ≈ training prompt “{escape(h['train_prompt'])}” "
                    f"(ROUGE-L {h['rouge_l']:.2f})</li>" for h in hits[:50])
    more = f"<li>… and {len(hits) - 50} more (scores.json)</li>" if len(hits) > 50 else ""
    return (f'<div class="warn"><b>{len(hits)} evaluation prompt(s) nearly copy training prompts and were left out'
            f"</b> (a score on a training prompt measures memory, not skill):<ul>{items}{more}</ul></div>")


def _table(metric: str, table: dict[str, Any], models: Sequence[ModelEntry], chart: str | None) -> str:
    head = "".join(f"<th>{escape(m.label)}</th>" for m in models)
    body = []
    groups = [*table["skills"].items(), ("all skills", table.get("overall", {}))]
    for group, cells in groups:
        tds = "".join(_cell(cells.get(m.key)) for m in models)
        body.append(f"<tr><th>{escape(group)}</th>{tds}</tr>")
    img = f'<p><img src="{escape(chart)}" alt="{escape(table["label"])} per skill"></p>' if chart else ""
    return (f'<h2 id="{escape(metric)}">{escape(table["label"])}</h2>{img}'
            f"<table><tr><th>skill</th>{head}</tr>{''.join(body)}</table>")


def _cell(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "<td>—</td>"
    text = f"{cell['mean']:.3f} <span class=note>[{cell['lo']:.3f}, {cell['hi']:.3f}] n={cell['n']}</span>"
    d = cell.get("diff")
    if d:
        text += (f"<br><span class={d['verdict']}>{d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] "
                 f"{d['verdict']}</span>")
    return f"<td>{text}</td>"


def _grids(data: dict[str, Any]) -> str:
    items = "".join(f'<h3>{escape(skill)}</h3><p><img src="{escape(name)}" alt="grid of {escape(skill)}"></p>'
                    for skill, name in data["files"]["grids"].items())
    return ("<h2>Side by side</h2><p class=note>Each row: one prompt (its text above), the base and each LoRA from "
            f"the same seed. Every image is in <code>images/</code>.</p>{items}")


def _settings(data: dict[str, Any]) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th><td><code>{escape(str(v))}</code></td></tr>"
                   for k, v in _flat(data["config"]).items())
    return f"<h2>Settings</h2><table>{rows}</table>"


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
