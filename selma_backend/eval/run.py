"""Stage 6: ``evaluate`` -- render base and LoRAs with the same seeds, score, compare, report.

prepare (models and LoRA headers, output folder, prompts, DSG questions: everything that can fail
cheaply fails before a GPU minute) -> render (one pipeline, one LoRA at a time) -> score (CLIP, then
the vision model) -> summarize (bootstrap) -> report (written in a staging folder, renamed into place).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SelmaError
from ..filter.config import ScorerConfig
from ..models.base import LoadedPipeline
from ..models.config import ModelConfig
from ..render.render import load_prompts
from . import dsg
from .config import EvalConfig
from .models import ModelEntry, describe_models
from .prompts import PromptSet, PromptSpec, collect_prompts
from .render import EvalItem, Stopped, image_path, plan_items, render_models
from .report import REPORT_FORMAT, discard, open_staging, publish, write_report
from .summary import summarize, text_table

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


@dataclass
class EvalReport:
    """What a run did; ``out_dir`` holds the report when ``status == "complete"``."""

    status: str  # complete | stopped
    out_dir: str = ""
    table: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    overview: str = ""  # the grid of every skill (PNG path)
    images: int = 0
    elapsed_s: float = 0.0
    contaminated: int = 0


def evaluate(model: ModelConfig | LoadedPipeline, loras: Sequence[str | os.PathLike[str]],
             prompts: PromptSpec | Sequence[dict[str, Any]], clip: ScorerConfig, out_dir: str | os.PathLike[str],
             config: EvalConfig, *, overwrite: bool = False, progress: Progress | None = None,
             should_stop: ShouldStop | None = None, user_dir: Path | None = None, question_llm: Any = None,
             answer_vlm: Any = None, prompt_backend: Any = None) -> EvalReport:
    """Evaluate the base ``model`` and each LoRA file on ``prompts``; write the report to ``out_dir``.

    ``model``: a ModelConfig (loaded here and released before scoring) or a LoadedPipeline (the
    caller's). ``prompts``: a PromptSpec, or rows ``{id, skill, prompt}``. ``question_llm`` /
    ``answer_vlm``: chat backends for the DSG score (default: built from ``config`` with the key from
    the environment or ``user_dir``). ``prompt_backend`` writes held-out prompts (default: offline).
    ``progress(done, total)``; ``should_stop()`` ends the run with status "stopped" and no report.
    """
    run = _Run(config, progress, should_stop)
    arch = model.arch if isinstance(model, LoadedPipeline) else _detect_arch(model)
    models = describe_models(loras, arch)
    _check_clip(clip)
    staging = open_staging(out_dir, overwrite)
    try:
        data = run.execute(model, models, prompts, clip, staging, user_dir, question_llm, answer_vlm, prompt_backend)
        write_report(staging, data, models, config.grid_prompts)
        out = publish(staging, out_dir, overwrite)
    except Stopped:
        discard(staging)
        return EvalReport("stopped", elapsed_s=time.monotonic() - run.started)
    except BaseException:
        discard(staging)
        raise
    return EvalReport("complete", str(out), text_table(data["summary"], models), data["summary"],
                      str(out / "grid.png"), len(data["records"]), data["elapsed_s"], len(data["contamination"]))


def _detect_arch(model: ModelConfig) -> str:
    from ..models.detect import detect_architecture

    return detect_architecture(model.path, allow_pickle=model.allow_pickle).arch


def _check_clip(clip: ScorerConfig) -> None:
    """The CLIP files are there (an open_clip folder with config and weights, or a file and its arch):
    found out before rendering, not after."""
    from ..filter.scorer import CONFIG_FILE, WEIGHT_FILES

    path = Path(clip.path).expanduser()
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file() or not any((path / n).is_file() for n in WEIGHT_FILES):
            raise SelmaError(f"{path}: not an open_clip folder ({CONFIG_FILE} and a weight file such as "
                             f"{WEIGHT_FILES[0]}); pick a CLIP model from models/clip")
    elif not path.is_file():
        raise SelmaError(f"clip: got {clip.path!r}; allowed: an existing open_clip folder or weight file")
    elif not clip.arch:
        raise SelmaError(f"{path}: a bare weight file needs its open_clip architecture (arch, e.g. 'ViT-B-32')")


class _Run:
    """One evaluation: progress accounting and the stages, in order."""

    def __init__(self, config: EvalConfig, progress: Progress | None, should_stop: ShouldStop | None) -> None:
        self.config, self.progress, self.should_stop = config, progress, should_stop
        self.done, self.total = 0, 1
        self.started = time.monotonic()
        self.clip_info: dict[str, Any] = {}

    def tick(self, n: int = 1) -> None:
        self.done += n
        if self.progress:
            self.progress(min(self.done, self.total), self.total)

    def check_stop(self) -> None:
        if self.should_stop and self.should_stop():
            raise Stopped

    def execute(self, model: ModelConfig | LoadedPipeline, models: list[ModelEntry],
                prompts: PromptSpec | Sequence[dict[str, Any]], clip: ScorerConfig, staging: Path,
                user_dir: Path | None, question_llm: Any, answer_vlm: Any, prompt_backend: Any) -> dict[str, Any]:
        cfg = self.config
        pset = _prompt_set(prompts, staging / "prompts", prompt_backend)
        items = plan_items(pset.rows, cfg)
        n_images = len(items) * len(models)
        self.total = n_images * (3 if cfg.uses_vqa else 2) + (len(pset.rows) if cfg.uses_vqa else 0)
        self.tick(0)
        questions = self.questions(pset.rows, user_dir, question_llm) if cfg.uses_vqa else {}
        lp_info, settings = self.render(model, models, items, staging)
        records = [_record(m, it) for m in models for it in items]
        self.clip_scores(clip, staging, records, {r["id"]: r["prompt"] for r in pset.rows})
        if cfg.uses_vqa:
            self.dsg_scores(staging, records, questions, user_dir, answer_vlm)
        skills = pset.skills()
        return {
            "format": REPORT_FORMAT, "selma_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.monotonic() - self.started, 3), "config": cfg.to_dict(),
            "prompt_spec": prompts.to_dict() if isinstance(prompts, PromptSpec) else None,
            "base_model": lp_info, "models": [m.to_dict() for m in models], "skills": skills, "prompts": pset.rows,
            "prompt_files": pset.files, "contamination": pset.contaminated, "settings": settings,
            "clip_model": self.clip_info, "vqa": self.vqa_info(),
            "questions": {pid: [q.to_dict() for q in qs] for pid, qs in questions.items()},
            "records": records, "summary": summarize(records, models, skills, cfg),
        }

    # -- stages
    def questions(self, rows: list[dict[str, Any]], user_dir: Path | None, llm: Any) -> dict[str, list[dsg.Question]]:
        from ..render.render import derive_seed

        owned = llm is None
        llm = llm or _chat(self.config, "question", user_dir)
        out = {}
        try:
            for row in rows:
                self.check_stop()
                seed = derive_seed(self.config.render.seed, row["id"], 0) & 0x7FFFFFFF
                out[row["id"]] = dsg.generate_questions(llm, row["prompt"], seed=seed, limit=self.config.max_questions)
                self.tick()
        finally:
            if owned:
                llm.close()
        return out

    def render(self, model: ModelConfig | LoadedPipeline, models: list[ModelEntry], items: list[EvalItem],
               staging: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        from ..models.loader import load_pipeline

        lp = model if isinstance(model, LoadedPipeline) else load_pipeline(model)
        try:
            if lp.pipe is None:
                raise SelmaError("the model was released; load it again before evaluating")
            settings = render_models(lp.pipe, models, items, staging, self.config, tick=self.tick,
                                     should_stop=self.should_stop)
            info = {"name": Path(lp.source).name, "path": lp.source, "hash": lp.model_hash, "arch": lp.arch,
                    "prediction_type": lp.prediction_type}
        finally:
            if lp is not model:
                lp.release()  # the renderer leaves before the scorers come
        return info, settings

    def clip_scores(self, clip: ScorerConfig, staging: Path, records: list[dict[str, Any]],
                    prompt_of: dict[str, str]) -> None:
        from ..filter.scorer import embed_captions, embed_files, load_scorer

        with load_scorer(clip) as scorer:
            start = self.done
            emb = embed_files(scorer, [staging / r["file"] for r in records], should_stop=self.should_stop,
                              progress=lambda d, _t: self.tick(start + d - self.done))
            if emb.stopped:
                raise Stopped
            if emb.errors:
                i, why = next(iter(emb.errors.items()))
                raise SelmaError(f"{records[i]['file']}: {why}")
            text = embed_captions(scorer, [prompt_of[r["prompt_id"]] for r in records])
            for r, value in zip(records, (emb.emb * text).sum(dim=1).tolist(), strict=True):
                r["clip"] = round(float(value), 6)
            self.clip_info = scorer.info

    def dsg_scores(self, staging: Path, records: list[dict[str, Any]], questions: dict[str, list[dsg.Question]],
                   user_dir: Path | None, vlm: Any) -> None:
        owned = vlm is None
        vlm = vlm or _chat(self.config, "answer", user_dir)
        try:
            with ThreadPoolExecutor(self.config.vqa_workers) as pool:
                futures = {pool.submit(dsg.score_image, vlm, questions[r["prompt_id"]], _plain_png(staging / r["file"]),
                                       seed=r["seed"] & 0x7FFFFFFF): r for r in records}
                try:
                    for fut in as_completed(futures):
                        r, result = futures[fut], fut.result()
                        r.update(dsg=result.score, dsg_categories=result.categories, answers=result.to_dict()["answers"])
                        self.tick()
                        self.check_stop()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            if owned:
                vlm.close()

    def vqa_info(self) -> dict[str, Any] | None:
        c = self.config
        return {"url": c.vqa_url, "model": c.vqa_model, "question_model": c.question_model or c.vqa_model} \
            if c.uses_vqa else None


def _prompt_set(prompts: PromptSpec | Sequence[dict[str, Any]], workdir: Path, backend: Any) -> PromptSet:
    if isinstance(prompts, PromptSpec):
        workdir.mkdir(parents=True, exist_ok=True)
        return collect_prompts(prompts, workdir, backend=backend)
    rows = [{"id": r["id"], "skill": r["skill"], "prompt": r["prompt"], "source": r.get("source", "rows")}
            for r in load_prompts(list(prompts))]
    return PromptSet(rows)


def _record(model: ModelEntry, item: EvalItem) -> dict[str, Any]:
    return {"model": model.key, "prompt_id": item.prompt_id, "skill": item.skill, "sample": item.sample,
            "seed": item.seed, "file": image_path(model.key, item), "clip": None, "dsg": None}


def _chat(config: EvalConfig, role: str, user_dir: Path | None) -> Any:
    from ..llm.backends import make_chat_backend

    return make_chat_backend(config.chat_config(role), user_dir=user_dir)


def _plain_png(path: Path) -> bytes:
    """The image's pixels as PNG without SELMA's text chunk (the prompt must not reach the answerer)."""
    from PIL import Image

    with Image.open(path) as im:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
