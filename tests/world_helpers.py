"""World fixtures for the live-server tests: LoRA experts of the world model and their merge, trained for real.

The bundled SELMA workflows run on the shipped world-sd (stage 5 merges world experts, stage 6 evaluates
them); these files stand where a user's earlier stage-4/5 runs would have put them, in the same
LoRA layout a trained world expert has (one optimizer step on exact world images, seconds).
"""

from __future__ import annotations

from pathlib import Path

WORLD_SKILL_PAIR = ("world_counting", "world_spatial")
#: ``models/loras/`` names of the world fixtures: what stage 4 writes (name "experts") and stage 5 (name "world-merged").
WORLD_LORA_INSTALL = {"world_counting": "selma/experts/world_counting.safetensors",
                      "world_spatial": "selma/experts/world_spatial.safetensors",
                      "merged": "selma/world-merged.safetensors"}


def write_world_loras(world_sd: Path, out: Path) -> dict[str, Path]:
    """Two one-step world experts (rank 4) on ``world_sd`` and their linear merge; ``{key of WORLD_LORA_INSTALL: path}``."""
    from selma_backend.merge import MergeConfig, merge_files
    from selma_backend.models.config import ModelConfig
    from selma_backend.train import TrainConfig, train_experts
    from selma_backend.world.dataset import render_world_dataset
    from selma_backend.world.skills import world_prompts

    datasets = []
    for skill in WORLD_SKILL_PAIR:
        render_world_dataset(world_prompts(skill, 2, seed=0), out / "data" / skill)
        datasets.append(out / "data" / skill)
    config = TrainConfig(rank=4, alpha=4, steps=1, batch_size=2, grad_accum=1, resolution=64, checkpoint_every=1, seed=0)
    results = train_experts(ModelConfig(path=str(world_sd)), datasets, out / "experts", config,
                            names=list(WORLD_SKILL_PAIR), work_root=out / "work", cache_root=out / "cache")
    paths = {r.name: Path(r.path) for r in results}
    merge_files([paths[s] for s in WORLD_SKILL_PAIR], out / "merged.safetensors", MergeConfig(method="linear"))
    return paths | {"merged": out / "merged.safetensors"}
