"""The per-skill bar chart with confidence-interval error bars, drawn with Pillow.

matplotlib is not a dependency of the pack (ComfyUI installs do not all have it), so the chart is
drawn directly: one group of bars per skill (plus "all skills"), one bar per model, a whisker from
the interval's low to high end. Fonts: Pillow's bundled scalable font (Pillow >= 10.1), else its
bitmap font.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

BASE_COLOUR = "#8c8c8c"
MERGED_COLOUR = "#f28e2b"
PALETTE = ("#4e79a7", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#e15759", "#86bcb6")
Interval = tuple[float, float, float]  # mean, lo, hi


def font(size: int) -> Any:
    """Pillow's bundled scalable font at ``size`` px, or its fixed bitmap font on older Pillow."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def colours(kinds: Sequence[str]) -> list[str]:
    """A colour per model: grey for the base, orange for merged LoRAs, the palette for the others."""
    out, k = [], 0
    for kind in kinds:
        if kind == "base":
            out.append(BASE_COLOUR)
        elif kind == "merged":
            out.append(MERGED_COLOUR)
        else:
            out.append(PALETTE[k % len(PALETTE)])
            k += 1
    return out


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not hi > lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(count, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10) + 0.0)  # + 0.0: no "-0" label
        v += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def bar_chart(title: str, groups: Sequence[str], labels: Sequence[str], kinds: Sequence[str],
              values: Mapping[tuple[str, str], Interval | None], y_label: str = "") -> Any:
    """A PIL image: for each group, one bar per model (``labels``) with its interval as a whisker.

    ``values[(group, label)]`` is (mean, lo, hi) or None (no data: no bar).
    """
    from PIL import Image, ImageDraw

    bar, gap, left, right, top, bottom = 22, 28, 78, 24, 78, 64
    width = max(560, left + right + len(groups) * (len(labels) * bar + gap))
    gap = (width - left - right) / max(len(groups), 1) - len(labels) * bar  # groups spread over the width
    height = 420
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    present = [v for v in values.values() if v is not None]
    lo = min([0.0] + [min(v) for v in present])
    hi = max([0.0] + [max(v) for v in present])
    ticks = nice_ticks(lo, hi)
    y0, y1 = ticks[0], ticks[-1]
    plot_top, plot_bottom = top, height - bottom

    def y(v: float) -> float:
        return plot_bottom - (v - y0) / (y1 - y0) * (plot_bottom - plot_top)

    draw.text((left, 12), _fit(draw, title, font(16), width - left - right), fill="black", font=font(16))
    _legend(draw, labels, colours(kinds), left, 40, width - right)
    for t in ticks:
        draw.line([(left - 4, y(t)), (width - right, y(t))], fill="#e5e5e5" if t else "#555555")
        draw.text((left - 8, y(t)), f"{t:g}", fill="#333333", font=font(11), anchor="rm")
    if y_label:
        draw.text((8, plot_top - 18), y_label, fill="#333333", font=font(11))
    for g, group in enumerate(groups):
        x0 = left + gap / 2 + g * (len(labels) * bar + gap)
        for m, (label, colour) in enumerate(zip(labels, colours(kinds), strict=True)):
            v = values.get((group, label))
            if v is None:
                continue
            xa, xb = x0 + m * bar + 2, x0 + (m + 1) * bar - 2
            draw.rectangle([xa, min(y(0), y(v[0])), xb, max(y(0), y(v[0]))], fill=colour)
            xm = (xa + xb) / 2
            draw.line([(xm, y(v[1])), (xm, y(v[2]))], fill="black", width=1)
            for end in (v[1], v[2]):
                draw.line([(xm - 4, y(end)), (xm + 4, y(end))], fill="black", width=1)
        name = group if len(group) <= 18 else group[:17] + "…"
        draw.text((x0 + len(labels) * bar / 2, plot_bottom + 10), name, fill="black", font=font(12), anchor="ma")
    return img


def _fit(draw: Any, text: str, f: Any, width: float) -> str:
    """``text`` shortened with … until it fits ``width`` pixels."""
    while draw.textlength(text, font=f) > width and len(text) > 1:
        text = text[:-2] + "…"
    return text


def _legend(draw: Any, labels: Sequence[str], fills: Sequence[str], x: int, y: int, x_max: int) -> None:
    f = font(12)
    for label, fill in zip(labels, fills, strict=True):
        text = label if len(label) <= 28 else label[:27] + "…"
        w = draw.textlength(text, font=f) + 26
        if x + w > x_max:
            x, y = 78, y + 18
        draw.rectangle([x, y + 2, x + 12, y + 14], fill=fill)
        draw.text((x + 16, y), text, fill="black", font=f)
        x += int(w) + 10
