"""A small CLIP trained contrastively on the world, saved as an open_clip folder ``load_scorer`` reads.

The model is open_clip's own ``CLIP`` class built from a config dict (:data:`MODEL_PRESETS`): a ViT on
64 px images (8 px patches) and a text transformer over open_clip's bundled BPE tokenizer (49408
ids, no download) with a 32-token context. Every step renders a fresh batch of world scenes from
the TRAIN split of all world skills mixed (counts, relations, colours, rare combinations), each with
one caption and ``hard_negatives`` minimal-pair captions: the same words with one fact changed
(:mod:`.alter`), checked false on the scene. The loss is CLIP's symmetric InfoNCE (Radford et al.,
2021): image -> text over every caption of the batch (true ones and hard negatives), text -> image
over the images; pairs that happen to be true (another image's caption that also fits) are masked.
AdamW, linear warm-up then cosine decay, gradient clipping at 1, ``torch.set_num_threads(threads)``.
A run is a function of its config: the same seed gives the same weights (on one torch version).

The folder: ``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``), ``open_clip_model.safetensors``
(fp16: a few MB; open_clip casts to the precision asked for when loading) and ``world_clip.json`` (the
training record: config, loss curve, time).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SelmaError, check_int, check_number, invalid
from ..fsio import atomic_write_bytes, atomic_write_json
from .alter import ALTERATIONS, EVAL_ALTERATIONS, alterations, false_on, holds, minimal_pair
from .folders import check_target, publish_folder
from .measure import ground_truth
from .scene import Scene, render_scene, sample_scene
from .skills import WORLD_SKILLS, split_of
from .spec import PromptSpec

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
RECORD_FILE = "world_clip.json"
MADE_BY = "selma world train-clip"
VOCAB = 49408  # open_clip's bundled BPE tokenizer
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation, as the hubs' configs
STD = (0.26862954, 0.26130258, 0.27577711)


def _model_cfg(image: int, patch: int, vw: int, vl: int, tw: int, tl: int, embed: int) -> dict[str, Any]:
    return {"embed_dim": embed,
            "vision_cfg": {"image_size": image, "patch_size": patch, "layers": vl, "width": vw,
                           "head_width": min(32, vw // 2), "mlp_ratio": 2.0},
            "text_cfg": {"context_length": 32, "vocab_size": VOCAB, "width": tw, "heads": max(2, tw // 16),
                         "layers": tl, "mlp_ratio": 2.0}}


#: ``small``: the shipped model (~3.9 M parameters, 7.7 MB in fp16, most of it the token table);
#: ``tiny``: for tests (seconds per run).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "small": _model_cfg(64, 8, 128, 4, 64, 4, 64),
    "tiny": _model_cfg(32, 8, 32, 1, 32, 1, 32),
}


def preprocess_cfg(image_size: int) -> dict[str, Any]:
    return {"size": image_size, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
            "resize_mode": "shortest"}


@dataclass(frozen=True)
class ClipTrainConfig:
    """How one world-CLIP run trains. ``hard_negatives``: minimal-pair captions per image."""

    steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    threads: int = 1
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.1
    hard_negatives: int = 3
    preset: str = "small"
    log_every: int = 25
    #: a world CLIP folder to start from (a second stage); "" starts from the seed's random weights
    init_from: str = ""
    #: share of examples drawn from world_spatial, their relation altered first (0: skills drawn evenly)
    relation_share: float = 0.0

    def __post_init__(self) -> None:
        check_int("steps", self.steps, 1, 10_000_000)
        check_int("batch_size", self.batch_size, 2, 4096)
        check_int("seed", self.seed, 0, 2**63 - 1)
        check_int("threads", self.threads, 1, 1024)
        check_number("lr", self.lr, 1e-7, 1.0)
        check_int("warmup", self.warmup, 0, 10_000_000)
        check_number("weight_decay", self.weight_decay, 0.0, 10.0)
        check_int("hard_negatives", self.hard_negatives, 0, 8)
        check_int("log_every", self.log_every, 1, 10_000_000)
        check_number("relation_share", self.relation_share, 0.0, 1.0)
        if self.init_from and not (Path(self.init_from) / WEIGHTS_FILE).is_file():
            raise invalid("init_from", self.init_from, f"a world CLIP folder with {WEIGHTS_FILE}")
        if self.preset not in MODEL_PRESETS:
            raise invalid("preset", self.preset, list(MODEL_PRESETS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- data -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    spec: PromptSpec
    scene: Scene
    caption: str
    negatives: tuple[tuple[PromptSpec, str], ...]  # (altered spec, its caption)


def sample_train_spec(rng: random.Random, relation_share: float = 0.0) -> PromptSpec:
    """A spec of a random world skill from the TRAIN split (held-out meanings are never seen)."""
    spatial = relation_share > 0 and rng.random() < relation_share
    skill = WORLD_SKILLS.get("world_spatial" if spatial else rng.choice(WORLD_SKILLS.names()))
    while True:
        spec = skill.sample(rng)
        if split_of(spec) == "train":
            return spec


def hard_negatives(spec: PromptSpec, scene: Scene, k: int, rng: random.Random,
                   first: str | None = None) -> list[PromptSpec]:
    """Up to ``k`` altered specs of different kinds, each false on ``scene``; evaluated kinds come first more
    often, ``first`` always first."""
    order = sorted(ALTERATIONS, key=lambda kind: rng.random() * (1.0 if kind in EVAL_ALTERATIONS else 2.5))
    if first is not None:
        order = [first, *(kind for kind in order if kind != first)]
    out: list[PromptSpec] = []
    for kind in order:
        if len(out) == k:
            break
        cands = alterations(spec, kind)
        rng.shuffle(cands)
        for cand in cands[:6]:
            if false_on([cand], scene):
                out.append(cand)
                break
    return out


def sample_example(rng: random.Random, k: int, relation_share: float = 0.0) -> Example:
    while True:
        spec = sample_train_spec(rng, relation_share)
        try:
            scene = sample_scene(spec, rng)
            break
        except SelmaError:  # the sampler found no room for this spec (rare): draw another
            continue
    first = "relation" if relation_share > 0 and spec.relation is not None else None
    negs = hard_negatives(spec, scene, k, rng, first)
    text, neg_texts = minimal_pair(spec, negs, rng.getrandbits(32))
    return Example(spec, scene, text, tuple(zip(negs, neg_texts, strict=True)))


def image_tensor(images: list[Any]) -> Any:
    """PIL images (already at the model's size) -> normalised (B, 3, H, W) float32, as open_clip's preprocess."""
    import torch

    x = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    x = (x - np.array(MEAN, dtype=np.float32)) / np.array(STD, dtype=np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()




def batch_mask(examples: list[Example], specs: list[PromptSpec]) -> Any:
    """(B, T) bool: True where caption t is true of image b but is not b's own caption (a false negative)."""
    import torch

    mask = torch.zeros(len(examples), len(specs), dtype=torch.bool)
    for b, ex in enumerate(examples):
        shapes = {o.shape for o in ex.scene.objects}
        truth = ground_truth(ex.scene)
        for t, spec in enumerate(specs):
            if t != b and all(e.shape in shapes for e in spec.entities) and holds(spec, truth):
                mask[b, t] = True
    return mask


# --- training -------------------------------------------------------------------------------------------


def build_model(model_cfg: dict[str, Any], seed: int) -> Any:
    """open_clip's ``CLIP`` from ``model_cfg``, initialised from ``seed`` (the caller's RNG state is kept)."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.CLIP(**model_cfg)


def clip_loss(model: Any, images: Any, tokens: Any, mask: Any) -> Any:
    """Symmetric InfoNCE. images (B, 3, H, W); tokens (T, L), the first B the images' own captions; mask (B, T)."""
    import torch
    import torch.nn.functional as F

    b = images.shape[0]
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokens, normalize=True)
    logits = model.logit_scale.exp() * img @ txt.T  # (B, T)
    logits = logits.masked_fill(mask, float("-inf"))
    target = torch.arange(b)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].T, target)) / 2


