"""The world half of ``selma demo``: held-out world prompts, the world judge's accuracy, a before/after grid.

The evaluation stage renders the base model, each expert and the merge on held-out world prompts
(:func:`.world.skills.world_prompts` with ``split="heldout"``: no training prompt shares their meaning)
with the same seeds. This module judges every one of those images with the world's exact judge
(:func:`.world.judge.judge`: DSG-style questions answered from the pixels) and draws base vs merged
side by side.

Two numbers per model: ``score``, the mean share of a prompt's questions the image passes (DSG
accuracy), and ``all_correct``, the share of images that pass every question.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

GRID_PROMPTS = 8  # rows of the before/after grid
BASE = "base"


def heldout_rows(skills: list[str], count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` held-out prompt rows of each world skill (``{id, skill, prompt}``), skill after skill."""
    from .world.skills import world_prompts

    return [{"id": r["id"], "skill": r["skill"], "prompt": r["prompt"]}
            for s in skills for r in world_prompts(s, count, seed=seed, split="heldout")]


def judge_report(report_dir: str | Path) -> dict[str, Any]:
    """Judge every image of an evaluation report; ``{"models": {key: {score, all_correct, images,
    per_skill}}, "base": key, "merged": key, "images": {(model, prompt_id): (path, score)}}``."""
    from PIL import Image

    from .world.judge import judge

    root = Path(report_dir)
    data = json.loads((root / "scores.json").read_text(encoding="utf-8"))
    prompts = {p["id"]: p for p in data["prompts"]}
    per: dict[str, dict[str, list[float]]] = {}
    images: dict[tuple[str, str], tuple[Path, float]] = {}
    for r in data["records"]:
        with Image.open(root / r["file"]) as im:
            score = judge(im.convert("RGB"), prompts[r["prompt_id"]]["prompt"]).score
        per.setdefault(r["model"], {}).setdefault(r["skill"], []).append(score)
        images[(r["model"], r["prompt_id"])] = (root / r["file"], score)
    models = {key: _summary(by_skill) for key, by_skill in per.items()}
    kinds = {m["key"]: m["kind"] for m in data["models"]}
    merged = next((k for k, kind in kinds.items() if kind == "merged"), None)
    return {"models": models, "base": BASE, "merged": merged, "images": images,
            "prompt_order": [p["id"] for p in data["prompts"]], "prompts": prompts}


def _summary(by_skill: dict[str, list[float]]) -> dict[str, Any]:
    scores = [s for v in by_skill.values() for s in v]
    return {"score": round(sum(scores) / len(scores), 4), "all_correct": round(sum(s == 1.0 for s in scores) / len(scores), 4),
            "images": len(scores),
            "per_skill": {k: round(sum(v) / len(v), 4) for k, v in by_skill.items()}}


def before_after_grid(judged: dict[str, Any], out_path: str | Path, rows: int = GRID_PROMPTS) -> Path:
    """Base | merged for the first held-out prompts of each skill (alternating), judge score under each."""
    from .eval.grid import GridRow, grid_image
    from .fsio import atomic_write_bytes

    base, merged = judged["base"], judged["merged"]
    by_skill: dict[str, list[str]] = {}
    for pid in judged["prompt_order"]:
        by_skill.setdefault(judged["prompts"][pid]["skill"], []).append(pid)
    order = [pid for group in zip(*by_skill.values(), strict=False) for pid in group][:rows]
    grid_rows = []
    for pid in order:
        (b_path, b_score), (m_path, m_score) = judged["images"][(base, pid)], judged["images"][(merged, pid)]
        grid_rows.append(GridRow(judged["prompts"][pid]["prompt"], [b_path, m_path],
                                 [f"judge {b_score:.2f}", f"judge {m_score:.2f}"]))
    b, m = judged["models"][base], judged["models"][merged]
    title = f"judge: base {b['score']:.2f}, merged {m['score']:.2f}"  # mean over all held-out prompts
    img = grid_image(title, ["base", "merged (SELMA)"], ["#9e9e9e", "#7c4dff"], grid_rows)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(out_path, buf.getvalue(), overwrite=True)


def format_table(judged: dict[str, Any]) -> str:
    """One line per model: judge score and share of fully correct images (base first, merged last)."""
    lines = [f"{'model':<24} {'judge score':>11} {'all correct':>11} {'images':>6}"]
    for key, m in judged["models"].items():
        lines.append(f"{key:<24} {m['score']:>11.3f} {m['all_correct']:>11.3f} {m['images']:>6}")
    return "\n".join(lines)
