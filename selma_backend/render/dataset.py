"""The SELMA dataset folder on disk: how an image is committed, found again, and indexed.

Layout (read by HF ``datasets`` imagefolder, kohya, ComfyUI's ``LoadImageTextDataSetFromFolder``)::

    <out>/<stem>.png       image; an iTXt chunk "selma" holds its metadata row (a self-describing record)
    <out>/<stem>.txt       caption: the prompt text, exactly
    <out>/metadata.jsonl   one row per image: file_name, text, skill, prompt_id, seed, sample, source
    <out>/dataset.json     how it was made (model, scheduler, steps, cfg, size, versions, config)
    <out>/.selma.lock      held while a process writes the folder

``<stem>`` is ``<prompt id>_s<sample>`` (ids that are not file-name safe get a hash suffix).

Commit protocol for one image, in this order:

1. ``<stem>.txt`` written atomically (temp file, fsync, rename);
2. ``<stem>.png`` written to a temp file, fsynced, then linked into place -- **the commit point**;
3. its row appended (fsynced) to ``metadata.jsonl``, by the one process that owns the index.

Invariants, true after a ``kill -9`` at any instant:

- (I1) ``<stem>.png`` exists => its bytes are complete, its caption is complete, and its "selma"
  chunk holds its row. A PNG is never replaced (``overwrite=False``), so a finished image is never
  re-rendered or rewritten.
- (I2) every complete line of ``metadata.jsonl`` names a PNG that was committed before it (a torn
  last line is dropped by ``read_jsonl`` and cut before the next append).
- Hence the index can lag the images but never lead them. :func:`reconcile` (run before and after
  every render, under the lock) appends the row of each committed PNG that has none, read back from
  the PNG itself, so every image is in ``metadata.jsonl`` exactly once. Temp files (``.*.tmp``) and
  captions without their PNG are debris of an interrupted commit and are removed before work starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import SelmaError, invalid
from ..fsio import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl

METADATA = "metadata.jsonl"
DATASET_JSON = "dataset.json"
LOCK = ".selma.lock"
CHUNK = "selma"  # PNG iTXt key holding {"row": ..., "pixels_sha256": ..., "settings": ...}
ROW_KEYS = ("file_name", "text", "skill", "prompt_id", "seed", "sample", "source")
FORMAT = {"name": "selma-dataset", "version": 1}

# No dots: ComfyUI's dataset node finds a caption by replacing the extension text (".png") anywhere in
# the path, so a stem must never contain one.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,120}$")
_STEM = re.compile(r"^.+_s\d+$")
_TEMP = re.compile(r"^\..+\.tmp$")  # fsio's atomic writes: .<name>.<random>.tmp

Warn = Callable[[str], None]


# --- names and records --------------------------------------------------------------------------------


def stem_for(prompt_id: str, sample: int) -> str:
    """File stem of (prompt id, sample): ``countbench-000042_s0``; unsafe ids get a stable hash suffix."""
    if _SAFE_ID.match(prompt_id):
        base = prompt_id
    else:
        cleaned = re.sub(r"[^A-Za-z0-9-]+", "_", prompt_id).strip("_-")[:80] or "prompt"
        base = f"{cleaned}-{hashlib.sha256(prompt_id.encode('utf-8')).hexdigest()[:8]}"
    return f"{base}_s{sample}"


def make_row(prompt_id: str, sample: int, text: str, skill: str, seed: int | None, source: str) -> dict[str, Any]:
    return {"file_name": stem_for(prompt_id, sample) + ".png", "text": text, "skill": skill,
            "prompt_id": prompt_id, "seed": seed, "sample": sample, "source": source}


def pixels_sha256(image: Any) -> str:
    """Hash of an image's pixels (mode, size, bytes): equal images, equal hash, whatever the PNG encoder."""
    h = hashlib.sha256(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def encode_png(image: Any, record: dict[str, Any]) -> bytes:
    """PNG bytes of ``image`` with ``record`` (JSON) in an iTXt chunk placed before the pixels."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_itxt(CHUNK, json.dumps(record, ensure_ascii=False, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


def read_record(path: Path) -> dict[str, Any] | None:
    """The "selma" record of a committed PNG, or None when it has none (not made by SELMA)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            raw = im.info.get(CHUNK)
    except OSError:
        return None
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None
    row = record.get("row") if isinstance(record, dict) else None
    if not isinstance(row, dict) or row.get("file_name") != path.name:
        return None  # renamed or foreign: its row would name another file
    return record


def commit_image(out_dir: Path, image: Any, row: dict[str, Any], settings: dict[str, Any] | None = None) -> Path:
    """Write caption, then PNG (the commit point; see the module invariants). Returns the PNG path."""
    png = out_dir / row["file_name"]
    record = {"row": row, "pixels_sha256": pixels_sha256(image), "settings": settings}
    data = encode_png(image, record)  # encode before touching the disk: a failure leaves nothing behind
    atomic_write_text(png.with_suffix(".txt"), row["text"])
    atomic_write_bytes(png, data, overwrite=False)
    return png


# --- the index ----------------------------------------------------------------------------------------


def read_index(out_dir: Path) -> dict[str, dict[str, Any]]:
    """file_name -> row of ``metadata.jsonl``; a file name listed twice is an error (the index is corrupt)."""
    index: dict[str, dict[str, Any]] = {}
    for i, row in enumerate(read_jsonl(out_dir / METADATA), 1):
        name = row.get("file_name") if isinstance(row, dict) else None
        if not isinstance(name, str):
            raise SelmaError(f"{out_dir / METADATA}, row {i}: no 'file_name'; fix or remove that line")
        if name in index:
            raise SelmaError(f"{out_dir / METADATA}: {name!r} is listed twice (rows {i} and an earlier one); "
                             "remove one of the lines")
        index[name] = row
    return index


def append_rows(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    append_jsonl(out_dir / METADATA, rows)


def committed_pngs(out_dir: Path) -> set[str]:
    return {p.name for p in out_dir.iterdir() if p.suffix == ".png" and not p.name.startswith(".")} \
        if out_dir.is_dir() else set()


def cleanup(out_dir: Path) -> list[str]:
    """Remove debris of interrupted commits: temp files and captions whose PNG was never committed."""
    removed = []
    if not out_dir.is_dir():
        return removed
    names = {p.name for p in out_dir.iterdir()}
    for name in sorted(names):
        stem, suffix = os.path.splitext(name)
        debris = _TEMP.match(name) or (suffix == ".txt" and _STEM.match(stem) and f"{stem}.png" not in names)
        if debris and (out_dir / name).is_file():
            (out_dir / name).unlink()
            removed.append(name)
    return removed


def reconcile(out_dir: Path, warn: Warn | None = None) -> tuple[dict[str, dict[str, Any]], int]:
    """Append the rows of committed PNGs that ``metadata.jsonl`` lacks; return (index, rows added).

    Call only with the lock held, from the one process that writes the index.
    """
    index = read_index(out_dir)
    missing = sorted(committed_pngs(out_dir) - set(index))
    rows, foreign = [], []
    for name in missing:
        record = read_record(out_dir / name)
        if record is None:
            foreign.append(name)
        else:
            rows.append({k: record["row"].get(k) for k in ROW_KEYS})
    if foreign and warn:
        warn(f"{out_dir}: {len(foreign)} PNG(s) not made by SELMA and not in {METADATA} are left alone "
             f"(e.g. {foreign[0]}); dataset loaders may reject the folder until they are removed or listed")
    if rows:
        append_rows(out_dir, rows)
    index.update((r["file_name"], r) for r in rows)
    return index, len(rows)


def canonicalize(out_dir: Path) -> bool:
    """Rewrite ``metadata.jsonl`` sorted by (prompt id, sample), rows unchanged; True if it changed.

    After this a dataset's index is byte-identical however it was made (straight, resumed, sharded).
    """
    path = out_dir / METADATA
    rows = read_jsonl(path)
    ordered = sorted(rows, key=lambda r: (str(r.get("prompt_id")), _int_or(r.get("sample")), r["file_name"]))
    if ordered == rows:
        return False
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in ordered)
    atomic_write_text(path, text)
    return True


def _int_or(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


@contextlib.contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold the folder's write lock; a second writer gets a clear error instead of interleaving."""
    out_dir.mkdir(parents=True, exist_ok=True)
    f = open(out_dir / LOCK, "a+b")  # noqa: SIM115 - closed in finally
    try:
        try:
            _lock_file(f)
        except OSError as e:
            raise SelmaError(f"{out_dir}: another process is writing this dataset; wait for it to finish, "
                             "or render into another folder") from e
        yield
    finally:
        f.close()  # closing releases the lock


def _lock_file(f: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        f.seek(0)
        msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


# --- dataset.json -------------------------------------------------------------------------------------


def read_info(out_dir: Path) -> dict[str, Any]:
    path = out_dir / DATASET_JSON
    if not path.exists():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SelmaError(f"{path}: not valid JSON ({e.msg}); restore it or remove it") from e
    if not isinstance(info, dict) or info.get("format", {}).get("name") != FORMAT["name"]:
        raise SelmaError(f"{path}: not a SELMA dataset description; render into another folder")
    return info


def record_render(out_dir: Path, render: dict[str, Any], allow_mixed: bool) -> None:
    """Write the render description into dataset.json, refusing settings that differ from earlier images.

    ``render["settings"]`` are the settings that change images; another run with equal settings
    resumes/extends the dataset. Different settings are refused unless ``allow_mixed``, which
    records them under ``"mixed"`` (each image's own settings are in its PNG record).
    """
    info = read_info(out_dir) or {"format": FORMAT, "sources": []}
    first = info.get("render")
    new = render["settings"]
    if first is None:
        info["render"] = render
    elif first["settings"] != new:
        if not allow_mixed:
            diff = ", ".join(f"{k}: {first['settings'].get(k)!r} -> {new.get(k)!r}"
                             for k in sorted(set(first["settings"]) | set(new))
                             if first["settings"].get(k) != new.get(k))
            raise SelmaError(f"{out_dir}: its images were rendered with other settings ({diff}); mixing them "
                             "would make one dataset of two recipes. Render into a new folder, or allow mixing "
                             "(--allow-mixed / allow_mixed=True)")
        mixed = info.setdefault("mixed", [])
        if all(m["settings"] != new for m in mixed):
            mixed.append(render)
    _add_source(info, "render")
    atomic_write_json(out_dir / DATASET_JSON, info)


def _add_source(info: dict[str, Any], source: str) -> None:
    sources = info.setdefault("sources", [])
    if source not in sources:
        sources.append(source)


# --- the native path: images rendered elsewhere (ComfyUI's samplers) ----------------------------------


def append_images(out_dir: str | os.PathLike[str], images: list[Any], prompts: list[str], skill: str, *,
                  seed: int | None = None, source: str = "comfyui", model_hash: str | None = None,
                  prompt_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Add ``images`` (PIL) with their ``prompts`` to the dataset at ``out_dir``; return their rows.

    Same format and commit protocol as a render. Ids are stable: a prompt's id is
    ``<skill>-t<hash of the text>`` unless ``prompt_ids`` gives them (e.g. the ids of prompts.jsonl),
    and each image takes the next free sample index of its prompt. Idempotent: an image whose pixels
    equal an image already stored for the same prompt id is not added again (its existing row is
    returned), so re-running a workflow does not duplicate data.
    """
    out = Path(out_dir)
    _check_append_args(images, prompts, skill, seed, source, prompt_ids)
    ids = list(prompt_ids) if prompt_ids is not None else [text_prompt_id(skill, p) for p in prompts]
    with locked(out):
        cleanup(out)
        index, _ = reconcile(out)
        info = read_info(out) or {"format": FORMAT, "sources": []}
        _add_source(info, source)
        if model_hash:
            hashes = info.setdefault("appended_model_hashes", [])
            if model_hash not in hashes:
                hashes.append(model_hash)
        atomic_write_json(out / DATASET_JSON, info)
        result, new_rows = [], []
        for image, text, pid in zip(images, prompts, ids, strict=True):
            row = _existing_copy(out, index, pid, image) or _commit_new(out, index, image, text, skill, pid, seed,
                                                                        source, new_rows)
            result.append(row)
        if new_rows:
            append_rows(out, new_rows)
    return result


def text_prompt_id(skill: str, text: str) -> str:
    return f"{skill}-t{hashlib.sha256(text.encode('utf-8')).hexdigest()[:12]}"


def _commit_new(out: Path, index: dict[str, dict[str, Any]], image: Any, text: str, skill: str, pid: str,
                seed: int | None, source: str, new_rows: list[dict[str, Any]]) -> dict[str, Any]:
    taken = {r.get("sample") for r in index.values() if r.get("prompt_id") == pid}
    sample = next(k for k in range(len(taken) + 1) if k not in taken and not (out / f"{stem_for(pid, k)}.png").exists())
    row = make_row(pid, sample, text, skill, seed, source)
    commit_image(out, image.convert("RGB"), row)
    index[row["file_name"]] = row
    new_rows.append(row)
    return row


def _existing_copy(out: Path, index: dict[str, dict[str, Any]], pid: str, image: Any) -> dict[str, Any] | None:
    digest = pixels_sha256(image.convert("RGB"))
    for row in index.values():
        if row.get("prompt_id") == pid and (out / row["file_name"]).exists():
            record = read_record(out / row["file_name"])
            if record and record.get("pixels_sha256") == digest:
                return row
    return None


def _check_append_args(images: list[Any], prompts: list[str], skill: str, seed: int | None, source: str,
                       prompt_ids: list[str] | None) -> None:
    if len(images) != len(prompts):
        raise invalid("prompts", f"{len(prompts)} prompts", f"one prompt per image ({len(images)} images)",
                      "give a list of prompts as long as the batch, or one prompt repeated")
    if not images:
        raise invalid("images", "an empty list", "at least one image")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise invalid("prompts", p, "non-empty strings")
    if not isinstance(skill, str) or not skill.strip():
        raise invalid("skill", skill, "a skill id, e.g. 'spatial'")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid("seed", seed, "an integer or None")
    if not isinstance(source, str) or not source.strip():
        raise invalid("source", source, "a non-empty name, e.g. 'comfyui'")
    if prompt_ids is not None and (len(prompt_ids) != len(images) or not all(isinstance(i, str) and i for i in prompt_ids)):
        raise invalid("prompt_ids", prompt_ids, f"{len(images)} non-empty strings, one per image")
