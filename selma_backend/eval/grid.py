"""Side-by-side grids: one row per prompt (its text as the caption), one column per model
(base | experts | merged), each image with its scores underneath. Drawn with Pillow."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chart import font

PAD = 8
HEADER = 34
CAPTION_LINE = 16
SCORE_BAND = 18
MAX_CAPTION_LINES = 3


@dataclass(frozen=True)
class GridRow:
    """One prompt: its text, one image file per model (same order as the columns), a note under each."""

    prompt: str
    images: Sequence[Path]
    notes: Sequence[str]


def cell_size(image_width: int) -> int:
    """Cells show small renders enlarged (at least 128 px) and big ones reduced (at most 256 px)."""
    return max(128, min(256, image_width))


def wrap(text: str, width_px: float, f: Any, draw: Any, max_lines: int = MAX_CAPTION_LINES) -> list[str]:
    """Greedy word wrap of ``text`` into at most ``max_lines`` lines of ``width_px`` (the last ends in …)."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=f) <= width_px or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1].rstrip(".,;") + " …"
    return lines


def grid_image(title: str, columns: Sequence[str], colours: Sequence[str], rows: Sequence[GridRow]) -> Any:
    """A PIL image: a title, column headers, then each prompt's caption above its row of images."""
    from PIL import Image, ImageDraw

    image_w, image_h = _size(rows[0].images[0]) if rows and rows[0].images else (128, 128)  # one size per report
    cell = cell_size(image_w)
    cell_h = cell * image_h // image_w
    width = PAD + len(columns) * (cell + PAD)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [wrap(r.prompt, width - 2 * PAD, font(13), scratch) for r in rows]
    heights = [len(c) * CAPTION_LINE + PAD + cell_h + SCORE_BAND + PAD for c in captions]
    img = Image.new("RGB", (width, 26 + HEADER + sum(heights)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((PAD, 6), title, fill="black", font=font(15))
    for c, (name, colour) in enumerate(zip(columns, colours, strict=True)):
        x = PAD + c * (cell + PAD)
        draw.rectangle([x, 28, x + cell, 28 + 4], fill=colour)
        label = wrap(name, cell, font(12), draw, max_lines=1)[0] if name else ""
        draw.text((x, 36), label, fill="black", font=font(12))
    y = 26 + HEADER
    for row, caption, h in zip(rows, captions, heights, strict=True):
        draw.line([(PAD, y), (width - PAD, y)], fill="#dddddd")
        for i, line in enumerate(caption):
            draw.text((PAD, y + 4 + i * CAPTION_LINE), line, fill="#222222", font=font(13))
        top = y + len(caption) * CAPTION_LINE + PAD
        for c, (path, note) in enumerate(zip(row.images, row.notes, strict=True)):
            x = PAD + c * (cell + PAD)
            with Image.open(path) as im:
                resample = Image.Resampling.NEAREST if im.width < cell else Image.Resampling.LANCZOS
                img.paste(im.convert("RGB").resize((cell, cell_h), resample), (x, top))
            draw.text((x, top + cell_h + 3), note, fill="#333333", font=font(11))
        y += h
    return img


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def stack(images: Sequence[Any], gap: int = 12) -> Any:
    """Images one under another on white, left-aligned (the overview grid of all skills)."""
    from PIL import Image

    width = max(im.width for im in images)
    out = Image.new("RGB", (width, sum(im.height for im in images) + gap * (len(images) - 1)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height + gap
    return out
