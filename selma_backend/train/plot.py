"""Small pictures of a training run, drawn with Pillow (no plotting library needed): the loss curve
and a grid of validation images."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

W, H, PAD = 640, 360, 48


def loss_plot(steps: Sequence[int], losses: Sequence[float], title: str = "training loss") -> Image.Image:
    """A line plot of ``losses`` over ``steps`` (thin: each step; thick: moving average), with axes."""
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    d.text((PAD, 12), title, fill="black", font=font)
    x0, y0, x1, y1 = PAD, PAD - 12, W - 16, H - PAD
    d.rectangle((x0, y0, x1, y1), outline="black")
    pts = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]
    if not pts:
        d.text((x0 + 8, y0 + 8), "no finite loss yet", fill="gray", font=font)
        return img
    smin, smax = pts[0][0], max(pts[-1][0], pts[0][0] + 1)
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    hi = hi if hi > lo else lo + 1e-6

    def xy(s: float, v: float) -> tuple[float, float]:
        return (x0 + (s - smin) / (smax - smin) * (x1 - x0), y1 - (v - lo) / (hi - lo) * (y1 - y0))

    for k in range(5):  # y ticks
        v = lo + (hi - lo) * k / 4
        _, y = xy(smin, v)
        d.line((x0 - 4, y, x0, y), fill="black")
        d.text((2, y - 6), f"{v:.3g}", fill="black", font=font)
    d.text((x0, y1 + 6), str(smin), fill="black", font=font)
    d.text((x1 - 40, y1 + 6), f"step {smax}", fill="black", font=font)
    if len(pts) > 1:
        d.line([xy(s, v) for s, v in pts], fill=(150, 180, 230), width=1)
        d.line([xy(s, v) for s, v in zip([p[0] for p in pts], _moving_average([p[1] for p in pts]), strict=True)],
               fill=(20, 60, 160), width=2)
    else:
        x, y = xy(*pts[0])
        d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(20, 60, 160))
    return img


def _moving_average(values: Sequence[float]) -> list[float]:
    k = max(1, len(values) // 20)
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def grid(images: Sequence[Image.Image], captions: Sequence[str], columns: int = 4) -> Image.Image:
    """Images in rows of ``columns`` with their captions under each (truncated to fit)."""
    if not images:
        raise ValueError("grid: no images")
    w, h = images[0].size
    cap = 14
    rows = math.ceil(len(images) / columns)
    cols = min(columns, len(images))
    out = Image.new("RGB", (cols * w, rows * (h + cap)), "white")
    d = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    chars = max(4, w // 6)
    for i, (im, text) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * w, (i // columns) * (h + cap)
        out.paste(im.convert("RGB").resize((w, h)), (x, y))
        d.text((x + 2, y + h + 1), text if len(text) <= chars else text[: chars - 1] + "…", fill="black", font=font)
    return out


def png_bytes(img: Image.Image, info: dict[str, Any] | None = None) -> bytes:
    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    for k, v in (info or {}).items():
        meta.add_text(k, str(v))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()
