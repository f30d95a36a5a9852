"""The CLIP scorer: an open_clip model loaded from local files only, batched embedding, an embedding cache.

Loading never falls back to random weights: a folder without a weight file, a file without an
architecture, or weights that do not fit the architecture (strict load) are errors.

Cache: ``<dataset>/.selma_cache/clip-<model key>.safetensors`` holds image embeddings keyed by the
sha256 of the image file's bytes (with the image's grey-level std, for the blank check) and text
embeddings keyed by the sha256 of the caption. The model key hashes the weights, the model config
and the precision, so another model (or fp16 vs fp32) never reads stale vectors. Writes are atomic.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SelmaError, invalid
from ..fsio import atomic_write_bytes, sha256_file
from .config import ScorerConfig

CONFIG_FILE = "open_clip_config.json"
#: What hubs publish, in open_clip's order of preference (factory._find_checkpoint_in_dir).
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")
FILE_SUFFIXES = (".safetensors", ".sft", ".bin", ".pt", ".pth")
CACHE_DIR = ".selma_cache"
CACHE_FORMAT = "selma-clip-cache-1"

Progress = Callable[[int, int], None]
ShouldStop = Callable[[], bool]


# --- loading -------------------------------------------------------------------------------------------


class ClipScorer:
    """A loaded open_clip model; embeds images and texts as unit vectors (float32, on the CPU).

    Use as a context manager, or call :meth:`release` to free the model (and GPU memory).
    """

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, device: str, dtype: Any, config: ScorerConfig,
                 model_key: str, info: dict[str, Any]) -> None:
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.dtype, self.config = device, dtype, config
        self.model_key = model_key  # sha256 of (weights, model config, precision)
        self.info = info  # recorded in the filter summary
        self.context_length = int(getattr(tokenizer, "context_length", 0) or 77)
        self.workers = max(1, min(8, (os.cpu_count() or 1)))

    def __enter__(self) -> ClipScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self.model is None:
            return
        self.model = None
        import torch

        if self.device == "cuda":
            torch.cuda.empty_cache()

    def _live(self) -> Any:
        if self.model is None:
            raise SelmaError("this CLIP scorer was released; load the model again")
        return self.model

    # -- embedding --

    def embed_pixels(self, pixels: Any) -> Any:
        """(B, 3, H, W) preprocessed tensor -> (B, D) unit vectors, float32 on the CPU."""
        import torch

        model = self._live()
        with torch.inference_mode():
            x = pixels.to(self.device, dtype=self.dtype, non_blocking=True)
            return model.encode_image(x, normalize=True).float().cpu()

    def embed_texts(self, texts: Sequence[str]) -> Any:
        """Captions -> (N, D) unit vectors, float32 on the CPU (batched by ``config.batch_size``)."""
        import torch

        model = self._live()
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.config.batch_size):
                tokens = self.tokenizer(list(texts[i:i + self.config.batch_size])).to(self.device)
                out.append(model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @property
    def dim(self) -> int:
        return int(getattr(self._live(), "embed_dim", 0) or self._live().text_projection.shape[-1])

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """BPE tokens of each text, without start/end tokens and without truncation."""
        encode = getattr(self.tokenizer, "encode", None)
        if callable(encode):  # open_clip's SimpleTokenizer
            return [len(encode(t)) for t in texts]
        hf = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
        if hf is not None:
            return [len(hf(t, add_special_tokens=False)["input_ids"]) for t in texts]
        raise SelmaError(f"cannot count tokens with {type(self.tokenizer).__name__}; set max_caption_tokens")

    def load_image(self, data: bytes) -> tuple[Any, float]:
        """Encoded image bytes -> (preprocessed (3, H, W) tensor, grey-level std 0..255). Raises on bad files."""
        from PIL import Image, ImageStat

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im.convert("RGB")
        std = float(ImageStat.Stat(rgb.convert("L")).stddev[0])
        return self.preprocess(rgb), std


def load_scorer(config: ScorerConfig) -> ClipScorer:
    """Load the open_clip model of ``config`` from local files (never a download, never random weights)."""
    import torch

    from ..models.config import resolve_device

    path = Path(config.path).expanduser()
    device = resolve_device(config.device)
    precision = {"auto": "fp32" if device == "cpu" else "fp16"}.get(config.dtype, config.dtype)
    if device == "mps" and config.dtype == "auto":
        precision = "fp32"
    name, pretrained, weights, model_cfg = _locate(path, config.arch)
    open_clip = _open_clip()
    try:
        model, preprocess = open_clip.create_model_from_pretrained(name, pretrained=pretrained, precision=precision,
                                                                   device=device)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:  # open_clip asserts shapes
        raise SelmaError(f"{path}: could not load it as open_clip {config.arch or 'folder'} ({e}); check that the "
                         "weights belong to that architecture (OpenAI weights need the '-quickgelu' variant)") from e
    model.eval()
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    key = _model_key(weights, model_cfg, precision)
    info = {"path": str(path), "arch": config.arch or model_cfg.get("arch", "local-dir"), "weights": str(weights),
            "precision": precision, "device": device, "model_key": key, "config": config.to_dict()}
    return ClipScorer(model, preprocess, tokenizer, device, dtype, config, key, info)


def _open_clip() -> Any:
    try:
        import open_clip
    except ImportError as e:
        raise SelmaError("stage 3 needs open_clip: pip install open_clip_torch") from e
    return open_clip


def _locate(path: Path, arch: str) -> tuple[str, str | None, Path, dict[str, Any]]:
    """(open_clip model name, pretrained file or None, weight file, config dict for the model key)."""
    if path.is_dir():
        if arch:
            raise invalid("arch", arch, "'' for a folder", f"{path} names its architecture in {CONFIG_FILE}")
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise invalid("path", str(path), f"an open_clip folder with {CONFIG_FILE} and weights",
                          f"{cfg_file} is missing; for a single weight file pick the file and give its arch")
        present = [path / n for n in WEIGHT_FILES if (path / n).is_file()]
        if not present:
            raise SelmaError(f"{path}: no weight file ({', '.join(WEIGHT_FILES[:3])}, ...); the model would have "
                             "random weights. Download the weights into that folder")
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise SelmaError(f"{cfg_file}: not valid JSON ({e}); restore it from the model's hub page") from e
        return "local-dir:" + str(path), None, present[0], cfg
    if path.is_file():
        open_clip = _open_clip()
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise invalid("path", str(path), f"a weight file ({', '.join(FILE_SUFFIXES)}) or an open_clip folder")
        if not arch:
            raise invalid("arch", arch, "an open_clip architecture name, e.g. 'ViT-B-32', 'ViT-L-14'",
                          f"{path.name} is a bare weight file: say which architecture it holds")
        if arch not in open_clip.list_models():
            raise invalid("arch", arch, "an open_clip architecture (open_clip.list_models()), e.g. 'ViT-B-32', "
                          "'ViT-B-32-quickgelu', 'ViT-L-14'")
        return arch, str(path), path, {"arch": arch, "model_cfg": open_clip.get_model_config(arch)}
    raise invalid("path", str(path), "an existing open_clip folder or weight file", "Pick a model from models/clip")


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """Streaming sha256 of a file, remembered in this process while (path, size, mtime) are unchanged."""
    st = path.stat()
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if memo not in _HASHES:
        _HASHES[memo] = sha256_file(path)
    return _HASHES[memo]


def _model_key(weights: Path, model_cfg: dict[str, Any], precision: str) -> str:
    from ..models.loader import file_sha256 as weights_file_sha256  # the on-disk hash cache

    h = hashlib.sha256(b"selma-clip\0")
    h.update(weights_file_sha256(weights).encode())  # cached on disk: CLIP weights can be GBs
    h.update(json.dumps(model_cfg, sort_keys=True, default=str).encode())
    h.update(precision.encode())
    return h.hexdigest()[:16]


# --- cache ---------------------------------------------------------------------------------------------


@dataclass
class EmbeddingCache:
    """sha256 -> vector maps for images (with grey std) and texts; one file per dataset and model key."""

    path: Path
    model_key: str
    images: dict[str, tuple[Any, float]] = field(default_factory=dict)
    texts: dict[str, Any] = field(default_factory=dict)
    dirty: bool = False
    warning: str = ""

    @classmethod
    def open(cls, dataset_dir: str | os.PathLike[str], model_key: str) -> EmbeddingCache:
        path = Path(dataset_dir) / CACHE_DIR / f"clip-{model_key}.safetensors"
        cache = cls(path, model_key)
        if path.exists():
            try:
                cache._read()
            except Exception as e:  # noqa: BLE001 - a damaged cache is recomputed, and the report says so
                cache.images, cache.texts = {}, {}
                cache.warning = f"{path}: unreadable embedding cache ({e}); recomputed"
        return cache

    def _read(self) -> None:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("model_key") != self.model_key:
                raise SelmaError(f"written for {meta.get('model_key')!r} in format {meta.get('format')!r}")
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        for sha, emb, std in zip(_hex(t["image_sha256"]), t["image_emb"], t["image_pixel_std"].tolist(), strict=True):
            self.images[sha] = (emb, std)
        for sha, emb in zip(_hex(t["text_sha256"]), t["text_emb"], strict=True):
            self.texts[sha] = emb

    def save(self) -> None:
        """Write the cache atomically (only when something was added)."""
        if not self.dirty:
            return
        import torch
        from safetensors.torch import save

        def stack(vectors: list[Any]) -> Any:
            return torch.stack(vectors).float().contiguous() if vectors else torch.zeros(0, 0)

        tensors = {"image_sha256": _raw(list(self.images)), "image_emb": stack([v[0] for v in self.images.values()]),
                   "image_pixel_std": torch.tensor([v[1] for v in self.images.values()], dtype=torch.float32),
                   "text_sha256": _raw(list(self.texts)), "text_emb": stack(list(self.texts.values()))}
        atomic_write_bytes(self.path, save(tensors, metadata={"format": CACHE_FORMAT, "model_key": self.model_key}))
        self.dirty = False


def _raw(hexes: list[str]) -> Any:
    import torch

    return torch.tensor([list(bytes.fromhex(h)) for h in hexes], dtype=torch.uint8).reshape(len(hexes), 32)


def _hex(raw: Any) -> list[str]:
    return [bytes(r).hex() for r in raw.tolist()]


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- batched embedding of files --------------------------------------------------------------------------


@dataclass
class FileEmbeddings:
    """Per input file: its unit embedding (zeros when broken), grey std, sha256; ``errors`` names broken ones."""

    emb: Any  # (N, D) float32
    pixel_std: list[float]
    sha256: list[str | None]
    errors: dict[int, str]
    computed: int = 0  # images embedded now (the rest came from the cache)
    stopped: bool = False


def embed_files(scorer: ClipScorer, paths: Sequence[Path], cache: EmbeddingCache | None = None,
                progress: Progress | None = None, should_stop: ShouldStop | None = None) -> FileEmbeddings:
    """Embed image files in batches; files already in ``cache`` (same bytes) are not decoded again.

    Decoding and preprocessing run in a thread pool (PIL releases the GIL), one batch ahead of the model.
    """
    import torch

    cache = cache or EmbeddingCache(Path(os.devnull), scorer.model_key)
    n = len(paths)
    shas: list[str | None] = [None] * n
    errors: dict[int, str] = {}
    with ThreadPoolExecutor(scorer.workers) as pool:
        for i, sha in enumerate(pool.map(_hash_file, paths)):  # pass 1: hashes only, nothing kept in memory
            if isinstance(sha, Exception):
                errors[i] = f"unreadable: {sha}"
            else:
                shas[i] = sha
        todo = [i for i in range(n) if shas[i] is not None and shas[i] not in cache.images]
        done = n - len(todo)
        if progress:
            progress(done, n)
        stopped = _embed_todo(scorer, pool, [(i, Path(paths[i]), shas[i]) for i in todo], cache, errors,
                              progress, should_stop, done, n)
    emb, stds = torch.zeros(n, scorer.dim), [0.0] * n
    for i, sha in enumerate(shas):
        if i not in errors and sha in cache.images:
            emb[i], stds[i] = cache.images[sha]
    return FileEmbeddings(emb, stds, shas, errors, computed=len(todo), stopped=stopped)


def _embed_todo(scorer: ClipScorer, pool: ThreadPoolExecutor, todo: list[tuple[int, Path, str | None]],
                cache: EmbeddingCache, errors: dict[int, str], progress: Progress | None,
                should_stop: ShouldStop | None, done: int, total: int) -> bool:
    """Pass 2: decode (threads, one batch ahead) and embed the files not in the cache; True if stopped."""
    import torch

    bs = scorer.config.batch_size
    batches = [todo[i:i + bs] for i in range(0, len(todo), bs)]

    def submit(batch: list[tuple[int, Path, str | None]]) -> list[Future]:
        return [pool.submit(_decode, scorer, path) for _, path, _ in batch]

    pending = submit(batches[0]) if batches else []
    for k, batch in enumerate(batches):
        if should_stop and should_stop():
            return True
        results = [f.result() for f in pending]
        pending = submit(batches[k + 1]) if k + 1 < len(batches) else []  # decode ahead while the model runs
        good = [(sha, r) for (_, _, sha), r in zip(batch, results, strict=True) if not isinstance(r, Exception)]
        errors.update((i, f"cannot decode: {r}") for (i, _, _), r in zip(batch, results, strict=True)
                      if isinstance(r, Exception))
        if good:
            vectors = scorer.embed_pixels(torch.stack([r[0] for _, r in good]))
            for (sha, (_, std)), v in zip(good, vectors, strict=True):
                cache.images[sha] = (v.clone(), std)
            cache.dirty = True
        done += len(batch)
        if progress:
            progress(done, total)
    return False


def _hash_file(path: Path) -> str | Exception:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as e:
        return e


def _decode(scorer: ClipScorer, path: Path) -> tuple[Any, float] | Exception:
    try:
        return scorer.load_image(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file; it becomes a drop reason
        return e


def embed_captions(scorer: ClipScorer, texts: Sequence[str], cache: EmbeddingCache | None = None) -> Any:
    """(N, D) unit embeddings of ``texts``; each distinct caption is embedded once and cached."""
    import torch

    cache = cache or EmbeddingCache(Path(os.devnull), scorer.model_key)
    keys = [text_sha256(t) for t in texts]
    missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in cache.texts}
    if missing:
        vectors = scorer.embed_texts(list(missing.values()))
        cache.texts.update(zip(missing, (v.clone() for v in vectors), strict=True))
        cache.dirty = True
    return torch.stack([cache.texts[k] for k in keys]) if keys else torch.zeros(0, scorer.dim)
