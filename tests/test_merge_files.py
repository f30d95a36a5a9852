"""S5 at the file level: merge LoRA files of any layout, check them first, write atomically, report errors.

The pure math is tested in test_merge_math.py; here the same guarantees are checked through files: what a
loader computes from the merged file (alpha / rank * up @ down, alpha read as float32) against
sum_i w_i dW_i of the experts, in float64 unless stated.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_helpers import ARCH, expert_tensors, module_delta, weighted_sum, write_expert
from test_merge_math import _np_dare_drop, _np_ties_merge, _np_trim

from selma_backend.errors import SelmaError
from selma_backend.fsio import sha256_file
from selma_backend.lora import (
    MatchReport,
    NameMap,
    convert_lora,
    from_kohya,
    kohya_metadata,
    load_lora,
    match_keys,
    provenance,
    read_lora,
    save_lora,
)
from selma_backend.merge import MERGE_METHODS, MergeConfig, merge_files

F64 = torch.float64
UNET_MOD = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # (32, 32)
TE_MOD = "lora_te_text_model_encoder_layers_1_mlp_fc1"  # (37, 32)
MID_MOD = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
UP_MOD = "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"

EPS32 = float(torch.finfo(torch.float32).eps)


@pytest.fixture()
def experts(tmp_path) -> list[Path]:
    """Three float64 experts with different ranks and alphas; the third lacks the mid block."""
    return [write_expert(tmp_path / "a.safetensors", 2, 1.0, 1, dtype=F64),
            write_expert(tmp_path / "b.safetensors", 4, 8.0, 2, dtype=F64),
            write_expert(tmp_path / "c.safetensors", 3, 4.5, 3, dtype=F64, drop=("mid_block",))]


def _load(path: Path) -> dict[str, torch.Tensor]:
    return load_lora(path)[0]


def _rel(x: torch.Tensor, t: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - t) / torch.linalg.norm(t))


def _modules(tensors: dict[str, torch.Tensor]) -> set[str]:
    return {k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")}


# --- linear, svd ---------------------------------------------------------------------------------------------


def test_linear_file_is_exact_for_every_module_and_text_encoder(experts, tmp_path):
    w = [0.5, -1.25, 2.0]
    report = merge_files(experts, tmp_path / "m.safetensors", MergeConfig(method="linear", weights=w))
    merged, srcs = _load(tmp_path / "m.safetensors"), [_load(p) for p in experts]
    assert _modules(merged) == set().union(*map(_modules, srcs)) and TE_MOD in _modules(merged)
    for module in _modules(merged):
        want = weighted_sum(srcs, w, module)
        assert _rel(module_delta(merged, module), want) <= 1e-12, module  # tol 1e-12: float64 end to end
        ranks = sum(s[module + ".lora_down.weight"].shape[0] for s in srcs if module + ".lora_down.weight" in s)
        assert merged[module + ".lora_down.weight"].shape[0] == ranks  # exact: rank = sum of the present ranks
    assert report.error <= 1e-7 and report.rank == 9  # alpha is stored as float32: ~6e-8 relative at most


def test_missing_module_is_a_zero_delta(experts, tmp_path):
    report = merge_files(experts, tmp_path / "m.safetensors", MergeConfig(method="linear"))
    merged, srcs = _load(tmp_path / "m.safetensors"), [_load(p) for p in experts]
    third = 1.0 / 3.0  # 1/N with N = 3 files, also where only two files have the module
    want = third * module_delta(srcs[0], MID_MOD) + third * module_delta(srcs[1], MID_MOD)
    assert _rel(module_delta(merged, MID_MOD), want) <= 1e-7  # tol: alpha's float32 rounding
    assert report.partial[MID_MOD] == ["c.safetensors"]
    with pytest.raises(SelmaError, match=r"c\.safetensors: has no module lora_unet_mid_block"):
        merge_files(experts, tmp_path / "s.safetensors", MergeConfig(method="linear", strict_keys=True))
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_file_reaches_the_dense_truncated_svd_optimum(experts, tmp_path, rank):
    w = [0.3, 0.5, -0.7]
    report = merge_files(experts, tmp_path / "m.safetensors", MergeConfig(method="svd", weights=w, rank=rank))
    merged, srcs = _load(tmp_path / "m.safetensors"), [_load(p) for p in experts]
    for module in (UNET_MOD, TE_MOD, UP_MOD):
        t = weighted_sum(srcs, w, module)
        s = torch.linalg.svdvals(t)
        optimum = float(s[rank:].square().sum().sqrt() / s.norm())
        got = _rel(module_delta(merged, module), t)
        assert abs(got - optimum) <= 1e-5 * optimum, (module, got, optimum)  # tol 1e-5 relative (the issue's)
        layer = next(x for x in report.layers if x.module == module)
        # the reported error is the measured one, to the resolution of its trace formula: with a float32 eigh
        # (merge.layer._tail_ok) ||T||^2 is a float32 trace, so err^2 carries ~eps32 and err ~eps32 / (2 err);
        # observed 2.5e-7 at err 0.22 on an AMD CPU (0.9 eps32 in err^2); tol 8 eps32 in err^2
        assert abs(layer.error - got) <= 8 * EPS32 / (2 * got), (module, layer.error, got)
        assert merged[module + ".lora_down.weight"].shape[0] == rank
        assert float(merged[module + ".alpha"]) == rank  # scale 1


def test_svd_at_full_rank_equals_linear(experts, tmp_path):
    merge_files(experts, tmp_path / "m.safetensors", MergeConfig(method="svd", rank=64))
    merged, srcs = _load(tmp_path / "m.safetensors"), [_load(p) for p in experts]
    for module in (UNET_MOD, TE_MOD):
        assert merged[module + ".lora_down.weight"].shape[0] == 9  # capped at the available rank, no zero padding
        assert _rel(module_delta(merged, module), weighted_sum(srcs, [1 / 3] * 3, module)) <= 1e-7  # tol: roundoff


# --- ties / dare / magnitude_prune against an independent reference ----------------------------------------


def _dare_seed(seed: int, module: str) -> int:
    """The documented draw: a generator per module, seeded by sha256("<seed>:<module>")."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{module}".encode()).digest()[:8], "little") >> 1


