"""The stage-2 configuration: one frozen dataclass shared by the CLI, the node and the tests."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import invalid
from .schedulers import SCHEDULERS

#: Fields that do not change any image: a resumed run may use other values for these.
NOT_IMAGE_SETTINGS = ("batch_size", "images_per_prompt")


@dataclass(frozen=True)
class RenderConfig:
    """How stage 2 renders prompts into a dataset; recorded in ``dataset.json``.

    Each image's seed depends only on (``seed``, prompt id, sample index), so ``batch_size`` and the
    way work is split (resume, shards) never change which image a (prompt, sample) pair gets.
    """

    images_per_prompt: int = 1  # k samples per prompt (S3 keeps the best of them)
    batch_size: int = 4  # images per pipeline call, prompts mixed; halved on out-of-memory
    steps: int = 25
    cfg: float = 7.5  # classifier-free guidance scale; 1.0 turns guidance off
    width: int = 0  # pixels, a multiple of 8; 0: the model's default (512 SD1, 768 SD2, 1024 SDXL)
    height: int = 0
    scheduler: str = "dpmpp_2m_karras"  # a name in SCHEDULERS
    negative: str = ""  # negative prompt, the same for every image
    seed: int = 0  # run seed

    def __post_init__(self) -> None:
        _int("images_per_prompt", self.images_per_prompt, 1, 10_000)
        _int("batch_size", self.batch_size, 1, 4096)
        _int("steps", self.steps, 1, 1000)
        _int("seed", self.seed, 0, 2**63 - 1)
        for name in ("width", "height"):
            value = getattr(self, name)
            _int(name, value, 0, 16384)
            if value and (value < 64 or value % 8):
                raise invalid(name, value, "0 (the model's default) or a multiple of 8 from 64 to 16384")
        if isinstance(self.cfg, bool) or not isinstance(self.cfg, (int, float)) or not 0 <= self.cfg <= 100:
            raise invalid("cfg", self.cfg, "a number from 0 to 100", "7.5 is typical; 1.0 disables guidance")
        object.__setattr__(self, "cfg", float(self.cfg))
        SCHEDULERS.get(self.scheduler)  # raises naming the registered schedulers
        if not isinstance(self.negative, str):
            raise invalid("negative", self.negative, "a string (empty for none)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RenderConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise invalid("render config", unknown, sorted(known), "remove the unknown keys")
        return cls(**d)


def _int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise invalid(name, value, f"an integer from {lo} to {hi}")
