"""Benchmark: SELMA's LoRA merge against PEFT's and kohya's SVD merges, side by side in one run.

Workload: 5 experts x rank 128 (alpha = rank) on SELMA's LoRA targets in SD 1.5 -- ``to_q``, ``to_k``,
``to_v``, ``to_out.0`` of every ``attn1``/``attn2`` of the SD 1.5 UNet (128 layers; shapes derived from SD 1.5's
UNet config by ``selma_backend.lora.attention_shapes``: widths 320/640/1280, text context 768). Random
float32 factors, ``A ~ N(0, 1/in)``, ``B ~ N(0, 0.01^2)``; weights 1/5 each (SELMA's merge). Target rank 128.

Compared, each producing rank-128 factors of ``T = sum_i w_i dW_i`` per layer:

* ours -- ``merge_experts`` with ``MergeConfig(method="svd", rank=128)``: the whole in-memory file merge
  (checks, every layer, the per-layer and overall error report), not reading/writing files;
* PEFT -- a real ``PeftModel`` on a stand-in module with the same 128 ``nn.Linear`` shapes, 5 adapters holding
  the same factors, timed ``add_weighted_adapter(..., combination_type="svd", svd_rank=128)`` (PEFT 0.21: per
  layer ``get_delta_weight`` of each adapter, weighted sum, ``torch.linalg.svd(full_matrices=True)`` in float32);
* kohya-style -- per layer the dense float32 delta, ``torch.linalg.svd`` (``full_matrices=True``, as
  sd-scripts' ``svd_merge_lora.py``), truncated to 128; sd-scripts' optional quantile clamp is left out.

"Equal error": each method's overall relative error ``||S - T||_F / ||T||_F`` (float64, all layers) is printed;
all three reach the Eckart-Young optimum. Also timed: ``linear`` (exact) for the same set, in memory and
the write of its file; and ``linear`` with unequal weights (the general path).

    .venv/bin/python bench/bench_merge.py          # all 128 layers
    .venv/bin/python bench/bench_merge.py --quick  # one transformer block per width (24 layers)
    .venv/bin/python bench/bench_merge.py --tiny --repeats 3  # 4 layers, medians of 3 (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selma_backend.lora import BASE_UNET_CONFIGS, attention_shapes  # noqa: E402
from selma_backend.lora.layouts import LoraFile  # noqa: E402
from selma_backend.merge import Expert, MergeConfig, merge_experts  # noqa: E402
from selma_backend.merge.files import serialize  # noqa: E402

N_EXPERTS, RANK = 5, 128
F64 = torch.float64


def workload(size: str, seed: int = 0) -> tuple[dict[str, tuple[int, int]], list[dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """(module -> (out, in), per expert: module -> (A (r, in), B (out, r))), float32, deterministic.

    ``size``: "full" (all 128 layers), "quick" (one transformer block per width: 24), "tiny" (4 layers)."""
    shapes = attention_shapes(BASE_UNET_CONFIGS["sd_v1"])
    keep = {"quick": ("down_blocks.0.attentions.0.", "down_blocks.2.attentions.0.", "up_blocks.2.attentions.0."),
            "tiny": ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.",)}.get(size)
    if keep:
        shapes = {m: s for m, s in shapes.items() if m.startswith(keep)}
    g = torch.Generator().manual_seed(seed)
    experts = []
    for _ in range(N_EXPERTS):
        experts.append({m: (torch.randn(RANK, n_in, generator=g) / n_in**0.5, torch.randn(n_out, RANK, generator=g) * 0.01)
                        for m, (n_out, n_in) in shapes.items()})
    return shapes, experts


def _kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def _experts(factors: list[dict]) -> list[Expert]:
    out = []
    for i, f in enumerate(factors):
        t = {}
        for m, (a, b) in f.items():
            k = _kohya_name(m)
            t[k + ".lora_down.weight"], t[k + ".lora_up.weight"] = a, b
            t[k + ".alpha"] = torch.tensor(float(RANK))
        out.append(Expert(LoraFile(Path(f"expert{i}.safetensors"), "kohya", t, {}, "sd_v1"), "-" * 64))
    return out


def _overall_error(products: dict[str, tuple[torch.Tensor, torch.Tensor]], factors: list[dict],
                   weights: list[float]) -> float:
    """sqrt(sum ||B A - T||^2 / sum ||T||^2) over all layers, float64."""
    num = den = 0.0
    for m, (b, a) in products.items():
        t = sum(w * (f[m][1].to(F64) @ f[m][0].to(F64)) for f, w in zip(factors, weights, strict=True))
        num += float((b.to(F64) @ a.to(F64) - t).square().sum())
        den += float(t.square().sum())
    return (num / den) ** 0.5


def run_ours(factors: list[dict], method: str = "svd", weights: list[float] | None = None):
    experts = _experts(factors)
    config = MergeConfig(method=method, rank=RANK if method != "linear" else None,
                         weights=None if weights is None else tuple(weights))
    t0 = time.perf_counter()
    tensors, report = merge_experts(experts, config)
    return tensors, report, time.perf_counter() - t0


def peft_model(shapes: dict[str, tuple[int, int]], factors: list[dict]):
    """A real ``PeftModel`` on a stand-in module with the same ``nn.Linear`` shapes, 5 adapters holding the
    experts' factors. Returns (model, {module: its LoRA layer})."""
    from peft import LoraConfig, get_peft_model

    names = {m: f"l{i}" for i, m in enumerate(shapes)}
    stand_in = torch.nn.Module()
    stand_in.layers = torch.nn.ModuleDict({names[m]: torch.nn.Linear(n_in, n_out, bias=False)
                                           for m, (n_out, n_in) in shapes.items()})
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(names.values()), init_lora_weights=False)
    model = get_peft_model(stand_in, config, adapter_name="e0")
    for i in range(1, N_EXPERTS):
        model.add_adapter(f"e{i}", config)
    layers = dict(model.base_model.model.layers.items())
    with torch.no_grad():
        for i, f in enumerate(factors):
            for m, (a, b) in f.items():
                layers[names[m]].lora_A[f"e{i}"].weight.copy_(a)
                layers[names[m]].lora_B[f"e{i}"].weight.copy_(b)
    return model, {m: layers[names[m]] for m in shapes}


