"""Stage 4 data: kept rows, buckets, caption-aware flips, batch order, loss weights, config checks."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from train_helpers import make_dataset, tiny_config

from selma_backend.errors import SelmaError
from selma_backend.filter.review import set_review
from selma_backend.train import TrainConfig
from selma_backend.train.data import (
    bucket_for,
    bucket_sizes,
    epoch_batches,
    flip_caption,
    load_pixels,
    load_samples,
    loss_weights,
    mirror_caption,
)
from selma_backend.train.loop import clip_gradients, min_snr_weights


@pytest.mark.parametrize(("text", "mirrored"), [
    ("a cube to the left of a ball", "a cube to the right of a ball"),
    ("Left: a cat. Right: a dog.", "Right: a cat. Left: a dog."),
    ("the LEFT lamp and the rightmost cup", "the RIGHT lamp and the leftmost cup"),
    ("a right-hand glove", "a left-hand glove"),
    ("bright light, leftover cake", "bright light, leftover cake"),  # only whole words
])
def test_mirror_caption_swaps_left_and_right_words(text, mirrored):
    assert mirror_caption(text) == mirrored
    assert mirror_caption(mirrored) == text


def test_flip_policies():
    assert flip_caption("a cat left of a dog", "allow") == "a cat left of a dog"
    assert flip_caption("a cat left of a dog", "swap_left_right") == "a cat right of a dog"
    assert flip_caption("a cat left of a dog", "never") is None
    with pytest.raises(SelmaError, match="flip policy"):
        flip_caption("x", "sometimes")


def test_flipped_sample_has_mirrored_pixels_and_mirrored_caption(tmp_path):
    ds = make_dataset(tmp_path / "spatial", "spatial")  # built-in skill: flip policy swap_left_right
    samples = load_samples(ds, resolution=64, buckets=True)
    assert {s.flip for s in samples} == {"swap_left_right"}
    views = [v for e in range(3) for b in epoch_batches(samples, 2, seed=0, epoch=e) for v in b]
    flipped = [(i, f) for i, f in views if f]
    assert flipped and len(flipped) < len(views)  # about half are flipped
    i = next(i for i, _ in flipped if "left" in samples[i].caption)
    s = samples[i]
    assert s.caption_for(True) == mirror_caption(s.caption) != s.caption
    assert torch.equal(load_pixels(s, True), torch.flip(load_pixels(s, False), dims=[2]))


def test_never_flip_skill_is_never_flipped(tmp_path):
    ds = make_dataset(tmp_path / "product", "product", prompts=["a logo on a mug", "text on a box", "a red bottle"])
    samples = load_samples(ds, resolution=64, buckets=False)
    assert {s.flip for s in samples} == {"never"}
    views = [v for e in range(5) for b in epoch_batches(samples, 2, seed=1, epoch=e) for v in b]
    assert not any(f for _, f in views)
    with pytest.raises(SelmaError):
        samples[0].caption_for(True)
    forced = load_samples(ds, resolution=64, buckets=False, flip="allow")
    assert {s.flip for s in forced} == {"allow"}


def test_rejected_rows_do_not_train(tmp_path):
    ds = make_dataset(tmp_path / "d")
    rows = [json.loads(line) for line in (ds / "metadata.jsonl").read_text().splitlines()]
    set_review(ds, rows[0]["file_name"], "reject")
    rows = [json.loads(line) for line in (ds / "metadata.jsonl").read_text().splitlines()]
    rows[1]["keep"] = False
    (ds / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = {s.image.name for s in load_samples(ds, resolution=64, buckets=False)}
    assert names == {r["file_name"] for r in rows[2:]}


def test_buckets_keep_shape_at_about_the_same_area():
    sizes = bucket_sizes(512)
    assert (512, 512) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2 for w, h in sizes)
    assert bucket_for((1024, 1024), 512) == (512, 512)
    w, h = bucket_for((1920, 1080), 512)
    assert w > h and abs(w / h - 16 / 9) < 0.2 and w * h > 0.85 * 512 * 512
    w, h = bucket_for((600, 900), 512)
    assert h > w and abs(h / w - 1.5) < 0.2  # the 64 px grid has no exact 3:2 near 512²


def test_epoch_covers_every_sample_and_never_mixes_buckets(tmp_path):
    sizes = [(96, 96)] * 3 + [(256, 128)] * 4
    prompts = [f"object number {i}" for i in range(7)]
    ds = make_dataset(tmp_path / "d", "attributes", prompts, sizes)
    samples = load_samples(ds, resolution=128, buckets=True)
    assert Counter(s.size for s in samples) == {(128, 128): 3, (128, 64): 4}
    batches = epoch_batches(samples, 2, seed=3, epoch=0)
    assert all(len(b) == 2 and len({samples[i].size for i, _ in b}) == 1 for b in batches)
    assert {i for b in batches for i, _ in b} == set(range(7))
    assert epoch_batches(samples, 2, seed=3, epoch=0) == batches  # a pure function: resumable
    assert epoch_batches(samples, 2, seed=3, epoch=1) != batches


def test_clip_score_weights_have_mean_one_and_need_scores(tmp_path):
    ds = make_dataset(tmp_path / "d")
    rows = [json.loads(line) for line in (ds / "metadata.jsonl").read_text().splitlines()]
    for r, score in zip(rows, [0.2, 0.3, 0.25, 0.35, 0.3, 0.2], strict=True):
        r["clip_score"] = score
    (ds / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = load_samples(ds, resolution=64, buckets=False)
    w = loss_weights(samples, "clip")
    assert sum(w) / len(w) == pytest.approx(1.0)
    assert w[3] / w[0] == pytest.approx(0.35 / 0.2)
    assert loss_weights(samples, "none") == [1.0] * 6
    bare = load_samples(make_dataset(tmp_path / "e"), resolution=64, buckets=False)
    with pytest.raises(SelmaError, match="clip_score"):
        loss_weights(bare, "clip")


def test_min_snr_weights_match_the_formula():
    ac = torch.linspace(0.999, 0.01, 1000)
    t = torch.tensor([0, 300, 999])
    snr = ac[t] / (1 - ac[t])
    eps = min_snr_weights(ac, t, 5.0, "epsilon")
    assert torch.allclose(eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    v = min_snr_weights(ac, t, 5.0, "v_prediction")
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert eps[0] < 1 and eps[2] == pytest.approx(1.0)  # low noise down-weighted, high noise kept
    assert torch.equal(min_snr_weights(ac, t, 0.0, "epsilon"), torch.ones(3))


def test_gradient_clipping_really_clips():
    p = torch.nn.Parameter(torch.zeros(10))
    q = torch.nn.Parameter(torch.zeros(3))
    p.grad, q.grad = torch.full((10,), 3.0), torch.full((3,), 4.0)
    before = torch.cat([p.grad, q.grad]).clone()
    norm = clip_gradients([p, q], 1.0)
    assert norm == pytest.approx(float(before.norm()))
    after = torch.cat([p.grad, q.grad])
    assert float(after.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(after / after.norm(), before / before.norm())  # same direction
    p.grad = torch.full((10,), 0.01)
    q.grad = torch.zeros(3)
    clip_gradients([p, q], 1.0)
    assert torch.allclose(p.grad, torch.full((10,), 0.01))  # small gradients untouched


@pytest.mark.parametrize(("kw", "field"), [
    ({"rank": 0}, "rank"), ({"preset": "everything"}, "preset"), ({"lr": 0}, "lr"),
    ({"resolution": 500}, "resolution"), ({"optimizer": "sgd"}, "optimizer"), ({"flip": "maybe"}, "flip"),
    ({"dropout": 1.0}, "dropout"), ({"validation_every": 5}, "validation_prompts"), ({"steps": -1}, "steps"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(SelmaError, match=f"^{field}: got"):
        TrainConfig(**kw)


def test_defaults_are_the_papers_recipe():
    c = TrainConfig()
    assert (c.rank, c.alpha, c.lr, c.lr_schedule, c.warmup_steps, c.preset) == (128, 128, 3e-4, "constant", 0, "selma")
    sd = c.resolved("sd1")
    assert (sd.steps, sd.resolution, sd.effective_batch) == (5000, 512, 64)
    xl = c.resolved("sdxl")
    assert (xl.steps, xl.resolution, xl.effective_batch) == (10000, 1024, 32)
    assert tiny_config().resolved("sdxl").steps == 4  # explicit values win


def test_optimizer_and_schedule_registries_match_the_config_choices():
    from selma_backend.train.config import LR_SCHEDULES, OPTIMIZERS
    from selma_backend.train.loop import OPTIMIZER_REGISTRY, make_optimizer, make_schedule

    assert tuple(OPTIMIZER_REGISTRY.names()) == OPTIMIZERS
    p = torch.nn.Parameter(torch.zeros(3))
    if not torch.cuda.is_available():
        with pytest.raises(SelmaError, match="adamw8bit"):
            make_optimizer([p], TrainConfig(optimizer="adamw8bit"))
    for name in LR_SCHEDULES:
        opt = make_optimizer([p], TrainConfig(lr=1.0))
        sched = make_schedule(opt, TrainConfig(lr=1.0, lr_schedule=name, warmup_steps=2, steps=10))
        first = sched.get_last_lr()[0]
        assert first == (0.0 if name != "constant" else 1.0), name  # warm-up starts at 0 where the schedule has one