def _optimizer(model: Any, config: ClipTrainConfig) -> Any:
    import torch

    decay, rest = [], []
    for name, p in model.named_parameters():
        flat = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith("bias")
        (rest if flat else decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98), eps=1e-6)


def lr_factor(step: int, config: ClipTrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to zero at ``steps``."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * (step - config.warmup) / span))


def train_clip(config: ClipTrainConfig, out: str | os.PathLike[str], *, force: bool = False,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a world CLIP and write its open_clip folder at ``out``; return the training record."""
    import torch

    out = Path(out)
    _check_target(out, force)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train(config, out, force, log or (lambda _m: None))
    finally:
        torch.set_num_threads(threads)


def _train(config: ClipTrainConfig, out: Path, force: bool, say: Callable[[str], None]) -> dict[str, Any]:
    import torch
    from open_clip.tokenizer import SimpleTokenizer

    model_cfg = MODEL_PRESETS[config.preset]
    model = build_model(model_cfg, config.seed)
    if config.init_from:
        _load_weights(model, model_cfg, Path(config.init_from))
    model.train()
    tokenizer = SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    resolution = model_cfg["vision_cfg"]["image_size"]
    opt = _optimizer(model, config)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config))
    rng = random.Random(f"selma-world-clip:{config.seed}")
    curve: list[dict[str, float]] = []
    window: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        examples = [sample_example(rng, config.hard_negatives, config.relation_share) for _ in range(config.batch_size)]
        specs = [ex.spec for ex in examples] + [s for ex in examples for s, _ in ex.negatives]
        texts = [ex.caption for ex in examples] + [t for ex in examples for _, t in ex.negatives]
        images = image_tensor([render_scene(ex.scene, resolution) for ex in examples])
        loss = clip_loss(model, images, tokenizer(texts), batch_mask(examples, specs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        window.append(loss.item())
        if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
            elapsed = time.perf_counter() - start
            curve.append({"step": step + 1, "loss": sum(window) / len(window), "seconds": round(elapsed, 2)})
            say(f"step {step + 1}/{config.steps}  loss {curve[-1]['loss']:.4f}  {(step + 1) / elapsed:.3f} steps/s")
            window = []
    seconds = time.perf_counter() - start
    record = {"made_by": MADE_BY, "config": config.to_dict(), "model_cfg": model_cfg, "seconds": round(seconds, 1),
              "steps_per_second": round(config.steps / seconds, 4), "final_loss": curve[-1]["loss"], "curve": curve,
              "versions": _versions()}
    save_clip_folder(model, model_cfg, out, record, force=force)
    return record


def _load_weights(model: Any, model_cfg: dict[str, Any], folder: Path) -> None:
    from safetensors.torch import load_file

    cfg = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))["model_cfg"]
    if cfg != json.loads(json.dumps(model_cfg)):
        raise SelmaError(f"{folder}: its model config differs from this preset's; start from a folder of the same preset")
    model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_FILE)).items()}, strict=True)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "open_clip_torch")}


# --- the folder -----------------------------------------------------------------------------------------


def _check_target(out: Path, force: bool) -> None:
    check_target(out, force, RECORD_FILE, MADE_BY, "world CLIP")


def save_clip_folder(model: Any, model_cfg: dict[str, Any], out: Path, record: dict[str, Any], *,
                     force: bool = False) -> Path:
    """Write the open_clip folder (config, fp16 weights, record) beside ``out`` and rename it into place."""
    from safetensors.torch import save

    _check_target(out, force)

    def fill(tmp: Path) -> None:
        atomic_write_json(tmp / CONFIG_FILE, {"model_cfg": model_cfg,
                                              "preprocess_cfg": preprocess_cfg(model_cfg["vision_cfg"]["image_size"])})
        tensors = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(tmp / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
        atomic_write_json(tmp / RECORD_FILE, record)

    publish_folder(out, fill)
    return out
