"""Stage 6 of ``selma reproduce``: render every arm on the held-out prompts, judge and CLIP-score each image.

Rendering reuses stage 6 of the pipeline (:func:`selma_backend.eval.render.render_models`: one
pipeline, each LoRA applied in turn by :func:`selma_backend.eval.models.lora_applied`, image (prompt,
sample) seeded identically for every arm). Only missing images are rendered; an arm whose LoRA file
changed since its images were made has them removed and rendered again (``eval/arms.json``).

Scores per image (cached in ``eval/scores/<arm>.json`` by image hash): ``judge`` (share of the
prompt's DSG questions passed, exact), ``all_correct`` (1.0 when every question passed) and ``clip``
(cosine of the world CLIP's image and caption embeddings).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..fsio import atomic_write_json, read_jsonl, sha256_file
from .reproduce import ReproduceConfig, Say
from .spec import PromptSpec

METRICS = ("judge", "all_correct", "clip")
CLIP_BATCH = 64


def arm_key(arm: str) -> str:
    """The folder name of an arm's images (``expert:world_counting`` -> ``expert-world_counting``)."""
    return arm.replace(":", "-")


def score_image(image: Any, spec: PromptSpec) -> tuple[float, bool]:
    """(share of the prompt's DSG questions the image passes, whether it passes all of them)."""
    from .judge import judge

    result = judge(image, spec)
    return float(result.score), all(result.passed.values())


def heldout_rows(config: ReproduceConfig, prompts: dict[str, dict[str, Path]]) -> list[dict[str, Any]]:
    return [r for skill in config.skills for r in read_jsonl(prompts[skill]["heldout"])]


def eval_config(config: ReproduceConfig) -> Any:
    from ..eval import EvalConfig
    from .reproduce_stages import render_config

    # A seed of its own: evaluation noise is not the noise any training image started from.
    return EvalConfig(render=render_config(config, config.eval_images, config.seed + 1), resamples=config.resamples,
                      stats_seed=config.seed, grid_prompts=config.grid_prompts)


def evaluate_arms(out: Path, config: ReproduceConfig, prompts: dict[str, dict[str, Path]], loras: dict[str, Path],
                  arms: list[str], say: Say) -> dict[str, Any]:
    """Render (what is missing) and score every arm; return per-image and per-prompt scores.

    Result: ``{"rows": held-out rows, "items": [(arm-independent) image stems], "images": {arm: {stem: path}},
    "scores": {arm: {stem: {metric: value}}}, "per_prompt": {arm: {metric: {prompt id: mean}}},
    "loras": {arm: {"path", "sha256"}}, "rendered": images rendered now}``."""
    from ..eval.render import image_path, plan_items

    rows = heldout_rows(config, prompts)
    ec = eval_config(config)
    items = plan_items(rows, ec)
    root = out / "eval"
    entries, rendered = _render(root, config, arms, loras, items, ec, say)
    scores, clip_model = _score_all(root, config, rows, items, entries, say)
    images = {arm: {it.stem: root / image_path(arm_key(arm), it) for it in items} for arm in arms}
    per_prompt = {arm: {m: _per_prompt(items, scores[arm], m) for m in METRICS} for arm in arms}
    return {"rows": rows, "items": [it.stem for it in items], "images": images, "scores": scores,
            "per_prompt": per_prompt, "rendered": rendered, "clip_model": clip_model,
            "loras": {arm: {"path": e.path, "sha256": e.sha256} for arm, e in entries.items()},
            "settings": ec.render.to_dict()}


def _entries(arms: list[str], loras: dict[str, Path], arch: str) -> dict[str, Any]:
    from dataclasses import replace

    from ..eval.models import ModelEntry, describe_models

    entries = {}
    for arm in arms:
        if arm == "base":
            entries[arm] = ModelEntry("base", "base", "base")
            continue
        lora = next(e for e in describe_models([loras[arm]], arch) if e.kind != "base")  # checks the file
        entries[arm] = replace(lora, key=arm_key(arm), label=arm)
    return entries


