"""Stage 2 (render), in-process: format, seeds, batches, resume, crash points, OOM, stop, native append.

Every render uses the tiny SD1 folder at 64 px and 2 steps (milliseconds per image).
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import numpy as np
import pytest
from render_helpers.common import (
    assert_images_close,
    check_dataset,
    load_tiny,
    one_thread,
    pixels,
    prompt_rows,
)

from selma_backend.errors import SelmaError
from selma_backend.fsio import read_jsonl
from selma_backend.render import SCHEDULERS, RenderConfig, append_images, derive_seed, render_dataset
from selma_backend.render import dataset as ds
from selma_backend.tiny_models import write_sd1, write_sdxl

FAST = {"steps": 2, "batch_size": 4}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def sd1_dir(tmp_path_factory) -> Path:
    return write_sd1(tmp_path_factory.mktemp("render-models") / "sd1", seed=0)


@pytest.fixture(scope="module")
def lp(sd1_dir):
    return load_tiny(sd1_dir)


def names(rows, k):
    return {f"{r['id']}_s{s}.png" for r in rows for s in range(k)}


def stat_of(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}


# --- config and registry ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", 0), ("images_per_prompt", -1), ("width", 100),
                                         ("height", 32), ("cfg", -1), ("cfg", True), ("scheduler", "dpm++"),
                                         ("seed", -5), ("negative", None)])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(SelmaError, match=field):
        RenderConfig(**{field: value})


def test_every_registered_scheduler_renders(lp, tmp_path):
    rows = prompt_rows(2)
    for name in SCHEDULERS.names():
        report = render_dataset(lp, rows, tmp_path / name, RenderConfig(scheduler=name, steps=2, batch_size=2))
        assert report.status == "complete" and report.rendered == 2, name
        info = json.loads((tmp_path / name / "dataset.json").read_text())
        assert info["render"]["settings"]["scheduler"] == name
    assert type(lp.pipe.scheduler).__name__ == "PNDMScheduler"  # the model's scheduler is restored


# --- format -------------------------------------------------------------------------------------------


def test_render_writes_the_documented_dataset(lp, tmp_path):
    rows = prompt_rows(5)
    config = RenderConfig(images_per_prompt=2, cfg=5.0, negative="blurry", seed=7, **FAST)
    seen = []
    report = render_dataset(lp, rows, tmp_path, config, on_image=lambda p, r: seen.append((p.name, r["sample"])))
    assert (report.status, report.rendered, report.planned) == ("complete", 10, 10)
    meta = check_dataset(tmp_path, names(rows, 2))
    assert len(seen) == 10 and {n for n, _ in seen} == names(rows, 2)
    by_name = {r["file_name"]: r for r in meta}
    r = by_name["countbench-000003_s1.png"]
    assert r == {"file_name": "countbench-000003_s1.png", "text": rows[3]["prompt"], "skill": "countbench",
                 "prompt_id": "countbench-000003", "seed": derive_seed(7, "countbench-000003", 1), "sample": 1,
                 "source": "render"}
    assert [m["file_name"] for m in meta] == sorted(by_name)  # canonical order: (prompt id, sample)
    info = json.loads((tmp_path / "dataset.json").read_text())
    s = info["render"]["settings"]
    assert (s["steps"], s["cfg"], s["width"], s["height"], s["negative"], s["seed"]) == (2, 5.0, 64, 64, "blurry", 7)
    assert s["model_hash"] == lp.model_hash and info["render"]["model"]["arch"] == "sd1"
    assert info["render"]["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert info["render"]["scheduler"]["config"]["use_karras_sigmas"] is True
    assert set(info["render"]["versions"]) >= {"torch", "diffusers", "selma"}
    assert info["render"]["config"] == config.to_dict()
    record = ds.read_record(tmp_path / "countbench-000003_s1.png")
    assert record["row"] == r and record["settings"] == s  # each PNG describes itself


def test_seed_depends_only_on_run_seed_prompt_and_sample():
    assert derive_seed(0, "a", 0) == derive_seed(0, "a", 0)
    assert len({derive_seed(s, p, k) for s in (0, 1) for p in ("a", "b") for k in (0, 1)}) == 8
    assert 0 <= derive_seed(123, "x" * 500, 9999) < 2**53


def test_batch_composition_does_not_change_images(lp, tmp_path):
    """Batch 5 (prompts mixed) vs one at a time: same seeds -> same images, up to CPU matmul rounding."""
    rows = prompt_rows(5)
    render_dataset(lp, rows, tmp_path / "b5", RenderConfig(steps=2, batch_size=5))
    render_dataset(lp, rows, tmp_path / "b1", RenderConfig(steps=2, batch_size=1))
    for name in names(rows, 1):  # observed: at most 1 level on <= 0.03% of values; ~40% of images bit-identical
        assert_images_close(tmp_path / "b5" / name, tmp_path / "b1" / name)
    assert (tmp_path / "b5" / "metadata.jsonl").read_bytes() == (tmp_path / "b1" / "metadata.jsonl").read_bytes()
    different = pixels(tmp_path / "b5" / "countbench-000000_s0.png") - pixels(tmp_path / "b5" / "countbench-000001_s0.png")
    assert np.abs(different).max() > 10  # different prompts and seeds really give different images


def test_sdxl_renders_a_mixed_batch(tmp_path):
    lp_xl = load_tiny(write_sdxl(tmp_path / "sdxl", seed=0))
    assert lp_xl.arch == "sdxl"
    report = render_dataset(lp_xl, prompt_rows(3), tmp_path / "d", RenderConfig(steps=2, batch_size=3))
    assert report.rendered == 3
    check_dataset(tmp_path / "d", names(prompt_rows(3), 1))


# --- resume and crash points --------------------------------------------------------------------------


def test_resume_renders_only_what_is_missing(lp, tmp_path):
    rows = prompt_rows(4)
    render_dataset(lp, rows, tmp_path, RenderConfig(images_per_prompt=1, **FAST))
    before = stat_of(tmp_path)
    report = render_dataset(lp, rows, tmp_path, RenderConfig(images_per_prompt=2, steps=2, batch_size=3))
    assert (report.existing, report.rendered) == (4, 4)
    assert {k: v for k, v in stat_of(tmp_path).items() if k in before} == before  # untouched
    check_dataset(tmp_path, names(rows, 2))
    again = render_dataset(lp, rows, tmp_path, RenderConfig(images_per_prompt=2, **FAST))
    assert again.rendered == 0 and stat_of(tmp_path) == {**before, **stat_of(tmp_path)}


def _fail_on_call(monkeypatch, target, attr, n, exc=RuntimeError("injected crash")):
    real = getattr(target, attr)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(target, attr, wrapper)


@pytest.mark.parametrize("point", ["caption", "png", "row"])
def test_a_crash_at_each_commit_step_leaves_a_repairable_dataset(lp, tmp_path, monkeypatch, point):
    """Crash at caption write / PNG commit / row append of the 3rd image; a re-run makes it whole, once."""
    rows = prompt_rows(3)
    config = RenderConfig(images_per_prompt=2, **FAST)
    straight = tmp_path / "straight"
    render_dataset(lp, rows, straight, config)
    target, attr = {"caption": (ds, "atomic_write_text"), "png": (ds, "atomic_write_bytes"),
                    "row": (ds, "append_rows")}[point]
    with monkeypatch.context() as m:
        _fail_on_call(m, target, attr, 3)
        with pytest.raises(RuntimeError, match="injected"):
            render_dataset(lp, rows, tmp_path / "d", config)
    committed = stat_of(tmp_path / "d")
    assert len(committed) == (3 if point == "row" else 2)
    report = render_dataset(lp, rows, tmp_path / "d", config)
    assert report.rendered == 6 - len(committed)
    assert report.rows_from_pngs == (1 if point == "row" else 0)
    assert {k: v for k, v in stat_of(tmp_path / "d").items() if k in committed} == committed
    check_dataset(tmp_path / "d", names(rows, 2))
    assert (tmp_path / "d" / "metadata.jsonl").read_bytes() == (straight / "metadata.jsonl").read_bytes()
    for name in names(rows, 2):
        assert_images_close(tmp_path / "d" / name, straight / name)


def test_torn_metadata_tail_temp_files_and_orphan_captions_are_repaired(lp, tmp_path):
    rows = prompt_rows(3)
    render_dataset(lp, rows, tmp_path, RenderConfig(**FAST))
    meta = tmp_path / "metadata.jsonl"
    lines = meta.read_bytes().split(b"\n")
    meta.write_bytes(b"\n".join(lines[:1]) + b"\n" + lines[1][:20])  # row 2 torn, row 3 lost
    (tmp_path / ".countbench-000009_s0.png.x1y2.tmp").write_bytes(b"\x89PNG half")
    (tmp_path / "countbench-000009_s0.txt").write_text("orphan caption")
    (tmp_path / "notes.txt").write_text("a user's file")  # not ours: kept
    report = render_dataset(lp, rows, tmp_path, RenderConfig(**FAST))
    assert report.rendered == 0 and report.rows_from_pngs == 2
    assert sorted(report.removed_debris) == [".countbench-000009_s0.png.x1y2.tmp", "countbench-000009_s0.txt"]
    (tmp_path / "notes.txt").unlink()
    check_dataset(tmp_path, names(rows, 1))


def test_a_row_whose_png_is_gone_is_rendered_again_without_a_second_row(lp, tmp_path):
    rows = prompt_rows(2)
    render_dataset(lp, rows, tmp_path, RenderConfig(**FAST))
    (tmp_path / "countbench-000001_s0.png").unlink()
    assert render_dataset(lp, rows, tmp_path, RenderConfig(**FAST)).rendered == 1
    check_dataset(tmp_path, names(rows, 1))


def test_other_settings_are_refused_unless_mixing_is_allowed(lp, tmp_path):
    rows = prompt_rows(2)
    render_dataset(lp, rows, tmp_path, RenderConfig(**FAST))
    with pytest.raises(SelmaError, match=r"steps: 2 -> 3.*--allow-mixed"):
        render_dataset(lp, rows, tmp_path, RenderConfig(steps=3, batch_size=4, images_per_prompt=2))
    assert len(read_jsonl(tmp_path / "metadata.jsonl")) == 2  # nothing was rendered
    # batch size and images per prompt do not change images: no refusal
    render_dataset(lp, rows, tmp_path, RenderConfig(steps=2, batch_size=1, images_per_prompt=2))
    render_dataset(lp, rows, tmp_path, RenderConfig(steps=3, images_per_prompt=3), allow_mixed=True)
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["render"]["settings"]["steps"] == 2 and info["mixed"][0]["settings"]["steps"] == 3
    assert ds.read_record(tmp_path / "countbench-000000_s2.png")["settings"]["steps"] == 3


def test_a_second_writer_is_refused_while_the_lock_is_held(lp, tmp_path):
    with ds.locked(tmp_path), pytest.raises(SelmaError, match="another process"):
        render_dataset(lp, prompt_rows(1), tmp_path, RenderConfig(**FAST))


def test_unsafe_or_colliding_prompt_ids(lp, tmp_path):
    rows = [{"id": "user/../../etc passwd", "skill": "s", "prompt": "a cat"},
            {"id": "ok-1", "skill": "s", "prompt": "a dog"}]
    render_dataset(lp, rows, tmp_path, RenderConfig(**FAST))
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs[0] == "ok-1_s0.png" and pngs[1].startswith("user_etc_passwd-") and pngs[1].endswith("_s0.png")
    with pytest.raises(SelmaError, match="differ in more than case"):
        render_dataset(lp, [{"id": "A", "skill": "s", "prompt": "x"}, {"id": "a", "skill": "s", "prompt": "y"}],
                       tmp_path / "c", RenderConfig(**FAST))
    with pytest.raises(SelmaError, match=r"prompts\[0\]\.skill"):
        render_dataset(lp, [{"id": "a", "prompt": "x"}], tmp_path / "e", RenderConfig(**FAST))


# --- stop, out-of-memory, memory ----------------------------------------------------------------------


def test_stop_keeps_finished_images_and_resume_completes(lp, tmp_path):
    rows = prompt_rows(6)
    calls = {"n": 0}

    def stop_after_a_while() -> bool:  # checked before each batch and at each denoising step
        calls["n"] += 1
        return calls["n"] > 5

    report = render_dataset(lp, rows, tmp_path, RenderConfig(**FAST), should_stop=stop_after_a_while)
    assert report.status == "stopped" and report.rendered == 4  # batch 2 was dropped mid-denoising
    check_dataset(tmp_path, {f"countbench-00000{i}_s0.png" for i in range(4)})
    assert render_dataset(lp, rows, tmp_path, RenderConfig(**FAST)).rendered == 2
    check_dataset(tmp_path, names(rows, 1))


class OOMAbove:
    """The pipeline, but any call with more than ``limit`` prompts raises CUDA's out-of-memory error."""

    def __init__(self, pipe, limit: int, message: str | None = None) -> None:
        object.__setattr__(self, "_pipe", pipe)
        object.__setattr__(self, "limit", limit)
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "sizes", [])

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __setattr__(self, name, value):
        setattr(self._pipe, name, value)

    def __call__(self, prompt, **kw):
        self.sizes.append(len(prompt))
        if len(prompt) > self.limit:
            import torch

            if self.message:
                raise RuntimeError(self.message)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB (simulated)")
        return self._pipe(prompt=prompt, **kw)


