"""Stage 4 training on the tiny models: experts trained, exported, loaded back and rendered; caches
reused; stop/resume exact; NaN stops with the last good checkpoint; SDXL, v-prediction, presets."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from train_helpers import SPATIAL, make_dataset, tiny_config

from selma_backend.errors import SelmaError
from selma_backend.lora.format import load_lora, provenance
from selma_backend.models.config import ModelConfig
from selma_backend.models.loader import load_pipeline
from selma_backend.train import TrainConfig, TrainingDiverged, train_experts
from selma_backend.train.config import PRESETS
from selma_backend.train.model import target_modules

COUNT = ["two red apples", "three blue cups", "one green bottle", "four yellow stars"]


@pytest.fixture(scope="module")
def sd1(tiny_models):
    lp = load_pipeline(ModelConfig(str(tiny_models["sd1"])))
    lp.pipe.set_progress_bar_config(disable=True)
    yield lp
    lp.release()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    return [make_dataset(root / "spatial", "spatial"), make_dataset(root / "count", "countbench", COUNT, seed=1)]


@pytest.fixture(scope="module")
def trained(sd1, datasets, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    cfg = tiny_config(validation_every=2, validation_prompts=("a cat to the left of a dog", "two cups"),
                      validation_steps=2)
    results = train_experts(sd1, datasets, out, cfg, cache_root=out / "cache")
    return out, cfg, results


def _render(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    return pipe("a red cube to the left of a blue ball", num_inference_steps=1, height=64, width=64, generator=g,
                output_type="np").images[0]


def test_one_call_trains_one_expert_per_dataset(trained, sd1):
    out, cfg, results = trained
    assert [r.name for r in results] == ["spatial", "countbench"]
    for r in results:
        assert r.path == str(out / f"{r.name}.safetensors") and r.steps == 4 and not r.stopped
        tensors, meta = load_lora(r.path)
        assert all(k.startswith("lora_unet_") for k in tensors)
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
        prov = provenance(meta)
        assert prov["skill"] == r.name and prov["base_model_sha256"] == sd1.model_hash
        assert prov["steps"] == 4 and prov["config"]["rank"] == 4 and len(prov["dataset_sha256"]) == 64
        ups = [t for k, t in tensors.items() if k.endswith("lora_up.weight")]
        assert ups and all(t.abs().sum() > 0 for t in ups)  # training moved B away from its zero init
    assert not any(n for n, _ in sd1.pipe.unet.named_parameters() if "lora" in n)  # adapter removed afterwards


def test_expert_loads_in_diffusers_and_changes_the_render(trained, sd1):
    _, _, results = trained
    base = _render(sd1.pipe)
    sd1.pipe.load_lora_weights(results[0].path, adapter_name="check")
    try:
        with_lora = _render(sd1.pipe)
    finally:
        sd1.pipe.delete_adapters("check")
    assert float(abs(with_lora - base).max()) > 1e-4
    assert float(abs(_render(sd1.pipe) - base).max()) == 0.0  # and unloading restores the base exactly


def test_loss_log_plot_and_validation_grids(trained):
    _, cfg, results = trained
    work = results[0].work_dir
    rows = list(csv.DictReader(open(f"{work}/loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["loss"]) > 0 and float(r["lr"]) == pytest.approx(cfg.lr) for r in rows)
    assert Image.open(results[0].loss_plot).size == (640, 360)
    grids = sorted(p.name for p in (Path(work) / "validation").iterdir())
    assert grids == ["step-000002.png", "step-000004.png"]
    assert Image.open(f"{work}/validation/step-000004.png").size[0] == 2 * 64


def test_caches_are_reused_across_runs_and_refuse_silent_overwrite(trained, sd1, datasets):
    out, cfg, results = trained
    first = results[0].cache
    assert first["latents_encoded"] == 2 * len(SPATIAL)  # both orientations: spatial may be flipped
    with pytest.raises(SelmaError, match="never overwritten silently"):
        train_experts(sd1, datasets[:1], out, cfg, cache_root=out / "cache")
    again = train_experts(sd1, datasets[:1], out, cfg, cache_root=out / "cache", overwrite=True)
    assert again[0].cache["latents_encoded"] == 0 and again[0].cache["text_encoded"] == 0
    assert again[0].cache["latents_reused"] == 2 * len(SPATIAL)
    skipped = train_experts(sd1, datasets[:1], out, cfg, cache_root=out / "cache", resume=True)
    assert skipped[0].skipped
    other_res = train_experts(sd1, datasets[:1], out / "r128", tiny_config(resolution=128, steps=1),
                              cache_root=out / "cache")
    assert other_res[0].cache["latents_encoded"] == 2 * len(SPATIAL)  # another resolution is another key


def _final(path):
    tensors, _ = load_lora(path)
    return tensors


def test_stop_then_resume_equals_an_uninterrupted_run(sd1, datasets, tmp_path):
    cfg = tiny_config(steps=5, checkpoint_every=100)
    straight = train_experts(sd1, datasets[:1], tmp_path / "a", cfg, cache_root=tmp_path / "cache")[0]
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    stopped = train_experts(sd1, datasets[:1], tmp_path / "b", cfg, cache_root=tmp_path / "cache",
                            should_stop=stop_after_two)[0]
    assert stopped.stopped and stopped.path is None and stopped.steps == 2
    assert (tmp_path / "b" / "spatial.train" / "checkpoints" / "step-000002").is_dir()
    with pytest.raises(SelmaError, match="unfinished run"):
        train_experts(sd1, datasets[:1], tmp_path / "b", cfg, cache_root=tmp_path / "cache")
    resumed = train_experts(sd1, datasets[:1], tmp_path / "b", cfg, cache_root=tmp_path / "cache", resume=True)[0]
    assert resumed.steps == 5
    a, b = _final(straight.path), _final(resumed.path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-exact on CPU: same steps, same noise, same order
    log = list(csv.DictReader(open(tmp_path / "b" / "spatial.train" / "loss.csv")))
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4, 5]


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(sd1, datasets, tmp_path):
    cfg = tiny_config(steps=6, checkpoint_every=1, lr=1e30, max_grad_norm=0.0)
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step \d") as err:
        train_experts(sd1, datasets[:1], tmp_path, cfg, cache_root=tmp_path / "cache")
    work = tmp_path / "spatial.train" / "checkpoints"
    kept = sorted(p.name for p in work.iterdir() if not p.name.startswith("."))
    assert kept and str(work / kept[-1]) in str(err.value)
    saved = _final_ckpt(work / kept[-1])
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert not (tmp_path / "spatial.safetensors").exists()


def _final_ckpt(path):
    from safetensors.torch import load_file

    return load_file(str(path / "lora.safetensors"))


def test_v_prediction_trains_against_the_velocity(tiny_models, datasets, tmp_path):
    lp = load_pipeline(ModelConfig(str(tiny_models["sd1"]), prediction_type="v_prediction"))
    try:
        assert lp.prediction_type == "v_prediction"
        r = train_experts(lp, datasets[1:], tmp_path, tiny_config(steps=2), cache_root=tmp_path / "c")[0]
        assert provenance(load_lora(r.path)[1])["prediction_type"] == "v_prediction"
    finally:
        lp.release()


def test_sdxl_expert_trains_and_loads_in_diffusers(tiny_models, datasets, tmp_path):
    lp = load_pipeline(ModelConfig(str(tiny_models["sdxl"])))
    lp.pipe.set_progress_bar_config(disable=True)
    try:
        r = train_experts(lp, datasets[:1], tmp_path, tiny_config(steps=2), cache_root=tmp_path / "c")[0]
        tensors, meta = load_lora(r.path)
        assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any(k.startswith("lora_unet_input_blocks_") for k in tensors)  # kohya's SDXL names are LDM names
        base = _render(lp.pipe)
        lp.pipe.load_lora_weights(r.path, adapter_name="x")
        assert float(abs(_render(lp.pipe) - base).max()) > 1e-5
        lp.pipe.delete_adapters("x")
        # bf16 weights, by default without autocast: the added conditioning (pooled text, time ids) follows
        cfg = tiny_config(steps=2, mixed_precision="bf16", validation_every=2, validation_prompts=("two cups",),
                          validation_steps=1)
        r = train_experts(lp, datasets[:1], tmp_path / "bf16", cfg, cache_root=tmp_path / "c")[0]
        assert lp.pipe.unet.dtype == torch.bfloat16 and r.final_loss is not None and r.final_loss == r.final_loss
        assert all(t.dtype == torch.float32 for t in load_lora(r.path)[0].values())
        assert (Path(r.work_dir) / "validation" / "step-000002.png").is_file()
    finally:
        lp.release()


def test_presets_choose_their_modules(sd1):
    unet = sd1.pipe.unet
    selma = target_modules(unet, PRESETS.get("selma"))
    assert selma and all(n.split(".")[-1] in ("to_q", "to_k", "to_v") or n.endswith("to_out.0") for n in selma)
    ff = target_modules(unet, PRESETS.get("attn+ff"))
    assert set(selma) < set(ff) and any(n.endswith("ff.net.2") for n in ff)
    full = target_modules(unet, PRESETS.get("full"))
    assert set(ff) < set(full) and any(n.endswith("resnets.0.conv1") for n in full)


def test_text_encoder_lora_and_peft_export(sd1, datasets, tmp_path):
    cfg = tiny_config(steps=1, text_encoder_lora=True, export_format="peft", preset="attn+ff")
    r = train_experts(sd1, datasets[1:], tmp_path, cfg, cache_root=tmp_path / "c")[0]
    tensors, meta = load_lora(r.path)
    assert any(k.startswith("text_encoder.") for k in tensors) and any(k.startswith("unet.") for k in tensors)
    assert any("ff.net.2" in k for k in tensors)
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4
    assert r.cache["text_encoded"] == 0  # a trained text encoder cannot use cached text
    sd1.pipe.load_lora_weights(r.path, adapter_name="peft")
    sd1.pipe.delete_adapters("peft")


def test_a_model_loaded_under_inference_mode_still_trains(tiny_models, datasets, tmp_path):
    """ComfyUI runs nodes under torch.inference_mode: weights made there cannot be saved for backward."""
    with torch.inference_mode():
        lp = load_pipeline(ModelConfig(str(tiny_models["sd1"])))
        try:
            r = train_experts(lp, datasets[1:], tmp_path, tiny_config(steps=1), cache_root=tmp_path / "c")[0]
        finally:
            lp.release()
    assert r.steps == 1 and Path(r.path).is_file()


def test_resume_skips_only_an_expert_made_from_the_same_data_and_settings(sd1, datasets, tmp_path):
    cfg = tiny_config(steps=2)
    first = train_experts(sd1, datasets[1:], tmp_path, cfg, cache_root=tmp_path / "c")[0]
    assert train_experts(sd1, datasets[1:], tmp_path, cfg, cache_root=tmp_path / "c", resume=True)[0].skipped
    other = tiny_config(steps=3)
    with pytest.raises(SelmaError, match="other data or settings"):
        train_experts(sd1, datasets[1:], tmp_path, other, cache_root=tmp_path / "c", resume=True)
    assert load_lora(first.path)[0]  # untouched
    again = train_experts(sd1, datasets[1:], tmp_path, other, cache_root=tmp_path / "c", resume=True, overwrite=True)[0]
    assert not again.skipped and again.steps == 3
    assert provenance(load_lora(again.path)[1])["steps"] == 3


def test_resume_accepts_changed_runtime_settings_and_older_checkpoints(sd1, datasets, tmp_path):
    """How a run executes (gradient checkpointing, layout, autocast, checkpoint cadence) may change on
    resume -- the fix after running out of memory -- and a checkpoint written before a runtime field
    existed still resumes; the recipe (here the learning rate) may not change."""
    cfg = tiny_config(steps=4, checkpoint_every=1)
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    stopped = train_experts(sd1, datasets[:1], tmp_path, cfg, cache_root=tmp_path / "c", should_stop=stop_after_two)[0]
    assert stopped.stopped and stopped.steps == 2
    state_path = tmp_path / "spatial.train" / "checkpoints" / "step-000002" / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]["autocast"], state["config"]["memory_format"]  # as written before these fields existed
    state_path.write_text(json.dumps(state))
    with pytest.raises(SelmaError, match="other data or settings"):
        train_experts(sd1, datasets[:1], tmp_path, tiny_config(steps=4, checkpoint_every=1, lr=2e-3),
                      cache_root=tmp_path / "c", resume=True)
    runtime = tiny_config(steps=4, checkpoint_every=2, gradient_checkpointing=True, memory_format="channels_last",
                          autocast="on")
    resumed = train_experts(sd1, datasets[:1], tmp_path, runtime, cache_root=tmp_path / "c", resume=True)[0]
    assert resumed.steps == 4 and not resumed.stopped
    log = list(csv.DictReader(open(tmp_path / "spatial.train" / "loss.csv")))
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4]  # continued from step 2, not restarted
    assert train_experts(sd1, datasets[:1], tmp_path, cfg, cache_root=tmp_path / "c", resume=True)[0].skipped


def test_text_encoder_lora_in_kohya_layout_loads_in_diffusers(sd1, datasets, tmp_path):
    cfg = tiny_config(steps=1, text_encoder_lora=True)
    r = train_experts(sd1, datasets[1:], tmp_path, cfg, cache_root=tmp_path / "c")[0]
    tensors, _ = load_lora(r.path)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_out_proj") for k in tensors)
    base = _render(sd1.pipe)
    sd1.pipe.load_lora_weights(r.path, adapter_name="te")
    try:
        assert float(abs(_render(sd1.pipe) - base).max()) > 0
    finally:
        sd1.pipe.delete_adapters("te")


def test_cache_misses_exactly_when_an_image_caption_or_model_changes(sd1, tmp_path):
    from selma_backend.train.cache import FeatureCache
    from selma_backend.train.data import load_samples

    ds = make_dataset(tmp_path / "d", "product", prompts=["a red mug", "a blue mug"])  # flip policy never: 1 view each

    def fill(model_hash: str = sd1.model_hash) -> dict:
        cache = FeatureCache(tmp_path / "cache", model_hash)
        cache.fill(sd1.pipe, "sd1", load_samples(ds, resolution=64, buckets=False))
        return cache.stats

    assert fill()["latents_encoded"] == 2
    assert fill() == {"latents_encoded": 0, "text_encoded": 0, "latents_reused": 2, "text_reused": 2}
    first = sorted(ds.glob("*.png"))[0]
    img = Image.open(first).convert("RGB")
    img.putpixel((0, 0), (0, 0, 0) if img.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    img.save(first)
    assert fill()["latents_encoded"] == 1  # only the changed image
    rows = (ds / "metadata.jsonl").read_text().replace("a blue mug", "a green mug")
    (ds / "metadata.jsonl").write_text(rows)
    assert fill()["text_encoded"] == 1  # only the changed caption
    assert fill("f" * 64)["latents_encoded"] == 2  # another model: nothing reused


def test_layout_and_precision_settings_train_the_same_expert(tiny_models, datasets, tmp_path, monkeypatch):
    """``memory_format`` and ``autocast`` change how the step runs, not what it learns: channels-last
    gives the fp32 loss curve and weights; bf16 without autocast runs every LoRA Linear fused in bf16
    (fp32 factors cast on use, fp32 gradients) and lands within bf16 rounding of bf16 under autocast.
    During training the UNet is channels-last and cuDNN autotunes; afterwards both are as before."""
    from selma_backend.train import fused_lora

    seen: dict[str, Any] = {"layout": [], "benchmark": [], "fused_dtypes": []}
    apply = fused_lora._LoraLinear.apply

    def counting_apply(*args):
        seen["fused_dtypes"].append(args[-1])
        return apply(*args)

    monkeypatch.setattr(fused_lora._LoraLinear, "apply", counting_apply)
    lp = load_pipeline(ModelConfig(str(tiny_models["sd1"])))
    lp.pipe.set_progress_bar_config(disable=True)
    try:
        def train(name: str, **kw) -> tuple[list[float], dict[str, torch.Tensor]]:
            def on_log(_info) -> None:
                seen["layout"].append(lp.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
                seen["benchmark"].append(torch.backends.cudnn.benchmark)
                seen["fused_at_step"] = len(seen["fused_dtypes"])

            r = train_experts(lp, datasets[:1], tmp_path / name, tiny_config(steps=3, **kw), cache_root=tmp_path / "c",
                              on_log=on_log)[0]
            losses = [float(row["loss"]) for row in csv.DictReader(open(Path(r.work_dir) / "loss.csv"))]
            return losses, _final(r.path)

        before = torch.backends.cudnn.benchmark
        plain = train("plain", memory_format="contiguous")
        assert seen["layout"] == [False] * 3
        last = train("channels-last", memory_format="channels_last")
        assert seen["layout"][3:] == [True] * 3 and seen["benchmark"] == [True] * 6
        assert not lp.pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.backends.cudnn.benchmark == before
        assert last[0] == pytest.approx(plain[0], rel=1e-5)
        for k in plain[1]:  # the same up to float rounding (which Adam's first steps magnify near zero)
            assert _mean_rel(last[1][k], plain[1][k]) < 1e-3, k

        seen["fused_dtypes"].clear()
        auto = train("bf16-autocast", mixed_precision="bf16", autocast="on")
        pure = train("bf16-pure", mixed_precision="bf16", autocast="off", validation_every=3,
                     validation_prompts=("two cups",), validation_steps=1)  # validation: the fp32 VAE decodes
        assert lp.pipe.unet.dtype == torch.bfloat16
        assert set(seen["fused_dtypes"]) == {torch.bfloat16}
        # both runs' training steps (3 steps x 2 micro-batches) ran every LoRA Linear fused; validation followed
        assert seen["fused_at_step"] == 2 * 3 * 2 * sum(k.endswith(".lora_down.weight") for k in pure[1])
        assert (tmp_path / "bf16-pure" / "spatial.train" / "validation" / "step-000003.png").is_file()
        assert pure[0] == pytest.approx(auto[0], rel=0.02) and pure[0] == pytest.approx(plain[0], rel=0.05)
        for k in auto[1]:
            assert pure[1][k].dtype == torch.float32
            assert _mean_rel(pure[1][k], auto[1][k]) < 0.1, k
    finally:
        lp.release()


def _mean_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().mean() / want.float().abs().mean().clamp_min(1e-12))


def test_autocast_auto_is_off_with_bf16_and_on_with_fp16():
    from selma_backend.train.run import use_autocast

    assert not use_autocast(TrainConfig(), torch.bfloat16)  # measured faster, same loss (README, Performance)
    assert use_autocast(TrainConfig(), torch.float16)  # fp32 norms guard fp16's narrow range
    assert use_autocast(TrainConfig(autocast="on"), torch.bfloat16)
    assert not use_autocast(TrainConfig(autocast="off"), torch.float16)
    assert not use_autocast(TrainConfig(autocast="on"), torch.float32)
    with pytest.raises(SelmaError, match="autocast.*'yes'.*allowed.*'auto', 'on', 'off'"):
        TrainConfig(autocast="yes")
    with pytest.raises(SelmaError, match="memory_format"):
        TrainConfig(memory_format="nhwc")
