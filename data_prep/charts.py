"""Small PNG charts for the reports people read in the Prefect UI (PIL only, no plotting stack)."""
from __future__ import annotations

from pathlib import Path

WIDTH, HEIGHT, MARGIN = 640, 320, 40
HISTOGRAM_BINS = 20


def _canvas(title: str, low: str, high: str):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.line([MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN], fill="black")
    draw.text((MARGIN, HEIGHT - MARGIN + 8), low, fill="black")
    draw.text((WIDTH - MARGIN - 30, HEIGHT - MARGIN + 8), high, fill="black")
    draw.text((MARGIN, 8), title, fill="black")
    return image, draw


def _save(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def draw_histogram(lengths: list[int], max_tokens: int, path: Path) -> None:
    """A bar chart of training-row token lengths, with the max_tokens limit marked in red."""
    top = max(max(lengths), max_tokens)
    bins = [0] * HISTOGRAM_BINS
    for n in lengths:
        bins[min(HISTOGRAM_BINS - 1, n * HISTOGRAM_BINS // (top + 1))] += 1
    image, draw = _canvas(f"token lengths of {len(lengths)} training rows (red: max_tokens={max_tokens})", "0", str(top))
    bar = (WIDTH - 2 * MARGIN) / HISTOGRAM_BINS
    for i, count in enumerate(bins):
        h = (HEIGHT - 2 * MARGIN) * count / max(bins)
        draw.rectangle([MARGIN + i * bar + 1, HEIGHT - MARGIN - h, MARGIN + (i + 1) * bar - 1, HEIGHT - MARGIN], fill=(70, 110, 180))
    limit_x = MARGIN + (WIDTH - 2 * MARGIN) * max_tokens / (top + 1)
    draw.line([limit_x, MARGIN / 2, limit_x, HEIGHT - MARGIN], fill=(200, 40, 40), width=2)
    _save(image, path)


def draw_curve(points: list[tuple[float, float]], title: str, path: Path) -> None:
    """A line of (step, value) points, the value axis from 0 to the largest value."""
    last_step = max(step for step, _ in points) or 1
    top = max(value for _, value in points) or 1.0
    image, draw = _canvas(f"{title} (0 to {top:.3g})", "0", str(int(last_step)))
    xy = [(MARGIN + (WIDTH - 2 * MARGIN) * step / last_step, HEIGHT - MARGIN - (HEIGHT - 2 * MARGIN) * value / top) for step, value in points]
    if len(xy) > 1:
        draw.line(xy, fill=(70, 110, 180), width=2)
    else:
        draw.ellipse([xy[0][0] - 3, xy[0][1] - 3, xy[0][0] + 3, xy[0][1] + 3], fill=(70, 110, 180))
    _save(image, path)