def test_out_of_memory_halves_the_batch_and_continues(lp, tmp_path):
    rows = prompt_rows(7)
    fake = OOMAbove(lp.pipe, limit=2)
    oom_lp = type(lp)(pipe=fake, arch="sd1", prediction_type="epsilon", model_hash=lp.model_hash, source=lp.source)
    warnings = []
    report = render_dataset(oom_lp, rows, tmp_path / "oom", RenderConfig(steps=2, batch_size=8), warn=warnings.append)
    assert report.status == "complete" and report.rendered == 7 and report.batch_size == 2
    assert fake.sizes == [7, 4, 2, 2, 2, 1]  # 7 fails, 4 fails, then batches of 2 (and the last one)
    assert len(warnings) == 2 and "out of memory at batch size 7; continuing with batch size 4" in warnings[0]
    render_dataset(lp, rows, tmp_path / "ref", RenderConfig(steps=2, batch_size=8))
    for name in names(rows, 1):
        assert_images_close(tmp_path / "oom" / name, tmp_path / "ref" / name)


def test_out_of_memory_at_batch_one_is_a_clear_error(lp, tmp_path):
    fake = OOMAbove(lp.pipe, limit=0, message="MPS backend out of memory (simulated)")
    oom_lp = type(lp)(pipe=fake, arch="sd1", prediction_type="epsilon", model_hash="x", source="x")
    with pytest.raises(SelmaError, match="out of memory rendering one 64x64 image; lower width/height"):
        render_dataset(oom_lp, prompt_rows(2), tmp_path, RenderConfig(steps=2, batch_size=2))


