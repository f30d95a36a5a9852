"""``selma tiny-models``: tiny random-weight models for tests and offline demos, in seconds.

Everything is built in-process from configs (no download, works with ``HF_HUB_OFFLINE=1`` and an
empty HF cache) and is a function of the seed: the same seed gives byte-identical safetensors
(on the same torch version). Models, under ``--out``:

- ``sd1/``: diffusers SD 1.x pipeline folder (``StableDiffusionPipeline``), ~13 MB;
- ``sdxl/``: diffusers SDXL pipeline folder (``StableDiffusionXLPipeline``), ~24 MB;
- ``mini-sd15.safetensors``: single-file SD 1.5 checkpoint, LDM keys, that ComfyUI detects as SD15
  (mini UNet, full-size CLIP-L text encoder and VAE, fp16), ~465 MB;
- ``clip/``: open_clip folder (``open_clip_config.json`` + ``open_clip_model.safetensors``), ~7 MB;
- ``llm/``: transformers causal LM with a byte-level BPE tokenizer and a ChatML chat template, <1 MB.

A model that already exists is skipped when it was made by this command with the same seed; any
other existing path is an error (nothing is overwritten silently). ``--force`` rewrites models
this command made, whatever their seed; it never replaces anything else.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import SelmaError, invalid
from .registry import Registry
from .tiny.common import read_provenance
from .tiny.diffusion import write_sd1, write_sdxl
from .tiny.ldm import write_mini_sd15
from .tiny.llm import write_llm
from .tiny.loras import write_tiny_loras
from .tiny.openclip import write_clip

__all__ = ["TINY_MODELS", "write_tiny_models", "write_sd1", "write_sdxl", "write_mini_sd15", "write_clip", "write_llm",
           "write_tiny_loras"]

Writer = Callable[..., Path]  # writer(path, seed, *, force) -> path


@dataclass(frozen=True)
class TinyModel:
    filename: str  # relative to the output folder
    write: Writer
    what: str


TINY_MODELS: Registry[TinyModel] = Registry("tiny model")
TINY_MODELS.add("sd1", TinyModel("sd1", write_sd1, "diffusers SD 1.x pipeline folder"))
TINY_MODELS.add("sdxl", TinyModel("sdxl", write_sdxl, "diffusers SDXL pipeline folder"))
TINY_MODELS.add("mini-sd15", TinyModel("mini-sd15.safetensors", write_mini_sd15, "single-file SD 1.5 checkpoint (LDM keys)"))
TINY_MODELS.add("clip", TinyModel("clip", write_clip, "open_clip local folder"))
TINY_MODELS.add("llm", TinyModel("llm", write_llm, "transformers chat LM folder"))


def write_tiny_models(
    out_dir: str | Path,
    seed: int = 0,
    only: Iterable[str] | None = None,
    *,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Write the tiny models (all, or the names in ``only``) under ``out_dir``; return name -> path.

    Existing models made by this function from the same seed are skipped (``log`` says so); other
    existing paths raise :class:`SelmaError` unless ``force`` and made by this function.
    """
    names = _selected(only)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise invalid("seed", seed, "an integer in [0, 2**63)")
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    written: dict[str, Path] = {}
    for name in names:
        model = TINY_MODELS.get(name)
        path = out_dir / model.filename
        if not force and _present(name, path, seed):
            say(f"{name}: {path} exists (seed {seed}); skipped. Pass --force to rewrite it.")
        else:
            start = time.perf_counter()
            model.write(path, seed, force=force)
            say(f"{name}: wrote {path} ({_megabytes(path):.1f} MB, {time.perf_counter() - start:.1f} s)")
        written[name] = path
    return written


def _selected(only: Iterable[str] | None) -> list[str]:
    """Validate ``only`` against the registry; keep registry order, drop duplicates."""
    if only is None:
        return TINY_MODELS.names()
    wanted = list(only) if not isinstance(only, str) else [only]
    for name in wanted:
        TINY_MODELS.get(name)  # raises the standard error naming the allowed models
    if not wanted:
        raise invalid("only", wanted, TINY_MODELS.names(), "Give at least one name, or omit it for all")
    return [n for n in TINY_MODELS.names() if n in wanted]


def _present(name: str, path: Path, seed: int) -> bool:
    """True if ``path`` holds this tiny model from ``seed``; raise if it holds anything else."""
    if not path.exists() and not path.is_symlink():
        return False
    facts = read_provenance(path)
    if facts is None:
        raise SelmaError(f"{name}: {path} exists and was not written by selma tiny-models; it is left alone. "
                         "Choose another --out or move it away")
    if facts.get("seed") != seed:
        raise SelmaError(f"{name}: {path} was made from seed {facts.get('seed')}, not {seed}; "
                         "pass --force to rewrite it, or choose another --out")
    return True


def _megabytes(path: Path) -> float:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 1e6


# --- CLI ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__.split("\n\n", 1)[1].replace("``", "")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write the models into")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    parser.add_argument("--only", nargs="+", choices=TINY_MODELS.names(), metavar="NAME",
                        help=f"write only these models: {', '.join(TINY_MODELS.names())} (default: all)")
    parser.add_argument("--force", action="store_true",
                        help="rewrite models this command made before (other files are never replaced)")


def run(args: argparse.Namespace) -> int:
    _quiet_save_progress_bars()
    start = time.perf_counter()
    paths = write_tiny_models(args.out, seed=args.seed, only=args.only, force=args.force, log=print)
    print(f"{len(paths)} tiny model(s) in {args.out} ({time.perf_counter() - start:.1f} s)")
    return 0


def _quiet_save_progress_bars() -> None:
    """transformers draws a progress bar per saved shard; in a shell command that is only noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
