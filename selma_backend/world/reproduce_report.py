"""The table of ``selma reproduce``: statistics, claims with verdicts, Markdown, grids.

Every mean has a 95% percentile-bootstrap interval over held-out prompts
(:func:`selma_backend.eval.stats.bootstrap_ci`; a prompt's images are averaged first) and every arm a
paired difference to the base on the same prompts (:func:`~selma_backend.eval.stats.paired_difference`).
Resamples are seeded per (metric, scope) and shared by every comparison in that scope, so the table
and the claims agree to the digit. A claim's verdict comes from the interval of its difference:
above 0 "reproduces", below 0 "does not reproduce", otherwise inconclusive.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from ..eval.stats import Estimate, bootstrap_ci, derive_seed, paired_difference, verdict
from ..fsio import atomic_write_bytes, atomic_write_json, atomic_write_text
from .reproduce import MERGE_ARMS, ReproduceConfig, Say
from .reproduce_eval import METRICS

REPRODUCES = "reproduces"
DOES_NOT = "does not reproduce"
INCONCLUSIVE = "inconclusive (CI of the difference includes 0)"
VERDICT_PHRASES = (REPRODUCES, DOES_NOT, INCONCLUSIVE)
OVERALL = "overall"
METRIC_TITLES = {"judge": "Judge accuracy (share of DSG questions passed)", "all_correct": "All-correct rate (every question passed)",
                 "clip": "World CLIP score (cosine)"}
PRIMARY = "judge"


def claim_phrase(diff: Estimate) -> str:
    """The verdict phrase of a difference (claimed arm minus the arm it should beat)."""
    return {"better": REPRODUCES, "worse": DOES_NOT, "unclear": INCONCLUSIVE}[verdict(diff)]


def combine(phrases: list[str]) -> str:
    """All parts reproduce: reproduces; any part contradicts: does not reproduce; else inconclusive."""
    if phrases and all(p == REPRODUCES for p in phrases):
        return REPRODUCES
    return DOES_NOT if DOES_NOT in phrases else INCONCLUSIVE


class Stats:
    """Per-prompt vectors of every arm, metric and scope (a skill or ``overall``) and their statistics."""

    def __init__(self, config: ReproduceConfig, results: dict[str, Any]) -> None:
        self.config = config
        self.per_prompt = results["per_prompt"]
        rows = results["rows"]
        self.ids = {s: [r["id"] for r in rows if r["skill"] == s] for s in config.skills}
        self.ids[OVERALL] = [r["id"] for r in rows]

    def vector(self, arm: str, metric: str, scope: str) -> list[float]:
        return [self.per_prompt[arm][metric][pid] for pid in self.ids[scope]]

    def seed(self, metric: str, scope: str) -> int:
        return derive_seed(self.config.seed, metric, scope)

    def mean(self, arm: str, metric: str, scope: str) -> Estimate:
        return bootstrap_ci(self.vector(arm, metric, scope), resamples=self.config.resamples, seed=self.seed(metric, scope))

    def diff(self, arm: str, other: str, metric: str, scope: str) -> Estimate:
        return paired_difference(self.vector(arm, metric, scope), self.vector(other, metric, scope),
                                 resamples=self.config.resamples, seed=self.seed(metric, scope))


def _est(e: Estimate) -> dict[str, Any]:
    return {"mean": e.mean, "lo": e.lo, "hi": e.hi, "n": e.n}


def results_table(stats: Stats, arms: list[str]) -> dict[str, Any]:
    """arm -> scope -> metric -> {mean, lo, hi, n, diff_vs_base: {...}, verdict_vs_base}."""
    table: dict[str, Any] = {}
    for arm in arms:
        table[arm] = {}
        for scope in [*stats.config.skills, OVERALL]:
            table[arm][scope] = {}
            for metric in METRICS:
                cell = _est(stats.mean(arm, metric, scope))
                if arm != "base":
                    d = stats.diff(arm, "base", metric, scope)
                    cell["diff_vs_base"] = _est(d)
                    cell["verdict_vs_base"] = verdict(d)
                table[arm][scope][metric] = cell
    return table


def _claim(cid: str, text: str, stats: Stats, arm: str, other: str, scope: str) -> dict[str, Any]:
    d = stats.diff(arm, other, PRIMARY, scope)
    return {"id": cid, "text": text, "verdict": claim_phrase(d), "arm": arm, "versus": other, "scope": scope,
            "metric": PRIMARY, "diff": _est(d)}


def claims(stats: Stats) -> list[dict[str, Any]]:
    """The paper's claims (a)-(e) on the judge's accuracy over all held-out prompts (and (c) per skill)."""
    out = [_claim("a", "Experts merged (linear, 1/N) beat the base model", stats, "merged:linear", "base", OVERALL),
           _claim("b", "Merged experts (linear) beat one joint LoRA trained on the same data", stats, "merged:linear",
                  "joint", OVERALL)]
    parts = [_claim(f"c:{s}", f"The {s} expert improves {s} over the base", stats, f"expert:{s}", "base", s)
             for s in stats.config.skills]
    out.append({"id": "c", "text": "Each expert improves its own skill over the base", "metric": PRIMARY,
                "verdict": combine([p["verdict"] for p in parts]), "parts": parts})
    out.append(_claim("d", "CLIP filtering helps (linear merge of filtered vs unfiltered experts)", stats,
                      "merged:linear", "nofilter", OVERALL))
    out.append(_claim("e", "Weak-to-strong (strong model trained on the weak model's filtered data) beats the base",
                      stats, "weak2strong", "base", OVERALL))
    return out


def best_merge(stats: Stats) -> dict[str, Any]:
    """The merge method with the highest overall judge accuracy, and whether it is separated from the others."""
    means = {m: stats.mean(f"merged:{m}", PRIMARY, OVERALL).mean for m in MERGE_ARMS}
    best = max(MERGE_ARMS, key=lambda m: means[m])
    versus = {m: _est(stats.diff(f"merged:{best}", f"merged:{m}", PRIMARY, OVERALL)) for m in MERGE_ARMS if m != best}
    separated = all(v["lo"] > 0 for v in versus.values())
    return {"best": best, "means": means, "diff_vs_others": versus, "separated": separated}


# --- Markdown ------------------------------------------------------------------------------------------------


def _f(x: float | None, digits: int = 3, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _cell(c: dict[str, Any], digits: int) -> str:
    text = f"{_f(c['mean'], digits)} [{_f(c['lo'], digits)}, {_f(c['hi'], digits)}]"
    d = c.get("diff_vs_base")
    if d:
        text += f"<br>Δ {_f(d['mean'], digits, True)} [{_f(d['lo'], digits, True)}, {_f(d['hi'], digits, True)}]"
    return text


def markdown(table: dict[str, Any]) -> str:
    cfg, skills, arms = table["config"], table["skills"], table["arms"]
    lines = ["# SELMA in the shapes world", "",
             f"Strong model `{Path(cfg['model']).name}`, weak model `{Path(cfg['weak_model']).name}`, scored by the "
             f"exact judge and `{Path(cfg['clip']).name}`. {cfg['n_eval']} held-out prompts per skill x "
             f"{cfg['eval_images']} image(s); {cfg['n_train']} training prompts per skill x {cfg['train_images']} "
             f"images, the CLIP filter keeping the best {cfg['filter_top_k']}; LoRA rank {cfg['rank']}, "
             f"{cfg['train_steps']} steps per expert (joint: {cfg['train_steps'] * len(skills)}). "
             "Cells: mean [95% bootstrap CI over prompts], then the paired difference to base.", ""]
    for metric in METRICS:
        digits = 4 if metric == "clip" else 3
        lines += [f"## {METRIC_TITLES[metric]}", "", "| arm | " + " | ".join([*skills, OVERALL]) + " |",
                  "|---" * (len(skills) + 2) + "|"]
        for arm in arms:
            cells = [_cell(table["results"][arm][s][metric], digits) for s in [*skills, OVERALL]]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Training data: judge accuracy before -> after the CLIP filter", "",
              "| model | skill | images | kept | judge (all -> kept) | all-correct (all -> kept) |", "|---|---|---|---|---|---|"]
    for which, per_skill in table["data_quality"].items():
        for skill, q in per_skill.items():
            lines.append(f"| {which} | {skill} | {q['images']} | {q['kept']} | {_f(q['judge_all'])} -> "
                         f"{_f(q['judge_kept'])} | {_f(q['all_correct_all'])} -> {_f(q['all_correct_kept'])} |")
    lines += ["", "## Claims", "", "Verdicts from the judge's accuracy on held-out prompts: the 95% CI of the "
              "difference above 0 reproduces, below 0 does not reproduce, otherwise inconclusive.", ""]
    for c in table["claims"]:
        lines.append(f"- ({c['id']}) {c['text']}: **{c['verdict']}**" + (_diff_text(c) if "diff" in c else ""))
        for p in c.get("parts", []):
            lines.append(f"  - {p['text']}: **{p['verdict']}**{_diff_text(p)}")
    b = table["best_merge"]
    others = ", ".join(f"{m} {_f(b['means'][m])}" for m in b["means"] if m != b["best"])
    lines.append(f"- Best merge method: **{b['best']}** (judge {_f(b['means'][b['best']])}; {others}); "
                 + ("its lead is outside the CIs of the differences." if b["separated"] else
                    "inconclusive (CI of the difference to another method includes 0)."))
    lines += ["", "## Timings (this invocation, seconds)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in table["timings_s"].items()]
    return "\n".join(lines) + "\n"


def _diff_text(c: dict[str, Any]) -> str:
    d = c["diff"]
    return f" ({c['arm']} - {c['versus']} on {c['scope']}: {_f(d['mean'], 3, True)} [{_f(d['lo'], 3, True)}, {_f(d['hi'], 3, True)}])"


# --- grids ---------------------------------------------------------------------------------------------------


def _kind(arm: str) -> str:
    return "base" if arm == "base" else ("merged" if arm.startswith("merged") or arm in ("nofilter", "weak2strong")
                                         else "expert")


def _save_png(image: Any, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def grid(results: dict[str, Any], arms: list[str], rows: list[dict[str, Any]], title: str) -> Any:
    """Rows = prompts (their first image), columns = arms, the judge score under each image."""
    from ..eval.chart import colours
    from ..eval.grid import GridRow, grid_image

    grid_rows = []
    for r in rows:
        stem = next(s for s in results["items"] if s.startswith(r["id"] + "_"))
        grid_rows.append(GridRow(r["prompt"], [results["images"][a][stem] for a in arms],
                                 [f"judge {results['scores'][a][stem]['judge']:.2f}" for a in arms]))
    return grid_image(title, arms, colours([_kind(a) for a in arms]), grid_rows)


def write_grids(out: Path, config: ReproduceConfig, results: dict[str, Any], arms: list[str]) -> dict[str, str]:
    paths = {}
    for skill in config.skills:
        rows = [r for r in results["rows"] if r["skill"] == skill][:config.grid_prompts]
        paths[skill] = str(_save_png(grid(results, arms, rows, f"{skill}: held-out prompts"), out / "grids" / f"{skill}.png"))
    first = [next(r for r in results["rows"] if r["skill"] == s) for s in config.skills]
    paths["before_after"] = str(_save_png(grid(results, ["base", "merged:linear"], first,
                                               "base vs SELMA (merged experts)"), out / "before_after.png"))
    return paths


# --- outputs -------------------------------------------------------------------------------------------------


def _clean(obj: Any) -> Any:
    """NaN -> None, recursively (strict JSON)."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def write_outputs(out: Path, config: ReproduceConfig, results: dict[str, Any], quality: dict[str, Any],
                  meta: dict[str, Any], say: Say) -> dict[str, Any]:
    """table.json, table.md, grids/*.png, before_after.png; returns the table."""
    arms = list(results["per_prompt"])
    stats = Stats(config, results)
    table = {"config": config.to_dict(), **meta, "arms": arms, "skills": list(config.skills),
             "heldout_prompts": {s: stats.ids[s] for s in config.skills}, "eval_settings": results["settings"],
             "loras": results["loras"], "results": results_table(stats, arms), "data_quality": quality,
             "claims": claims(stats), "best_merge": best_merge(stats)}
    table["grids"] = write_grids(out, config, results, arms)
    table = _clean(table)
    atomic_write_json(out / "table.json", table)
    atomic_write_text(out / "table.md", markdown(table))
    say(f"      wrote {out / 'table.json'}, {out / 'table.md'}, {len(config.skills)} grids, {out / 'before_after.png'}")
    return table


def summary(table: dict[str, Any]) -> str:
    lines = ["", "judge accuracy over all held-out prompts (mean [95% CI]; Δ vs base):"]
    for arm in table["arms"]:
        c = table["results"][arm][OVERALL][PRIMARY]
        d = c.get("diff_vs_base")
        lines.append(f"  {arm:<28} {_f(c['mean'])} [{_f(c['lo'])}, {_f(c['hi'])}]"
                     + (f"  Δ {_f(d['mean'], 3, True)} [{_f(d['lo'], 3, True)}, {_f(d['hi'], 3, True)}]" if d else ""))
    lines.append("claims:")
    lines += [f"  ({c['id']}) {c['text']}: {c['verdict']}" for c in table["claims"]]
    lines.append(f"  best merge method: {table['best_merge']['best']}")
    return "\n".join(lines)
