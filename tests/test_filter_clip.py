"""Stage 3 end to end with the tiny open_clip folder: loading, scores, cache, metadata rewrite, review, CLI."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from selma_backend.errors import SelmaError
from selma_backend.filter import FilterConfig, ScorerConfig, effective_keep, filter_dataset, load_scorer, set_review
from selma_backend.filter import cli as filter_cli
from selma_backend.render.dataset import DATASET_JSON, METADATA, append_images
from selma_backend.tiny_models import write_clip

NO_DEDUP = {"dedup_cosine": 0.0}  # a random-weight CLIP maps many images close together


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_clip(tmp_path_factory.mktemp("clip") / "clip", seed=0)


@pytest.fixture(scope="module")
def scorer(clip_dir):
    with load_scorer(ScorerConfig(str(clip_dir), batch_size=3)) as s:
        yield s


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture
def dataset(tmp_path):
    d = tmp_path / "data"
    append_images(d, _images(5), [f"a red cube number {i}" for i in range(5)], "spatial")
    append_images(d, _images(2, seed=1) + [Image.new("RGB", (40, 40), (120, 30, 30))],
                  ["two cats", "three dogs", "a blank card"], "count")
    return d


def _rows(d):
    return [json.loads(x) for x in (d / METADATA).read_text().splitlines()]


def _expected_scores(clip_dir, d):
    """Cosines computed the plain open_clip way, one image at a time."""
    import open_clip
    import torch

    model, preprocess = open_clip.create_model_from_pretrained("local-dir:" + str(clip_dir))
    tok = open_clip.get_tokenizer("local-dir:" + str(clip_dir))
    out = {}
    with torch.no_grad():
        for row in _rows(d):
            img = model.encode_image(preprocess(Image.open(d / row["file_name"]).convert("RGB"))[None], normalize=True)
            txt = model.encode_text(tok([row["text"]]), normalize=True)
            out[row["file_name"]] = float((img * txt).sum())
    return out


def test_scores_match_open_clip_and_everything_else_is_kept(clip_dir, scorer, dataset):
    before = {r["file_name"]: r for r in _rows(dataset)}
    report = filter_dataset(dataset, scorer, FilterConfig(mode="threshold", threshold=-1.0, **NO_DEDUP))
    rows = _rows(dataset)
    expected = _expected_scores(clip_dir, dataset)
    for row in rows:
        assert row["clip_score"] == pytest.approx(expected[row["file_name"]], abs=2e-6)
        assert {k: v for k, v in row.items() if k not in ("clip_score", "keep", "drop_reason")} == before[row["file_name"]]
    blank = next(r for r in rows if r["text"] == "a blank card")
    assert blank["keep"] is False and blank["drop_reason"] == "blank_image"
    assert [r["file_name"] for r in rows] == list(before)  # row order kept
    assert (report.total, report.kept, report.embedded, report.cached) == (8, 7, 8, 0)
    assert report.per_skill["count"] == {"total": 3, "kept": 2, "dropped": {"blank_image": 1}}
    with Image.open(report.histogram) as im:
        assert im.format == "PNG" and im.size == (720, 360)
    assert json.loads((dataset / DATASET_JSON).read_text())["filter"]["config"]["threshold"] == -1.0
    assert json.loads((dataset / ".selma_report" / "filter.json").read_text())["kept"] == 7


def test_reselecting_uses_the_cache_and_never_erases_review(scorer, dataset):
    filter_dataset(dataset, scorer, FilterConfig(mode="threshold", threshold=-1.0, **NO_DEDUP))
    name = _rows(dataset)[0]["file_name"]
    set_review(dataset, name, "reject")
    scores = sorted(r["clip_score"] for r in _rows(dataset) if r["text"] != "a blank card")
    median = scores[len(scores) // 2]
    report = filter_dataset(dataset, scorer, FilterConfig(mode="threshold", threshold=median, **NO_DEDUP))
    assert (report.embedded, report.cached) == (0, 8)  # every image from the cache
    rows = _rows(dataset)
    assert rows[0]["review"] == "reject" and not effective_keep(rows[0])
    assert {r["file_name"] for r in rows if r["keep"]} == \
        {r["file_name"] for r in rows if r["clip_score"] >= median and r["text"] != "a blank card"}
    assert all(r["drop_reason"] in ("below_threshold", "blank_image") for r in rows if not r["keep"])
    assert all("drop_reason" not in r for r in rows if r["keep"])


def test_cache_is_keyed_by_model_and_image_bytes(clip_dir, scorer, dataset, tmp_path):
    filter_dataset(dataset, scorer, FilterConfig(mode="threshold", threshold=0.0, **NO_DEDUP))
    other = write_clip(tmp_path / "clip-seed1", seed=1)
    with load_scorer(ScorerConfig(str(other))) as s1:
        assert s1.model_key != scorer.model_key
        assert filter_dataset(dataset, s1, FilterConfig(mode="threshold", threshold=0.0, **NO_DEDUP)).embedded == 8
    append_images(dataset, _images(1, seed=7), ["a new one"], "spatial")  # one new image: only it is embedded
    assert filter_dataset(dataset, scorer, FilterConfig(mode="threshold", threshold=0.0, **NO_DEDUP)).embedded == 1
    assert len(list((dataset / ".selma_cache").glob("clip-*.safetensors"))) == 2


def test_broken_file_is_dropped_not_fatal(scorer, dataset):
    victim = _rows(dataset)[1]["file_name"]
    (dataset / victim).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    report = filter_dataset(dataset, scorer, FilterConfig(mode="top_k_per_prompt", top_k=1, **NO_DEDUP))
    row = next(r for r in _rows(dataset) if r["file_name"] == victim)
    assert row["keep"] is False and row["drop_reason"] == "broken_file" and row["clip_score"] is None
    assert report.reasons == {"blank_image": 1, "broken_file": 1}


def test_failed_rewrite_leaves_metadata_intact(scorer, dataset, monkeypatch):
    from selma_backend.filter import review

    before = (dataset / METADATA).read_bytes()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(review, "atomic_write_text", fail)
    with pytest.raises(OSError):
        filter_dataset(dataset, scorer, FilterConfig(mode="threshold", threshold=0.0))
    assert (dataset / METADATA).read_bytes() == before


def test_stop_writes_no_decision(scorer, dataset):
    before = (dataset / METADATA).read_bytes()
    report = filter_dataset(dataset, scorer, FilterConfig(mode="threshold", threshold=0.0), should_stop=lambda: True)
    assert report.status == "stopped" and (dataset / METADATA).read_bytes() == before


def test_missing_weights_and_bad_paths_are_errors(clip_dir, tmp_path):
    folder = tmp_path / "noweights"
    folder.mkdir()
    shutil.copy(clip_dir / "open_clip_config.json", folder)
    with pytest.raises(SelmaError, match="random weights"):
        load_scorer(ScorerConfig(str(folder)))
    with pytest.raises(SelmaError, match="arch"):
        load_scorer(ScorerConfig(str(clip_dir / "open_clip_model.safetensors")))
    with pytest.raises(SelmaError, match="path"):
        load_scorer(ScorerConfig(str(tmp_path / "nothing")))
    # a bare file with the wrong architecture: strict loading refuses it
    with pytest.raises(SelmaError, match="could not load"):
        load_scorer(ScorerConfig(str(clip_dir / "open_clip_model.safetensors"), arch="RN50"))


def test_bare_weight_file_with_arch_loads(tmp_path):
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config("ViT-B-32")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    weights = tmp_path / "vit_b32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    with load_scorer(ScorerConfig(str(weights), arch="ViT-B-32")) as s:
        loaded = s.model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
        assert s.dim == cfg["embed_dim"] and s.context_length == 77


def test_cli_end_to_end(clip_dir, dataset, capsys):
    parser = argparse.ArgumentParser()
    filter_cli.add_arguments(parser)
    args = parser.parse_args(["--data", str(dataset), "--clip", str(clip_dir), "--keep-fraction", "0.5",
                              "--dedup-cosine", "0", "--json"])
    assert filter_cli.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    # spatial: ceil(0.5 x 5) = 3; count: the blank card is dropped first, then ceil(0.5 x 2) = 1
    assert out["per_skill"]["spatial"]["kept"] == 3 and out["per_skill"]["count"]["kept"] == 1
    assert sum(r["keep"] for r in _rows(dataset)) == 4