def _reference(method: str, deltas: list[np.ndarray], ws: list[float], density: float, seed: int) -> np.ndarray:
    if method == "magnitude_prune":
        return sum(w * _np_trim(d, density) for d, w in zip(deltas, ws, strict=True))
    if method == "ties":
        return _np_ties_merge([_np_trim(d, density) for d in deltas], ws)
    dropped = _np_dare_drop(deltas, density, seed)
    if method == "dare_linear":
        return sum(w * d for d, w in zip(dropped, ws, strict=True))
    return _np_ties_merge(dropped, ws)


def _truncate(m: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_task_arithmetic_file_matches_reference(experts, tmp_path, method):
    w, density, seed, rank = [0.5, 1.0, -0.25], 0.4, 7, 5
    config = MergeConfig(method=method, weights=w, density=density, seed=seed, rank=rank,
                         block_weights={"up": 0.5})
    report = merge_files(experts, tmp_path / "m.safetensors", config)
    merged, srcs = _load(tmp_path / "m.safetensors"), [_load(p) for p in experts]
    for module, block in ((UNET_MOD, 1.0), (UP_MOD, 0.5), (MID_MOD, 1.0)):
        present = [(module_delta(s, module), wi) for s, wi in zip(srcs, w, strict=True)
                   if module_delta(s, module) is not None]
        dense = block * _reference(method, [d.numpy() for d, _ in present], [wi for _, wi in present], density,
                                   _dare_seed(seed, module))
        want = _truncate(dense, rank)
        got = module_delta(merged, module).numpy()
        # tol 1e-5 (the issue's): the truncation's subspace may come from a float32 eigh (kept only when the
        # tail is large, see merge.layer._tail_ok), so got - want is first order in float32's subspace angle;
        # observed 3e-7 on an Intel CPU, 1.1e-6 on an AMD one. Its error is optimal to 1e-9 (checked below).
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), (method, module)
        s_dense = np.linalg.svd(dense, compute_uv=False)
        optimum = np.sqrt((s_dense[rank:] ** 2).sum()) / np.linalg.norm(dense)
        assert abs(np.linalg.norm(got - dense) / np.linalg.norm(dense) - optimum) <= 1e-9 * optimum
        layer = next(x for x in report.layers if x.module == module)
        target = block * weighted_sum(srcs, w, module).numpy()
        assert abs(layer.error - np.linalg.norm(got - target) / np.linalg.norm(target)) <= 1e-9
        assert abs(layer.method_error - np.linalg.norm(got - dense) / np.linalg.norm(dense)) <= 1e-9


