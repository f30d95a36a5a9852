"""A tiny open_clip model as a local folder in the layout model hubs publish.

``open_clip_config.json`` (``{"model_cfg": ..., "preprocess_cfg": ...}``) beside
``open_clip_model.safetensors``: what ``open_clip.create_model_from_pretrained("local-dir:" + path)``
and ``open_clip.get_tokenizer("local-dir:" + path)`` read. ``text_cfg`` names no HF tokenizer, so
open_clip uses the BPE tokenizer bundled in its wheel (49408 ids, context 77): no download.
The model is open_clip's own ``CLIP`` class built from that config dict.
"""

from __future__ import annotations

from pathlib import Path

from ..fsio import atomic_write_json
from .common import publish_dir, seeded

PACKAGES = ("open_clip_torch",)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
IMAGE_SIZE = 32
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
}
# OpenAI CLIP's normalisation, as the ViT-B/L configs on the hubs.
PREPROCESS_CFG = {
    "size": IMAGE_SIZE,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def write_clip(path: str | Path, seed: int = 0, *, force: bool = False) -> Path:
    """Write the tiny open_clip folder at ``path``; load it with ``open_clip`` and ``"local-dir:" + path``."""
    return publish_dir(Path(path), "clip", seed, PACKAGES, lambda tmp: _build(tmp, seed), force=force)


def _build(out: Path, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    atomic_write_json(out / CONFIG_FILE, {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG})
    with seeded(seed):
        model = open_clip.CLIP(**MODEL_CFG)  # what create_model("local-dir:...") builds from that config
    # contiguous(): safetensors refuses views; the state dict holds only parameters and persistent buffers.
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
