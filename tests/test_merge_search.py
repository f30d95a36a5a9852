"""S5 data-driven weights: the candidate set, the search mechanics (the reported best is the max of the
table, every candidate rendered with the same seeds) and a real run on the tiny SD1 pipeline with the tiny
CLIP scorer (random models: the scores mean nothing, the plumbing is what is tested), CLI included."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from merge_helpers import write_expert

from selma_backend.errors import SelmaError
from selma_backend.lora import load_lora, provenance
from selma_backend.merge import MergeConfig, load_experts
from selma_backend.merge.search import SearchConfig, parse_heldout, search_weights, simplex_candidates

MODULE = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_candidates_start_uniform_and_stay_on_the_simplex():
    c = simplex_candidates(3, 4, 8, seed=1)
    assert c[0] == (1 / 3, 1 / 3, 1 / 3) and len(c) == 8 and len(set(c)) == 8
    for w in c[1:]:
        assert abs(sum(w) - 1) < 1e-12 and min(w) >= 0 and all(abs(x * 4 - round(x * 4)) < 1e-12 for x in w)
    # nearest grid points to uniform come first: (2,1,1)/4 and its permutations
    assert sorted(c[1:4]) == [(0.25, 0.25, 0.5), (0.25, 0.5, 0.25), (0.5, 0.25, 0.25)]
    assert len(simplex_candidates(2, 2, 100)) == 3  # 1/2,1/2 is on the grid: (0,1), (1,0) and uniform
    assert simplex_candidates(4, 2, 1) == [(0.25,) * 4]


def test_search_reports_the_max_of_its_table(tmp_path):
    paths = [write_expert(tmp_path / f"e{i}.safetensors", 2, 2.0, i) for i in range(3)]
    experts = load_experts(paths)
    calls = []

    def render(tensors, prompts, seeds):  # an "image" is the merged module's first entry, one per prompt
        calls.append(list(seeds))
        d = tensors[MODULE + ".lora_up.weight"].double() @ tensors[MODULE + ".lora_down.weight"].double()
        return [float(d[0, 0]) * (j + 1) for j in range(len(prompts))]

    def score(images, prompts):
        return [-abs(x - 0.05) for x in images]

    heldout = {"counting": ["one cat", "two dogs", "three birds"], "spatial": ["a cup left of a plate"]}
    result = search_weights(experts, MergeConfig(method="linear"), SearchConfig(budget=7, grid=3, max_prompts=2),
                            heldout, render=render, score=score)
    assert len(result.candidates) == len(result.scores) == len(result.per_skill) == 7
    assert result.scores[result.best_index] == max(result.scores) and result.best == result.candidates[result.best_index]
    for row, total in zip(result.per_skill, result.scores, strict=True):
        assert total == pytest.approx((row["counting"] + row["spatial"]) / 2)
    assert calls == [[0, 1], [0]] * 7  # paired: every candidate sees the same prompts and seeds (max 2 per skill)
    assert len(set(result.scores)) > 1
    table = result.text()
    assert "<- best" in table.splitlines()[2 + result.best_index] and table.count("<- best") == 1
    assert json.loads(json.dumps(result.to_dict()))["best_score"] == max(result.scores)
    with pytest.raises(SelmaError, match="heldout: got"):
        search_weights(experts, MergeConfig(), SearchConfig(), {"x": []}, render=render, score=score)


def test_search_on_the_tiny_pipeline_and_cli(tiny_models, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    from selma_backend.filter import ScorerConfig, load_scorer
    from selma_backend.merge.search import clip_score, diffusers_renderer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    paths = [write_expert(tmp_path / f"e{i}.safetensors", 2, 2.0, 30 + i) for i in range(2)]
    (tmp_path / "count.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("two cats", "a dog")))
    (tmp_path / "space.txt").write_text("a cup left of a plate\n")
    heldout = parse_heldout(f"counting={tmp_path / 'count.jsonl'},spatial={tmp_path / 'space.txt'}")
    assert heldout == {"counting": ["two cats", "a dog"], "spatial": ["a cup left of a plate"]}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["sd1"], safety_checker=None,
                                                   requires_safety_checker=False)
    with load_scorer(ScorerConfig(path=str(tiny_models["clip"]))) as scorer:
        result = search_weights(load_experts(paths), MergeConfig(method="svd", rank=2), SearchConfig(budget=3, grid=2),
                                heldout, render=diffusers_renderer(pipe, steps=2), score=clip_score(scorer))
    assert result.candidates[0] == (0.5, 0.5) and sorted(result.candidates[1:]) == [(0.0, 1.0), (1.0, 0.0)]
    assert all(-1 <= s <= 1 for s in result.scores) and result.scores[result.best_index] == max(result.scores)
    assert len(set(result.scores)) > 1  # the LoRA changes the renders
    assert not pipe.get_list_adapters()  # the temporary adapter is gone
    out = tmp_path / "best.safetensors"
    run = subprocess.run([sys.executable, "-m", "selma_backend", "merge", *map(str, paths), "--method", "svd",
                          "--rank", "2", "--search-weights", "--model", str(tiny_models["sd1"]), "--heldout",
                          f"counting={tmp_path / 'count.jsonl'}", "--clip", str(tiny_models["clip"]), "--budget", "3",
                          "--grid", "2", "--steps", "2", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "weight search: 3 candidates" in run.stderr and "<- best" in run.stderr
    best_line = next(ln for ln in run.stderr.splitlines() if ln.endswith("<- best"))
    weights = [float(x) for x in best_line.split("|")[0].split()]
    assert provenance(load_lora(out)[1])["weights"] == pytest.approx(weights)
    assert torch.is_tensor(load_lora(out)[0][MODULE + ".lora_up.weight"])