def test_dare_is_reproducible_and_seeded(experts, tmp_path):
    runs = [merge_files(experts, tmp_path / f"{i}.safetensors", MergeConfig(method="dare_linear", seed=s, rank=4))
            for i, s in enumerate((1, 1, 2))]
    a, b, c = (_load(tmp_path / f"{i}.safetensors") for i in range(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert runs[0].error == runs[1].error


# --- block weights, dtypes, layouts ---------------------------------------------------------------------------


def test_block_weights_scale_and_drop_blocks(experts, tmp_path):
    cfg = MergeConfig(method="linear", block_weights={"mid": 0.5, "te": 0.0})
    report = merge_files(experts, tmp_path / "m.safetensors", cfg)
    merged, srcs = _load(tmp_path / "m.safetensors"), [_load(p) for p in experts]
    assert not any(k.startswith("lora_te") for k in merged) and TE_MOD in report.dropped
    want = 0.5 * weighted_sum(srcs, [1 / 3] * 3, MID_MOD)
    assert _rel(module_delta(merged, MID_MOD), want) <= 1e-7
    assert _rel(module_delta(merged, UNET_MOD), weighted_sum(srcs, [1 / 3] * 3, UNET_MOD)) <= 1e-7


def test_layouts_merge_the_same(tmp_path):
    """kohya, PEFT/diffusers and ComfyUI-native experts give the same merged file as all-kohya ones."""
    kohya = [write_expert(tmp_path / f"k{i}.safetensors", 3, 2.0 + i, 10 + i) for i in range(3)]
    mixed = [write_expert(tmp_path / f"x{i}.safetensors", 3, 2.0 + i, 10 + i, layout=lay)
             for i, lay in enumerate(("kohya", "peft", "comfy"))]
    assert [read_lora(p).layout for p in mixed] == ["kohya", "peft", "comfy"]
    merge_files(kohya, tmp_path / "a.safetensors", MergeConfig(method="svd", rank=4))
    report = merge_files(mixed, tmp_path / "b.safetensors", MergeConfig(method="svd", rank=4))
    a, b = _load(tmp_path / "a.safetensors"), _load(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [s["layout"] for s in report.sources] == ["kohya", "peft", "comfy"]


def test_fp16_experts_give_fp16_file_with_measured_rounding(tmp_path):
    ps = [write_expert(tmp_path / f"h{i}.safetensors", 4, 4.0, i, dtype=torch.float16) for i in range(2)]
    report = merge_files(ps, tmp_path / "m.safetensors", MergeConfig(method="svd", rank=8))
    merged, srcs = _load(tmp_path / "m.safetensors"), [_load(p) for p in ps]
    assert merged[UNET_MOD + ".lora_up.weight"].dtype == torch.float16
    got = _rel(module_delta(merged, UNET_MOD), weighted_sum(srcs, [0.5, 0.5], UNET_MOD))
    layer = next(x for x in report.layers if x.module == UNET_MOD)
    assert 1e-6 < got < 2e-3 and abs(layer.error - got) <= 1e-6  # full rank: only fp16 storage rounding remains


# --- provenance, size, atomic writes ----------------------------------------------------------------------------


def test_metadata_records_sources_config_errors_and_size(experts, tmp_path):
    out = tmp_path / "m.safetensors"
    report = merge_files(experts, out, MergeConfig(method="ties", weights=[1, 2, 3], rank=3, density=0.7))
    meta = load_lora(out)[1]
    prov = provenance(meta)
    assert prov["file_size"] == out.stat().st_size == report.file_size
    assert [s["sha256"] for s in prov["sources"]] == [sha256_file(p) for p in experts]
    assert prov["config"]["method"] == "ties" and prov["config"]["density"] == 0.7 and prov["weights"] == [1, 2, 3]
    assert prov["rank"] == 3 and set(prov["errors"]) == {x.module for x in report.layers}
    assert prov["error"] == pytest.approx(report.error) and meta["ss_network_dim"] == "3"
    assert meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(json.dumps(report.to_dict()))["config"]["seed"] is None  # not a DARE method


def _no_stray_files(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


def test_checks_name_the_file_and_the_mismatch(tmp_path):
    a = write_expert(tmp_path / "a.safetensors", 2, 2.0, 1)
    keep = {"a.safetensors"}
    cases = [
        (lambda p: write_expert(p, 2, 2.0, 2, base="sd_v2"), r"b\.safetensors: made for 'sd_v2', but a\.safetensors"),
        (lambda p: save_lora(p, {k: (torch.zeros(5, v.shape[1]) if k.startswith(UNET_MOD) and k.endswith("up.weight")
                                     else v) for k, v in expert_tensors(2, 2.0, 2).items()}, {}),
         rf"b\.safetensors: module {UNET_MOD} has shape .*\(5, 32\), but \(32, 32\) in a\.safetensors"),
        (lambda p: save_lora(p, {k.replace("lora_te_", "lora_te1_"): v for k, v in expert_tensors(2, 2.0, 2).items()},
                             {}), r"b\.safetensors: made for 'sdxl_base_v1-0'"),  # base read from the names
        (lambda p: save_lora(p, {k: v for k, v in expert_tensors(2, 2.0, 2).items() if not k.endswith("up.weight")
                                 or not k.startswith(UNET_MOD)}, {}), rf"b\.safetensors: {UNET_MOD}.lora_down.weight has no"),
        (lambda p: p.write_bytes(b"not a safetensors file"), r"b\.safetensors: not a readable"),
    ]
    for make, message in cases:
        b = tmp_path / "b.safetensors"
        make(b)
        with pytest.raises(SelmaError, match=message):
            merge_files([a, b], tmp_path / "m.safetensors", MergeConfig(method="svd", rank=2))
        b.unlink()
        _no_stray_files(tmp_path, keep)  # never a partial output
    with pytest.raises(SelmaError, match="weights: got"):
        merge_files([a], tmp_path / "m.safetensors", MergeConfig(weights=[1.0, 2.0]))
    bare = write_expert(tmp_path / "bare.safetensors", 2, 2.0, 3, base=None)  # tiny shapes, no metadata: base unknown
    sdxl = save_lora(tmp_path / "xl.safetensors", {k.replace("lora_te_", "lora_te1_"): v
                                                   for k, v in expert_tensors(2, 2.0, 2, drop=("unet",)).items()}, {})
    with pytest.raises(SelmaError, match="text-encoder names differ"):
        merge_files([bare, sdxl], tmp_path / "m.safetensors", MergeConfig(method="linear"))
    _no_stray_files(tmp_path, keep | {"bare.safetensors", "xl.safetensors"})


def test_existing_output_is_refused_and_a_failed_write_leaves_nothing(experts, tmp_path, monkeypatch):
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(SelmaError, match="exists already"):
        merge_files(experts, out, MergeConfig(method="linear"))
    assert out.read_bytes() == b"precious"
    with pytest.raises(SelmaError, match="is one of the experts"):
        merge_files(experts, experts[0], MergeConfig(method="linear"), overwrite=True)
    import selma_backend.fsio as fsio

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        merge_files(experts, out, MergeConfig(method="linear"), overwrite=True)
    assert out.read_bytes() == b"precious"  # the old file stays whole, no temporary file is left behind
    _no_stray_files(tmp_path, {p.name for p in experts} | {"m.safetensors"})


def test_config_validation_names_the_field():
    for kwargs, field in [({"method": "average"}, "method"), ({"weights": [1, float("nan")]}, "weights"),
                          ({"rank": 0}, "rank"), ({"method": "linear", "rank": 4}, "rank"),
                          ({"density": 0}, "density"), ({"block_weights": {"left": 1}}, "block_weights"),
                          ({"dtype": "fp64"}, "dtype"), ({"seed": -1}, "seed")]:
        with pytest.raises(SelmaError) as e:
            MergeConfig(**kwargs)
        assert str(e.value).startswith(f"{field}: got"), (kwargs, str(e.value))
    assert MergeConfig().to_dict()["method"] == "svd" and list(MERGE_METHODS) == [
        "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


# --- format bridge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["peft", "comfy"])
def test_layout_conversion_round_trip_is_exact(tmp_path, layout):
    src = write_expert(tmp_path / "k.safetensors", 3, 5.5, 4, dtype=torch.float16)
    there = convert_lora(src, tmp_path / f"x_{layout}.safetensors", layout)
    assert read_lora(there).layout == layout
    back = convert_lora(there, tmp_path / "back.safetensors", "kohya")
    a, b = _load(src), _load(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # exact: same bits, alphas too
    meta = load_lora(back)[1]
    assert meta["ss_network_dim"] == "3" and "lora_adapter_metadata" not in meta
    with pytest.raises(SelmaError, match="exists already"):
        convert_lora(src, there, layout)


def test_peft_file_without_base_needs_one(tmp_path):
    kohya = expert_tensors(2, 2.0, 1, te=False)
    tensors, meta = from_kohya(kohya, "peft", NameMap(ARCH))
    p = save_lora(tmp_path / "p.safetensors", tensors, meta)  # tiny shapes: no base from metadata or shapes
    with pytest.raises(SelmaError, match=r"p\.safetensors: base: got None"):
        read_lora(p)
    assert read_lora(p, base="sd_v1").kohya.keys() == kohya.keys()


def test_match_keys_counts_what_a_key_map_loads():
    kohya = expert_tensors(2, 2.0, 1)
    key_map = {k[: -len(".lora_up.weight")]: "diffusion_model.x" for k in kohya
               if k.endswith("up.weight") and k.startswith("lora_unet")}
    report = match_keys(kohya, key_map)
    n_te = sum(k.startswith("lora_te") for k in kohya)
    assert isinstance(report, MatchReport) and report.layout == "kohya"
    assert (report.total, report.matched, len(report.unmatched)) == (len(kohya), len(kohya) - n_te, n_te)
    assert report.text().startswith(f"{len(kohya) - n_te} of {len(kohya)} keys matched")
    assert report.targets == {"diffusion_model": len(key_map)}


# --- CLI -------------------------------------------------------------------------------------------------------


def _selma(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selma_backend", *args], capture_output=True, text=True, timeout=300)


def test_cli_round_trip(experts, tmp_path):
    out = tmp_path / "cli.safetensors"
    files = [str(p) for p in experts]
    run = _selma("merge", *files, "--method", "svd", "--rank", "3", "--weights", "1,0.5,0.25", "--block-weights",
                 "mid=0.5", "--out", str(out), "--json")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["rank"] == 3 and report["weights"] == [1, 0.5, 0.25] and report["file_size"] == out.stat().st_size
    same = merge_files(experts, tmp_path / "api.safetensors",
                       MergeConfig(method="svd", rank=3, weights=[1, 0.5, 0.25], block_weights={"mid": 0.5}))
    a, b = _load(out), _load(tmp_path / "api.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and report["error"] == pytest.approx(same.error)
    before = out.read_bytes()
    refused = _selma("merge", *files, "--method", "linear", "--out", str(out))
    assert refused.returncode == 2 and "exists already" in refused.stderr and out.read_bytes() == before
    for bad, message in ((["--method", "linear", "--rank", "2"], "rank: got 2"),
                         (["--method", "svd", "--density", "0.5"], "--density: got 0.5"),
                         (["--weights", "1,2"], "weights: got")):
        run = _selma("merge", *files, *bad, "--out", str(tmp_path / "bad.safetensors"))
        assert run.returncode == 2 and message in run.stderr, run.stderr
    ok = _selma("merge", *files, "--method", "linear", "--out", str(out), "--overwrite")
    assert ok.returncode == 0 and "linear merge of 3 experts" in ok.stdout
    assert provenance(load_lora(out)[1])["config"]["method"] == "linear"


def test_kohya_metadata_alpha_is_kept_by_conversion(tmp_path):
    kohya = expert_tensors(2, 3.0, 1)
    p = save_lora(tmp_path / "k.safetensors", kohya, kohya_metadata(arch=ARCH, rank=2, alpha=3.0))
    q = convert_lora(p, tmp_path / "q.safetensors", "peft")
    cfg = json.loads(load_lora(q)[1]["lora_adapter_metadata"])
    assert cfg["unet.lora_alpha"] == 3.0 and cfg["text_encoder.r"] == 2


# --- diffusers: the merged file loads and renders like the stacked experts ------------------------------------

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory) -> Path:
    from selma_backend.tiny_models import write_sd1

    return write_sd1(tmp_path_factory.mktemp("merge-sd1") / "sd1", seed=0)


def _outputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 77, 32, generator=gen)
    ids = pipe.tokenizer(["a red cube left of a blue ball"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, 10, ctx).sample, pipe.text_encoder(ids)[0]


def test_diffusers_merged_file_equals_stacked_experts(sd1, tmp_path, monkeypatch):
    """linear (and full-rank svd) merged file == the experts stacked at inference with set_adapters weights."""
    from diffusers import StableDiffusionPipeline

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    ps = [write_expert(tmp_path / f"e{i}.safetensors", r, a, 20 + i) for i, (r, a) in enumerate(((2, 1.0), (4, 8.0), (3, 4.5)))]
    w = [0.5, -1.0, 1.5]
    merge_files(ps, tmp_path / "linear.safetensors", MergeConfig(method="linear", weights=w))
    merge_files(ps, tmp_path / "svd.safetensors", MergeConfig(method="svd", weights=w, rank=64, dtype="fp32"))

    def pipe():
        return StableDiffusionPipeline.from_pretrained(sd1, safety_checker=None, requires_safety_checker=False)

    stacked = pipe()
    base = _outputs(stacked)
    for i, p in enumerate(ps):
        stacked.load_lora_weights(str(tmp_path), weight_name=p.name, adapter_name=f"e{i}")
    stacked.set_adapters([f"e{i}" for i in range(3)], adapter_weights=w)
    want = _outputs(stacked)
    assert (want[0] - base[0]).abs().max() > 1e-3 and (want[1] - base[1]).abs().max() > 1e-3  # the LoRAs act
    for name in ("linear", "svd"):
        merged = pipe()
        merged.load_lora_weights(str(tmp_path), weight_name=f"{name}.safetensors")
        got = _outputs(merged)
        # fp32 factors; stacking sums three LoRA branches, the merge one: equal up to fp32 summation order
        # (observed max |diff| ~1e-6 on outputs of size ~1); 2e-5 absolute.
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=2e-5)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=2e-5)


# --- ComfyUI's own loader on the mini SD1.5 checkpoint ---------------------------------------------------------

COMFY_MERGED_CHECK = r"""
import torch
import comfy.sd, comfy.utils
from safetensors.torch import load_file
model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(os.environ["CKPT"], output_vae=False, output_clip=True)
lora = comfy.utils.load_torch_file(os.environ["LORA"], safe_load=True)
want = load_file(os.environ["WANT"])  # ComfyUI key -> sum_i w_i dW_i (float64)
m2, c2 = comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
out = {"not_loaded": [m for m in messages if "not loaded" in m.lower()],
       "patched": len(m2.patches) + len(c2.patcher.patches), "errors": {}}
for key, delta in want.items():
    patcher = m2 if key.startswith("diffusion_model.") else c2.patcher
    base = patcher.model.state_dict()[key].double().clone()
    patcher.patch_weight_to_device(key)
    got = patcher.model.state_dict()[key]
    out["errors"][key] = [str(got.dtype), float((got.double() - base - delta).abs().max()), float(delta.abs().max()),
                          float(base.abs().max())]
    patcher.unpatch_model()
print(json.dumps(out))
"""


def test_comfyui_loads_the_merged_file_with_every_key_and_patches_the_weighted_sum(tmp_path):
    """Three experts (UNet attention + CLIP-L layers) merged linear and svd(full rank); ComfyUI 0.3.75 loads
    every key and its patched weights equal base + sum_i w_i dW_i within the weights' dtype rounding."""
    import os

    from harness.comfy import COMFY_PROLOGUE, comfyui_source_dir
    from merge_helpers import mini_experts
    from safetensors.torch import save_file

    from selma_backend.tiny_models import write_mini_sd15

    ckpt = write_mini_sd15(tmp_path / "mini-sd15.safetensors", seed=0)
    variants, targets = mini_experts(ckpt, tmp_path)
    w = [0.5, 0.3, 0.2]
    srcs = [_load(p) for p in variants]
    want = {targets[m]: weighted_sum(srcs, w, m).reshape(-1).contiguous() for m in targets}
    for name, config in (("linear", MergeConfig(method="linear", weights=w)),
                         ("svd", MergeConfig(method="svd", weights=w, rank=14))):
        out = tmp_path / f"merged-{name}.safetensors"
        merge_files(variants, out, config)
        shaped = {}
        with torch.no_grad():
            from safetensors import safe_open

            with safe_open(str(ckpt), framework="pt") as f:
                for key in targets.values():
                    src = "model." + key if key.startswith("diffusion_model.") else \
                        key.replace("clip_l.transformer.", "cond_stage_model.transformer.")
                    shaped[key] = want[key].reshape(f.get_slice(src).get_shape())
        save_file(shaped, str(tmp_path / "want.safetensors"))
        env = {**os.environ, **OFFLINE, "CKPT": str(ckpt), "LORA": str(out), "WANT": str(tmp_path / "want.safetensors"),
               "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.run([sys.executable, "-c", COMFY_PROLOGUE + COMFY_MERGED_CHECK], cwd=comfyui_source_dir(),
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        assert result["not_loaded"] == [], name
        assert result["patched"] == len(targets)
        for key, (dtype, err, size, base) in result["errors"].items():
            assert size > 1e-4, key
            # fp32 UNet weights: float32 rounding of the sum; fp16 CLIP-L weights: ComfyUI rounds the patched
            # weight to fp16 (stochastically): allow 2 ulp of the largest entry. Observed: UNet <= 3e-7, CLIP fp16
            # <= 6e-5 on weights of size ~0.1.
            eps = torch.finfo(getattr(torch, dtype.removeprefix("torch."))).eps
            assert err <= 2 * eps * (base + size) + 1e-6, (name, key, dtype, err)


# --- the fast SVD path of one module: factor space and dense, rank-deficient experts ----------------------------


@pytest.mark.parametrize(("ranks", "out", "inn"), [((3, 5, 4), 40, 30), ((16, 16, 8), 24, 32), ((8, 8, 8), 48, 20)])
@pytest.mark.parametrize("zero_b", [False, True])
def test_module_svd_is_optimal_in_both_paths(ranks, out, inn, zero_b):
    """Factor space (sum r < min(out, in)) and dense paths; an expert whose B is still zero (fresh LoRA, a
    singular Gram matrix) changes nothing. Error within 1e-5 of the dense float64 truncated SVD's."""
    from selma_backend.merge import merge_module

    g = torch.Generator().manual_seed(sum(ranks) + out)
    f = [(torch.randn(r, inn, generator=g, dtype=F64), torch.randn(out, r, generator=g, dtype=F64), 2.0 * r)
         for r in ranks]
    if zero_b:
        f[1] = (f[1][0], torch.zeros_like(f[1][1]), f[1][2])
    w = [0.7, -0.4, 1.1]
    t = sum(wi * 2.0 * (b @ a) for (a, b, _), wi in zip(f, w, strict=True))
    s = torch.linalg.svdvals(t)
    for rank in (1, 5, 12):
        res = merge_module(f, w, "svd", rank)
        optimum = float(s[rank:].square().sum().sqrt() / s.norm())
        got = _rel((res.alpha / res.rank) * (res.up @ res.down), t)
        assert abs(got - optimum) <= 1e-5 * max(optimum, 1e-12) + 1e-12, (rank, got, optimum)
        assert abs(res.error - got) <= 1e-6 * got + 1e-7  # the report measures what is stored (trace floor ~1e-8)