def test_the_renderer_keeps_no_reference_to_the_model(sd1_dir, tmp_path):
    """After render + release, the UNet is garbage: nothing in the report or module caches holds it."""
    local = load_tiny(sd1_dir)
    unet = weakref.ref(local.pipe.unet)
    report = render_dataset(local, prompt_rows(2), tmp_path, RenderConfig(**FAST))
    local.release()
    assert local.pipe is None and unet() is None
    assert report.rendered == 2
    with pytest.raises(SelmaError, match="released"):
        render_dataset(local, prompt_rows(2), tmp_path, RenderConfig(**FAST))


# --- the native path ----------------------------------------------------------------------------------


def _solid(value: int):
    from PIL import Image

    return Image.new("RGB", (64, 48), (value, 255 - value, 7))


def test_append_images_uses_the_same_format_stable_ids_and_is_idempotent(lp, tmp_path):
    rows = prompt_rows(2)
    render_dataset(lp, rows, tmp_path, RenderConfig(**FAST))
    first = append_images(tmp_path, [_solid(10), _solid(20)], ["a red cube", "a red cube"], "countbench", seed=42,
                          model_hash="cafe")
    pid = first[0]["prompt_id"]
    assert pid == first[1]["prompt_id"] and pid.startswith("countbench-t")
    assert [r["sample"] for r in first] == [0, 1] and first[0]["source"] == "comfyui" and first[0]["seed"] == 42
    again = append_images(tmp_path, [_solid(20), _solid(30)], ["a red cube"] * 2, "countbench", seed=43)
    assert again[0] == first[1] and again[1]["sample"] == 2  # same pixels: not added twice
    named = append_images(tmp_path, [_solid(40)], ["two cats"], "countbench", prompt_ids=["countbench-000001"])
    assert named[0]["file_name"] == "countbench-000001_s1.png"  # next free sample of a rendered prompt
    expected = names(rows, 1) | {f"{pid}_s{k}.png" for k in range(3)} | {"countbench-000001_s1.png"}
    check_dataset(tmp_path, expected)
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info["sources"] == ["render", "comfyui"] and info["appended_model_hashes"] == ["cafe"]
    with pytest.raises(SelmaError, match="one prompt per image"):
        append_images(tmp_path, [_solid(1)], ["a", "b"], "countbench")


