"""bench/bench_train.py: our trainer against the reference loop on CPU, each precision its own side-by-side pair,
and the FLOP accounting that bounds what caching the encoders can give."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("selma_bench_train", BENCH / "bench_train.py")
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)


def test_flop_shares_of_sd15_match_the_issue_and_the_bench_model_keeps_at_least_that_share():
    sd15 = bench_train.flop_shares(bench_train.SD15["unet"], bench_train.SD15["vae"], bench_train.SD15["text"], 512, 128)
    # the issue: re-encoding is "about 40% of SD1.5 training FLOPs"
    assert 0.35 < sd15["encoder_share"] < 0.42
    assert sd15["caching_only_ratio"] == pytest.approx(1 / (1 - sd15["encoder_share"]))
    assert 1500 < sd15["unet_train_gflop"] < 2100 and 1000 < sd15["vae_encode_gflop"] < 1250
    small = bench_train.flop_shares(bench_train.UNET, bench_train.VAE, bench_train.TEXT, bench_train.RES, 16)
    assert small["unet_train_gflop"] < sd15["unet_train_gflop"] / 50
    assert small["encoder_share"] >= sd15["encoder_share"]  # the reduced model does not flatter caching less
    # a higher rank adds LoRA FLOPs to the UNet step only
    more = bench_train.flop_shares(bench_train.UNET, bench_train.VAE, bench_train.TEXT, bench_train.RES, 64)
    assert more["unet_train_gflop"] > small["unet_train_gflop"]
    assert more["vae_encode_gflop"] == small["vae_encode_gflop"]


def test_unknown_precision_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"precisions: got \['fp16'\]; allowed: .*'fp32', 'bf16'"):
        bench_train.run(tiny=True, precisions=("fp16",))


@pytest.mark.slow
def test_tiny_run_measures_each_precision_as_its_own_pair():
    result = bench_train.run(tiny=True, precisions=("fp32", "bf16"))
    pairs = result["by_precision"]
    assert list(pairs) == ["fp32", "bf16"]
    for name, pair in pairs.items():
        assert pair["ours"] > 0 and pair["reference"] > 0
        assert pair["ratio"] == pytest.approx(pair["ours"] / pair["reference"])
        assert len(pair["losses_ours"]) == len(pair["losses_reference"]) == 2
        # same batches, noise and timesteps: the curves differ by the VAE's sample vs mean (and bf16 rounding)
        assert pair["loss_mean_rel_diff_per_step"] < 0.02, name
        assert pair["loss_max_rel_diff_vs_fp32_reference"]["ours"] < 0.03, name
        assert pair["loss_max_rel_diff_fused_vs_peft_layers"] < (1e-4 if name == "fp32" else 0.01), name
    assert pairs["fp32"]["loss_max_rel_diff_vs_fp32_reference"]["reference"] == 0.0
    # bf16 really ran in bf16: its losses are not the fp32 ones
    assert pairs["bf16"]["losses_reference"] != pairs["fp32"]["losses_reference"]
    # the headline is the fp32 pair; best_of_each is each method at its faster precision
    assert result["precision"] == "fp32" and result["ours"] == pairs["fp32"]["ours"]
    assert result["ratio"] == pairs["fp32"]["ratio"]
    best = result["best_of_each"]
    assert best["ours"] == max(p["ours"] for p in pairs.values())
    assert best["reference"] == max(p["reference"] for p in pairs.values())
    assert best["ratio"] == pytest.approx(best["ours"] / best["reference"])
    assert pairs[best["ours_precision"]]["ours"] == best["ours"]
    assert pairs[best["reference_precision"]]["reference"] == best["reference"]
    assert isinstance(result["native_bf16"], bool)
    assert set(result["flops"]) == {"bench_model", "sd15_512px_rank128"}


@pytest.mark.slow
def test_one_precision_alone_is_the_headline():
    result = bench_train.run(tiny=True, precisions=("bf16",))
    assert list(result["by_precision"]) == ["bf16"] and result["precision"] == "bf16"
    assert result["ratio"] == result["by_precision"]["bf16"]["ratio"]
    assert result["best_of_each"]["ratio"] == pytest.approx(result["ratio"])  # ours / reference: same figure, two roundings
    assert "loss_max_rel_diff_vs_fp32_reference" not in result["by_precision"]["bf16"]  # no fp32 pair to compare