def run_peft(model, layers: dict, weights: list[float], name: str = "merged"):
    """Time ``add_weighted_adapter(combination_type="svd")``; return ({module: (B * scale, A)}, seconds)."""
    t0 = time.perf_counter()
    model.add_weighted_adapter([f"e{i}" for i in range(N_EXPERTS)], weights, name, combination_type="svd",
                               svd_rank=RANK)
    elapsed = time.perf_counter() - t0
    scale = model.peft_config[name].lora_alpha / model.peft_config[name].r
    products = {m: (layer.lora_B[name].weight.detach() * scale, layer.lora_A[name].weight.detach())
                for m, layer in layers.items()}
    model.delete_adapter(name)
    return products, elapsed


def run_kohya(factors: list[dict], weights: list[float]):
    t0 = time.perf_counter()
    products = {}
    for m in factors[0]:
        mat = sum(w * (f[m][1] @ f[m][0]) for f, w in zip(factors, weights, strict=True))  # alpha/r = 1
        u, s, vh = torch.linalg.svd(mat)
        products[m] = (u[:, :RANK] @ torch.diag(s[:RANK]), vh[:RANK])
    return products, time.perf_counter() - t0


def _ours_products(tensors: dict[str, torch.Tensor], shapes) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for m in shapes:
        k = _kohya_name(m)
        down, up = tensors[k + ".lora_down.weight"], tensors[k + ".lora_up.weight"]
        out[m] = (up * (float(tensors[k + ".alpha"]) / down.shape[0]), down)
    return out


def run(quick: bool = False, repeats: int | None = None, tiny: bool = False) -> dict:
    """Measure and print the table; return figures for bench/run.py (throughput in layers/s).

    ``repeats``: alternate PEFT (the reference) and ours that many times and report the medians (default one
    of each); kohya-style and linear run once. ``tiny``: 4 layers (tests)."""
    size = "tiny" if tiny else "quick" if quick else "full"
    shapes, factors = workload(size)
    w = [1.0 / N_EXPERTS] * N_EXPERTS
    n = len(shapes)
    model, layers = peft_model(shapes, factors)
    t_refs, t_ourss = [], []
    for r in range(repeats or 1):
        peft_products, t_peft = run_peft(model, layers, w, f"merged{r}")
        tensors, report, t_ours = run_ours(factors)
        t_refs.append(t_peft)
        t_ourss.append(t_ours)
    t_peft, t_ours = statistics.median(t_refs), statistics.median(t_ourss)
    err_ours = _overall_error(_ours_products(tensors, shapes), factors, w)
    err_peft = _overall_error(peft_products, factors, w)
    kohya_products, t_kohya = run_kohya(factors, w)
    err_kohya = _overall_error(kohya_products, factors, w)
    lin_tensors, lin_report, t_lin = run_ours(factors, "linear")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        data = serialize(lin_tensors, lin_report)
        (Path(d) / "linear.safetensors").write_bytes(data)
        t_write = time.perf_counter() - t0
    _, lin_uneq, t_lin_uneq = run_ours(factors, "linear", [0.3, 0.1, 0.2, 0.25, 0.15])
    print(f"5 experts x rank {RANK} on SD 1.5 attention ({n} layers), target rank {RANK}; {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
          + (f"; median of {repeats}" if repeats else ""))
    print(f"{'method':<34} {'seconds':>9} {'vs ours':>8} {'rel. error':>12}")
    for name, t, e in (("ours svd (merge_experts)", t_ours, err_ours),
                       ("PEFT add_weighted_adapter svd", t_peft, err_peft),
                       ("kohya-style dense SVD", t_kohya, err_kohya),
                       ("ours linear (exact)", t_lin, lin_report.error),
                       ("ours linear, unequal weights", t_lin_uneq, lin_uneq.error)):
        print(f"{name:<34} {t:>9.3f} {t / t_ours:>7.2f}x {e:>12.6e}")
    print(f"ours svd reported error {report.error:.6e} (measured above {err_ours:.6e}); "
          f"linear file: {len(data) / 2**20:.0f} MiB written in {t_write:.2f} s")
    return {
        "ours": n / t_ours,
        "reference": n / t_peft,
        "unit": "layers/s",
        "ratio": t_peft / t_ours,
        "same_output": abs(err_ours - err_peft) <= 1e-5 * err_peft,
        "n": n,
        "repeats": repeats or 1,
        "ours_s": t_ourss,
        "reference_s": t_refs,
        "kohya_s": t_kohya,
        "kohya_ratio": t_kohya / t_ours,
        "errors": {"ours": err_ours, "peft": err_peft, "kohya": err_kohya, "ours_reported": report.error},
        "linear_s": t_lin,
        "linear_unequal_weights_s": t_lin_uneq,
        "linear_error": lin_report.error,
        "linear_write_s": t_write,
        "linear_file_mib": len(data) / 2**20,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int)
    a = parser.parse_args()
    result = run(a.quick, a.repeats, a.tiny)
    print(json.dumps(result))