def test_append_images_into_a_new_folder(tmp_path):
    rows = append_images(tmp_path / "new", [_solid(1)], ["ünïcode prompt, 漢字"], "product", source="comfyui")
    check_dataset(tmp_path / "new", {rows[0]["file_name"]})
    assert json.loads((tmp_path / "new" / "dataset.json").read_text())["sources"] == ["comfyui"]


# --- readers: HF datasets and ComfyUI's dataset node --------------------------------------------------


def test_hf_datasets_imagefolder_loads_the_dataset(lp, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = prompt_rows(3)
    out = tmp_path / "d"
    render_dataset(lp, rows, out, RenderConfig(images_per_prompt=2, **FAST))
    append_images(out, [_solid(5)], ["a blue cone"], "countbench", seed=1)
    d = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert d.num_rows == 7
    assert set(d.column_names) >= {"image", "text", "skill", "prompt_id", "seed", "sample", "source"}
    by_text = {(x["prompt_id"], x["sample"]): x for x in d}
    x = by_text[("countbench-000002", 1)]
    assert x["text"] == rows[2]["prompt"] and x["image"].size == (64, 64)
    assert np.array_equal(np.asarray(x["image"].convert("RGB"), dtype=np.int16),
                          pixels(out / "countbench-000002_s1.png"))


def comfyui_load_image_text_dataset(folder: Path) -> list[tuple[str, str]]:
    """What ComfyUI 0.3.75's LoadImageTextDataSetFromFolder reads (comfy_extras/nodes_dataset.py), minus
    tensors: every *.png/.jpg/.jpeg/.webp directly in the folder (and in sub-folders, kohya style),
    and for each, the caption from the same path with the extension replaced by .txt ("" if none)."""
    exts = (".png", ".jpg", ".jpeg", ".webp")
    files = []
    for item in os.listdir(folder):
        path = os.path.join(folder, item)
        if item.lower().endswith(exts):
            files.append(path)
        elif os.path.isdir(path):
            files.extend(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(exts))
    out = []
    for f in files:
        caption = f.replace(os.path.splitext(f)[1], ".txt")
        out.append((os.path.basename(f), Path(caption).read_text(encoding="utf-8").strip()
                    if os.path.exists(caption) else ""))
    return out


def test_the_layout_is_what_comfyuis_dataset_node_reads(lp, tmp_path):
    rows = prompt_rows(3)
    render_dataset(lp, rows, tmp_path, RenderConfig(images_per_prompt=2, **FAST))
    append_images(tmp_path, [_solid(5)], ["a blue cone"], "countbench")
    append_images(tmp_path, [_solid(6)], ["a green cone"], "countbench", prompt_ids=["shot.png.v2"])  # no ".png" in stems
    got = dict(comfyui_load_image_text_dataset(tmp_path))
    meta = {r["file_name"]: r["text"] for r in read_jsonl(tmp_path / "metadata.jsonl")}
    assert got == meta  # every image once, each with its own prompt; nothing else looks like an image