def _render(root: Path, config: ReproduceConfig, arms: list[str], loras: dict[str, Path], items: list[Any], ec: Any,
            say: Say) -> tuple[dict[str, Any], int]:
    """Render each arm's missing images (one pipeline, LoRAs applied in turn); returns (entries, rendered)."""
    from ..eval.render import image_path, render_models
    from ..models.config import ModelConfig
    from ..models.loader import load_pipeline

    record_path = root / "arms.json"
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    rendered = 0
    with load_pipeline(ModelConfig(path=config.model)) as lp:
        entries = _entries(arms, loras, lp.arch)
        for k, arm in enumerate(arms, 1):
            entry = entries[arm]
            key = arm_key(arm)
            if record.get(arm) != entry.sha256:  # new arm, or its LoRA changed: its old images are not its own
                shutil.rmtree(root / "images" / key, ignore_errors=True)
                (root / "scores" / f"{key}.json").unlink(missing_ok=True)
            missing = [it for it in items if not (root / image_path(key, it)).is_file()]
            if missing:
                render_models(lp.pipe, [entry], missing, root, ec)
            record[arm] = entry.sha256
            atomic_write_json(record_path, record)
            rendered += len(missing)
            say(f"      [{k}/{len(arms)}] {arm}: {len(missing)} rendered, {len(items) - len(missing)} already there")
    return entries, rendered


def _score_all(root: Path, config: ReproduceConfig, rows: list[dict[str, Any]], items: list[Any],
               entries: dict[str, Any], say: Say) -> tuple[dict[str, dict[str, dict[str, float]]], str]:
    from ..eval.render import image_path
    from ..filter import ScorerConfig, load_scorer

    specs = {r["id"]: PromptSpec.from_dict(r["spec"]) for r in rows}
    texts = {r["id"]: r["prompt"] for r in rows}
    out: dict[str, dict[str, dict[str, float]]] = {}
    with load_scorer(ScorerConfig(path=config.clip)) as scorer:
        text_emb = dict(zip(texts, scorer.embed_texts(list(texts.values())), strict=True))
        for arm, entry in entries.items():
            path = root / "scores" / f"{arm_key(arm)}.json"
            cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            if cache.get("clip_model") != scorer.model_key or cache.get("lora_sha256") != entry.sha256:
                cache = {"clip_model": scorer.model_key, "lora_sha256": entry.sha256, "images": {}}
            files = {it.stem: root / image_path(arm_key(arm), it) for it in items}
            shas = {stem: sha256_file(p) for stem, p in files.items()}
            todo = [it for it in items if cache["images"].get(it.stem, {}).get("sha256") != shas[it.stem]]
            for start in range(0, len(todo), CLIP_BATCH):
                batch = todo[start:start + CLIP_BATCH]
                cache["images"].update(_score_batch(scorer, batch, files, shas, specs, text_emb))
            if todo:
                atomic_write_json(path, cache)
            out[arm] = {it.stem: cache["images"][it.stem] for it in items}
            say(f"      scored {arm}: {len(todo)} new, judge {_mean(out[arm], 'judge'):.3f}, "
                f"all-correct {_mean(out[arm], 'all_correct'):.3f}, CLIP {_mean(out[arm], 'clip'):.4f}")
        key = scorer.model_key
    return out, key


def _score_batch(scorer: Any, batch: list[Any], files: dict[str, Path], shas: dict[str, str],
                 specs: dict[str, PromptSpec], text_emb: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Judge and CLIP-score a batch of images: stem -> {"sha256", "judge", "all_correct", "clip"}."""
    import torch
    from PIL import Image

    images = []
    for it in batch:
        with Image.open(files[it.stem]) as im:
            images.append(im.convert("RGB"))
    emb = scorer.embed_pixels(torch.stack([scorer.preprocess(im) for im in images]))
    result = {}
    for it, im, e in zip(batch, images, emb, strict=True):
        score, ok = score_image(im, specs[it.prompt_id])
        result[it.stem] = {"sha256": shas[it.stem], "judge": score, "all_correct": float(ok),
                           "clip": float((e * text_emb[it.prompt_id]).sum())}
    return result


def _mean(scores: dict[str, dict[str, float]], metric: str) -> float:
    values = [s[metric] for s in scores.values()]
    return sum(values) / len(values) if values else float("nan")


def _per_prompt(items: list[Any], scores: dict[str, dict[str, float]], metric: str) -> dict[str, float]:
    """prompt id -> mean of its images' ``metric`` (prompt order kept)."""
    from ..eval.stats import per_prompt_means

    by_prompt: dict[str, list[float]] = {}
    for it in items:
        by_prompt.setdefault(it.prompt_id, []).append(float(scores[it.stem][metric]))
    return per_prompt_means(by_prompt)
