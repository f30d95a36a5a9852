"""Stage 6 end to end on the tiny SD1 model: base + a random expert LoRA + a random "merged" LoRA (B non-zero),
held-out and user prompts, CLIP and DSG scores (fake vision server), the report folder, the page in headless
Chromium, the CLI, Cancel, and what is refused before any rendering."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from eval_helpers import random_lora
from fakes.openai_server import FakeOpenAIServer
from fakes.vision import VisionFake, dominant_colour
from PIL import Image

from selma_backend.cli import main
from selma_backend.errors import SelmaError
from selma_backend.eval import EvalConfig, PromptSpec, evaluate
from selma_backend.eval.models import describe_models, lora_applied
from selma_backend.filter import ScorerConfig, load_scorer
from selma_backend.fsio import read_jsonl
from selma_backend.models.config import ModelConfig
from selma_backend.models.loader import load_pipeline
from selma_backend.prompts import PromptConfig, generate_prompts
from selma_backend.render.config import RenderConfig
from selma_backend.render.render import derive_seed
from selma_backend.render.schedulers import build_scheduler

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-eval-NeverWritten42"
RENDER = RenderConfig(steps=2, width=64, height=64, batch_size=3, seed=7, scheduler="euler")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def loras(tiny_models, work) -> tuple[Path, Path]:
    expert = random_lora(tiny_models["sd1"], work / "countbench-expert.safetensors", seed=1, text_encoder=True,
                         provenance={"skill": "countbench", "dataset_sha256": "ab" * 32})
    merged = random_lora(tiny_models["sd1"], work / "merged.safetensors", seed=2,
                         provenance={"method": "svd", "sources": ["countbench-expert", "spatial-expert"]})
    return expert, merged


@pytest.fixture(scope="module")
def train(work) -> Path:
    out = work / "countbench-seed0.jsonl"
    generate_prompts(PromptConfig(skill="countbench", count=40, seed=0), out)
    return out


@pytest.fixture(scope="module")
def run(tiny_models, loras, train, work):
    """One full evaluation: 3 held-out countbench prompts + 2 user prompts (spatial), one user prompt that
    copies a training prompt, 3 models, CLIP + DSG through the fake vision server (API key from the env)."""
    csv = work / "mine.csv"
    copy = read_jsonl(train)[5]["prompt"]
    csv.write_text(f'id,prompt,skill\nu1,a blue cup to the left of a red box,spatial\nu2,"{copy}",spatial\n'
                   "u3,a cat above a dog,spatial\n")
    spec = PromptSpec(files=(str(csv),), heldout_skills=("countbench",), heldout_count=3, train_prompts=(str(train),))
    fake = VisionFake()
    seen: list[tuple[int, int]] = []
    os.environ["SELMA_TEST_VQA_KEY"] = KEY
    try:
        with FakeOpenAIServer(models=["tiny-vlm"], reply=fake, api_key=KEY) as srv:
            config = EvalConfig(render=RENDER, resamples=300, vqa_url=srv.base_url, vqa_model="tiny-vlm",
                                vqa_key_env="SELMA_TEST_VQA_KEY", vqa_workers=2, vqa_max_retries=0)
            report = evaluate(ModelConfig(path=str(tiny_models["sd1"])), [str(p) for p in loras], spec,
                              ScorerConfig(path=str(tiny_models["clip"])), work / "report", config,
                              progress=lambda d, t: seen.append((d, t)))
    finally:
        os.environ.pop("SELMA_TEST_VQA_KEY", None)
    return report, json.loads((Path(report.out_dir) / "scores.json").read_text()), seen, fake


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_the_report_folder_has_everything(run, work):
    report, scores, seen, _ = run
    out = Path(report.out_dir)
    assert report.status == "complete" and out == work / "report"
    for name in ("scores.json", "index.html", "chart-clip.png", "chart-dsg.png", "grid.png", "grid-countbench.png",
                 "grid-spatial.png", "prompts/heldout-countbench.jsonl"):
        assert (out / name).is_file(), name
    assert not [p for p in work.iterdir() if p.name.startswith(".report.")]  # no staging folder left
    assert [(m["key"], m["kind"]) for m in scores["models"]] == [
        ("base", "base"), ("countbench-expert", "expert"), ("merged", "merged")]
    assert scores["skills"] == ["countbench", "spatial"] and len(scores["prompts"]) == 5
    assert [c["id"] for c in scores["contamination"]] == ["u2"]
    assert len(scores["records"]) == 15 and report.images == 15
    assert all(isinstance(r["clip"], float) and r["dsg"] in (0.5, 1.0) for r in scores["records"])
    # progress: rising to its total = 5 questions + 15 renders + 15 CLIP + 15 DSG
    assert seen[-1] == (50, 50) and all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))
    assert "difference to base" in report.table and "countbench-expert" in report.table
    with Image.open(out / "grid.png") as g:
        assert g.width >= 3 * 128 and g.height > 2 * 128


def test_loras_change_the_images_from_identical_seeds(run, tiny_models):
    report, scores, _, _ = run
    out = Path(report.out_dir)
    by = {(r["model"], r["prompt_id"]): r for r in scores["records"]}
    for p in scores["prompts"]:
        base, expert, merged = (by[(m, p["id"])] for m in ("base", "countbench-expert", "merged"))
        assert base["seed"] == expert["seed"] == merged["seed"] == derive_seed(7, p["id"], 0)
        assert json.loads(Image.open(out / expert["file"]).info["selma"])["seed"] == base["seed"]  # the PNG says so
        for other in (expert, merged):
            diff = np.abs(_pixels(out / other["file"]) - _pixels(out / base["file"]))
            assert diff.mean() > 2.0, (p["id"], other["model"])  # the LoRA visibly changes the image
    # The base column is exactly what the model renders from that seed (another batch: <= 1 level on CPU).
    first = scores["prompts"][0]
    lp = load_pipeline(ModelConfig(path=str(tiny_models["sd1"])))
    try:
        import torch

        lp.pipe.scheduler = build_scheduler("euler", lp.pipe.scheduler)
        direct = lp.pipe(prompt=[first["prompt"]], num_inference_steps=2, width=64, height=64, guidance_scale=7.5,
                         generator=[torch.Generator("cpu").manual_seed(derive_seed(7, first["id"], 0))]).images[0]
    finally:
        lp.release()
    diff = np.abs(np.asarray(direct, dtype=np.int16) - _pixels(out / by[("base", first["id"])]["file"]))
    assert diff.max() <= 1


def test_scores_are_what_the_images_and_the_statistics_say(run, tiny_models):
    report, scores, _, fake = run
    out = Path(report.out_dir)
    prompt = {p["id"]: p["prompt"] for p in scores["prompts"]}
    rec = scores["records"][4]
    with load_scorer(ScorerConfig(path=str(tiny_models["clip"]))) as scorer:
        import torch

        img = scorer.embed_pixels(scorer.load_image((out / rec["file"]).read_bytes())[0][None])
        txt = scorer.embed_texts([prompt[rec["prompt_id"]]])
    assert float((img * txt).sum()) == pytest.approx(rec["clip"], abs=1e-5)
    for r in scores["records"]:  # the fake answers "red?" yes only when the image's dominant channel is red
        colour = dominant_colour(Image.open(out / r["file"]))
        assert r["dsg"] == (1.0 if colour == "red" else 0.5) and r["answers"]["1"] == "yes"
    assert len(fake.question_prompts) == 5  # one set of questions per prompt, shared by the three models
    assert set(scores["questions"]) == set(prompt)
    cell = scores["summary"]["clip"]["skills"]["spatial"]["merged"]
    mine = [r["clip"] for r in scores["records"] if r["model"] == "merged" and r["skill"] == "spatial"]
    base = [r["clip"] for r in scores["records"] if r["model"] == "base" and r["skill"] == "spatial"]
    assert cell["mean"] == pytest.approx(np.mean(mine)) and cell["n"] == 2
    assert cell["diff"]["mean"] == pytest.approx(np.mean(mine) - np.mean(base))
    assert cell["lo"] <= cell["mean"] <= cell["hi"] and cell["diff"]["verdict"] in ("better", "worse", "unclear")
    assert set(scores["summary"]) >= {"clip", "dsg", "dsg.entity", "dsg.attribute"}
    del torch


def test_the_api_key_is_never_written(run):
    report, *_ = run
    for path in Path(report.out_dir).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.browser
def test_the_page_opens_offline_in_chromium(run):
    from harness.browser import browser_page

    report, scores, _, _ = run
    html = (Path(report.out_dir) / "index.html").read_text()
    links = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert links and all(not re.match(r"[a-z]+:|//|/", link) for link in links), links  # relative only
    assert "<script" not in html and "@import" not in html and "url(" not in html
    with browser_page(1280, 900) as page:
        page.route(re.compile(r"^https?://"), lambda route: route.abort())  # offline: any remote fetch would fail
        page.goto((Path(report.out_dir) / "index.html").as_uri(), wait_until="load")
        images = page.evaluate("[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        assert len(images) == 2 + len(scores["skills"]) and all(ok and w > 0 for _, ok, w in images), images
        text = page.inner_text("body")
        assert "countbench-expert" in text and "nearly copy training prompts" in text
        assert page.console_errors == [] and page.failed_requests == []
        (REPO / "test-artifacts").mkdir(exist_ok=True)
        page.screenshot(path=str(REPO / "test-artifacts" / "eval-report.png"), full_page=True)


def test_a_report_is_never_overwritten_silently(tiny_models, loras, work):
    out = work / "again"
    rows = [{"id": "p1", "skill": "s", "prompt": "two red apples"}]
    cfg = EvalConfig(render=RENDER, resamples=100)
    clip = ScorerConfig(path=str(tiny_models["clip"]))
    model = ModelConfig(path=str(tiny_models["sd1"]))
    first = evaluate(model, [], rows, clip, out, cfg)
    (out / "note.txt").write_text("the user's notes")
    with pytest.raises(SelmaError, match="holds files already.*--overwrite"):
        evaluate(model, [str(loras[0])], rows, clip, out, cfg)
    assert (out / "note.txt").is_file() and json.loads((out / "scores.json").read_text())["models"][-1]["key"] == "base"
    second = evaluate(model, [str(loras[0])], rows, clip, out, cfg, overwrite=True)
    assert second.out_dir == first.out_dir and not (out / "note.txt").exists()
    assert [m["key"] for m in json.loads((out / "scores.json").read_text())["models"]] == ["base", "countbench-expert"]
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".again")) == []


def test_cancel_leaves_no_report(tiny_models, work):
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    out = work / "stopped"
    got = evaluate(ModelConfig(path=str(tiny_models["sd1"])), [], [{"id": "p", "skill": "s", "prompt": "a cat"}] * 1,
                   ScorerConfig(path=str(tiny_models["clip"])), out, EvalConfig(render=RENDER), should_stop=stop)
    assert got.status == "stopped" and not out.exists()
    assert not [p for p in work.iterdir() if p.name.startswith(".stopped.")]


def test_refused_before_rendering(tiny_models, loras, work):
    from safetensors.torch import load_file, save_file

    sdxl = work / "for-sdxl.safetensors"
    save_file(load_file(str(loras[1])), str(sdxl), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(SelmaError, match="for-sdxl.safetensors \\(for sdxl_base_v1-0\\).*the checkpoint is sd1"):
        describe_models([sdxl], "sd1")
    with pytest.raises(SelmaError, match="same bytes"):
        describe_models([loras[0], shutil.copy(loras[0], work / "copy.safetensors")], "sd1")
    (work / "not-lora.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(SelmaError, match="not a readable .safetensors"):
        describe_models([work / "not-lora.safetensors"], "sd1")
    with pytest.raises(SelmaError, match="not an open_clip folder"):  # found before a single image is rendered
        evaluate(ModelConfig(path=str(tiny_models["sd1"])), [], [{"id": "p", "skill": "s", "prompt": "a cat"}],
                 ScorerConfig(path=str(work)), work / "never", EvalConfig(render=RENDER))
    assert not (work / "never").exists()
    with pytest.raises(SelmaError, match="steps: got 0"):
        EvalConfig(render={"steps": 0})


def test_removing_a_lora_restores_the_base_exactly(tiny_models, loras):
    import torch

    lp = load_pipeline(ModelConfig(path=str(tiny_models["sd1"])))
    try:
        entry = describe_models([loras[0]], lp.arch)[1]

        def render():
            g = [torch.Generator("cpu").manual_seed(3)]
            return np.asarray(lp.pipe(prompt=["a cat"], num_inference_steps=2, width=64, height=64, generator=g).images[0])

        before = render()
        with lora_applied(lp.pipe, entry):
            during = render()
        after = render()
    finally:
        lp.release()
    assert np.array_equal(before, after) and not np.array_equal(before, during)


def test_cli_runs_an_evaluation(tiny_models, loras, work, capsys):
    prompts = work / "cli.txt"
    prompts.write_text("a red apple\n")
    out = work / "cli-report"
    rc = main(["eval", "--model", str(tiny_models["sd1"]), "--lora", str(loras[1]), "--prompts", str(prompts),
               "--clip", str(tiny_models["clip"]), "--steps", "2", "--width", "64", "--height", "64", "--seed", "3",
               "--resamples", "100", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "merged" in captured.out and f"report: {out}/index.html" in captured.err
    scores = json.loads((out / "scores.json").read_text())
    assert scores["config"]["render"]["seed"] == 3 and scores["prompts"][0]["skill"] == "cli"
    rc = main(["eval", "--model", str(tiny_models["sd1"]), "--prompts", str(prompts), "--clip", str(tiny_models["clip"]),
               "--vqa-url", "http://127.0.0.1:9/v1", "--out", str(work / "cli-2")])
    assert rc == 2 and "vqa_url/vqa_model" in capsys.readouterr().err
