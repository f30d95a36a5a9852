"""``selma reproduce``: every arm end to end on a tiny world-sd, resumable, with honest verdicts."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from selma_backend.errors import SelmaError
from selma_backend.eval.grid import PAD, cell_size
from selma_backend.eval.stats import Estimate
from selma_backend.world.reproduce import QUICK, ReproduceConfig, arms, claim_dir, config_from_args, plan, run_reproduce
from selma_backend.world.reproduce_eval import METRICS, score_image
from selma_backend.world.reproduce_report import (
    DOES_NOT,
    INCONCLUSIVE,
    REPRODUCES,
    VERDICT_PHRASES,
    claim_phrase,
    combine,
)
from selma_backend.world.scene import render_scene, sample_scene
from selma_backend.world.spec import Entity, PromptSpec, Relation

ROOT = Path(__file__).resolve().parents[1]
SCOPES = ("world_counting", "world_spatial", "world_binding", "world_whoops", "overall")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from selma_backend.world.sd_train import SdTrainConfig, train_world_sd

    out = tmp_path_factory.mktemp("world-sd") / "tiny-world-sd"
    return train_world_sd(SdTrainConfig(preset="tiny", steps=2, vae_steps=2, batch_size=4, threads=1), out,
                          say=lambda _m: None)


def micro(sd: Path, **overrides) -> ReproduceConfig:
    """Every arm and skill at the smallest sizes that still exercise every stage (2 images per training prompt)."""
    settings = dict(model=sd, weak_model=sd, n_train=2, n_eval=2, train_images=2, eval_images=1, render_steps=1,
                    render_batch=16, train_steps=1, train_batch=2, resamples=100, grid_prompts=2)
    return ReproduceConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def run(tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce") / "run"
    lines: list[str] = []
    table = run_reproduce(out, micro(tiny_sd), threads=1, say=lines.append)
    return out, table, lines


def test_table_has_every_arm_and_skill_with_intervals(run):
    out, table, lines = run
    on_disk = json.loads((out / "table.json").read_text(encoding="utf-8"))
    assert on_disk["results"] == table["results"]
    expected = ["base", "joint", "expert:world_counting", "expert:world_spatial", "expert:world_binding",
                "expert:world_whoops", "merged:linear", "merged:svd", "merged:ties", "nofilter", "weak2strong"]
    assert on_disk["arms"] == expected
    for arm in expected:
        for scope in SCOPES:
            for metric in METRICS:
                cell = on_disk["results"][arm][scope][metric]
                assert cell["lo"] <= cell["mean"] <= cell["hi"], (arm, scope, metric, cell)
                assert cell["n"] == (8 if scope == "overall" else 2)
                if arm == "base":
                    assert "diff_vs_base" not in cell
                else:
                    d = cell["diff_vs_base"]
                    assert d["lo"] <= d["mean"] <= d["hi"]
                    assert cell["verdict_vs_base"] in ("better", "worse", "unclear")
    assert all(0.0 <= on_disk["results"][a]["overall"]["judge"]["mean"] <= 1.0 for a in expected)
    assert [ln[:5] for ln in lines if ln.startswith("[")] == [f"[{i}/6]" for i in range(1, 7)]
    assert on_disk["models"]["strong"]["sha256"] and on_disk["models"]["clip"]["model_key"]
    assert set(on_disk["timings_s"]) == {"prompts", "render", "filter", "train", "merge", "evaluate"}
    assert on_disk["work"] == {"train_images_rendered": 2 * 4 * 2 * 2, "trained": 13, "merged": 5,
                               "eval_images_rendered": 11 * 8}


def test_data_quality_and_views(run):
    out, table, _ = run
    for which in ("strong", "weak"):
        for skill in SCOPES[:4]:
            q = table["data_quality"][which][skill]
            assert (q["images"], q["kept"]) == (4, 2)  # the filter keeps the best 1 of 2 images per prompt
            assert 0.0 <= q["judge_all"] <= 1.0 and 0.0 <= q["judge_kept"] <= 1.0
    views = out / "data" / "views"
    joint_rows = [json.loads(x) for x in (views / "joint" / "metadata.jsonl").read_text().splitlines()]
    assert len(joint_rows) == 8 and {r["skill"] for r in joint_rows} == set(SCOPES[:4])
    unfiltered = [json.loads(x) for x in (views / "unfiltered" / "world_spatial" / "metadata.jsonl").read_text().splitlines()]
    assert len(unfiltered) == 4 and not any("keep" in r for r in unfiltered)
    strong = [json.loads(x) for x in (out / "data" / "strong" / "world_spatial" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["keep"] for r in strong) == [False, False, True, True]


def test_world_spatial_trains_with_left_right_swapped_captions(run):
    from selma_backend.train.data import load_samples

    out, _, _ = run
    samples = load_samples(out / "data" / "strong" / "world_spatial", resolution=64, buckets=False,
                           user_dir=out / "skills")
    assert {s.flip for s in samples} == {"swap_left_right"}
    counting = load_samples(out / "data" / "strong" / "world_counting", resolution=64, buckets=False,
                            user_dir=out / "skills")
    assert {s.flip for s in counting} == {"allow"}


def test_markdown_lists_arms_and_claims(run):
    out, table, _ = run
    md = (out / "table.md").read_text(encoding="utf-8")
    for arm in table["arms"]:
        assert f"| {arm} |" in md
    claims_part = md.split("## Claims", 1)[1]
    for cid in ("a", "b", "c", "d", "e"):
        line = next(ln for ln in claims_part.splitlines() if ln.startswith(f"- ({cid})"))
        assert sum(f"**{p}**" in line for p in VERDICT_PHRASES) == 1, line
    assert "Best merge method: **" in claims_part
    assert {c["id"] for c in table["claims"]} == {"a", "b", "c", "d", "e"}
    assert all(c["verdict"] in VERDICT_PHRASES for c in table["claims"])
    assert len(next(c for c in table["claims"] if c["id"] == "c")["parts"]) == 4


def test_grids_have_one_column_per_arm(run):
    out, table, _ = run
    cell = cell_size(64)
    for skill in SCOPES[:4]:
        path = out / "grids" / f"{skill}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            assert im.width == PAD + len(table["arms"]) * (cell + PAD)
    with Image.open(out / "before_after.png") as im:
        assert im.format == "PNG" and im.width == PAD + 2 * (cell + PAD)


def test_rerun_resumes_without_rendering_or_training(run, tiny_sd):
    out, table, _ = run
    files = [*(out / "loras").rglob("*.safetensors"), *(out / "eval" / "images").rglob("*.png"),
             *(out / "data" / "strong").glob("*/*.png")]  # the filter's own report charts are redrawn: not ours
    before = {p: p.stat().st_mtime_ns for p in files}
    again = run_reproduce(out, micro(tiny_sd), threads=1, say=lambda _m: None)
    assert again["work"] == {"train_images_rendered": 0, "trained": 0, "merged": 0, "eval_images_rendered": 0}
    assert {p: p.stat().st_mtime_ns for p in files} == before
    for key in ("results", "claims", "best_merge", "data_quality", "loras"):
        assert again[key] == table[key], key


def test_changed_config_into_the_same_folder_is_refused(run, tiny_sd):
    out, _, _ = run
    stored = (out / "reproduce.json").read_text(encoding="utf-8")
    with pytest.raises(SelmaError, match=r"n_eval: 2 -> 3") as e:
        run_reproduce(out, micro(tiny_sd, n_eval=3), say=lambda _m: None)
    assert "--force" in str(e.value)
    assert (out / "reproduce.json").read_text(encoding="utf-8") == stored


def test_force_clears_only_what_a_run_owns(tmp_path):
    claim_dir(tmp_path, ReproduceConfig(n_eval=5), force=False)
    (tmp_path / "table.json").write_text("{}")
    (tmp_path / "loras").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    claim_dir(tmp_path, ReproduceConfig(n_eval=5), force=False)  # same settings: nothing removed
    assert (tmp_path / "table.json").exists()
    claim_dir(tmp_path, ReproduceConfig(n_eval=6), force=True)
    assert not (tmp_path / "table.json").exists() and not (tmp_path / "loras").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.txt").write_text("x")
    with pytest.raises(SelmaError, match="not a reproduce run folder"):
        claim_dir(other, ReproduceConfig(), force=False)


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("n_train", 0, "n_train: got 0"),
    ("skills", ("world_common",), "skills: got ['world_common']"),
    ("skills", ("world_counting", "world_counting"), "distinct world skills"),
    ("filter_top_k", 3, "filter_top_k: got 3"),
    ("cfg", -1.0, "cfg: got -1.0"),
    ("scheduler", "nope", "scheduler"),
    ("lr", True, "lr: got True"),
    ("model", "", "model: got ''"),
])
def test_bad_config_values_raise_clear_errors(field, value, needle):
    with pytest.raises(SelmaError) as e:
        ReproduceConfig(**{field: value})
    assert needle in str(e.value)


def test_missing_model_and_bad_threads_are_named(tmp_path):
    with pytest.raises(SelmaError, match="model: got .*world-sd folder"):
        run_reproduce(tmp_path / "r", ReproduceConfig(model=tmp_path / "none"))
    with pytest.raises(SelmaError, match="threads: got 0"):
        run_reproduce(tmp_path / "r", ReproduceConfig(), threads=0)
    assert not (tmp_path / "r").exists()


def test_plan_counts_every_arm():
    config = ReproduceConfig(n_train=10, n_eval=5, train_images=3, eval_images=2, train_steps=7, train_batch=4)
    p = plan(config)
    assert p["arms"] == len(arms(config)) == 11
    assert p["train_images"] == 2 * 4 * 10 * 3  # strong and weak
    assert p["eval_images"] == 11 * 4 * 5 * 2
    assert p["train_steps"] == (3 * 4 + 4) * 7  # 12 experts + a joint LoRA of 4 x the steps
    assert p["estimate_total_s"] > 0


def test_cli_help_and_arguments():
    import argparse

    from selma_backend.world import reproduce

    r = subprocess.run([sys.executable, "-m", "selma_backend", "reproduce", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout and "--threads" in r.stdout
    parser = argparse.ArgumentParser()
    reproduce.add_arguments(parser)
    args = parser.parse_args(["--out", "x", "--quick", "--set", "n_eval=7", "--set", "cfg=2.5", "--set",
                              "skills=world_spatial,world_binding", "--model", "m"])
    config = config_from_args(args)
    assert (config.n_eval, config.cfg, config.skills) == (7, 2.5, ("world_spatial", "world_binding"))
    assert config.n_train == QUICK["n_train"] and config.model == str(Path("m").resolve())
    with pytest.raises(SelmaError, match="--set: got 'bogus=1'"):
        config_from_args(parser.parse_args(["--out", "x", "--set", "bogus=1"]))


def test_verdict_phrases_follow_the_interval_of_the_difference():
    assert claim_phrase(Estimate(0.1, 0.02, 0.2, 50, 0.95)) == REPRODUCES
    assert claim_phrase(Estimate(-0.1, -0.2, -0.01, 50, 0.95)) == DOES_NOT
    assert claim_phrase(Estimate(0.05, -0.01, 0.1, 50, 0.95)) == INCONCLUSIVE
    assert claim_phrase(Estimate(0.0, 0.0, 0.0, 50, 0.95)) == INCONCLUSIVE
    assert combine([REPRODUCES, REPRODUCES]) == REPRODUCES
    assert combine([REPRODUCES, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([REPRODUCES, DOES_NOT, INCONCLUSIVE]) == DOES_NOT
    assert combine([]) == INCONCLUSIVE


def test_judge_scores_a_ground_truth_scene():
    spec = PromptSpec((Entity("circle", "red"), Entity("square", "blue")), Relation(0, "left of", 1), "white")
    image = render_scene(sample_scene(spec, random.Random(3)), 64)
    assert score_image(image, spec) == (1.0, True)
    swapped = PromptSpec(spec.entities, Relation(0, "right of", 1), "white")
    score, ok = score_image(image, swapped)
    assert 0.0 < score < 1.0 and not ok
    wrong = PromptSpec((Entity("star", "green", None, 3, numbered=True),), None, "black")
    assert score_image(image, wrong) == (0.0, False)
