"""What a person sees: a progress bar, metrics as JSONL, and a PNG of the curves.

The plot is drawn with Pillow (no matplotlib): two panels, loss and accuracy against
epochs, train and test series.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Iterable, Sequence


class JsonlWriter:
    """One JSON object per line, flushed as written."""

    def __init__(self, path: str, append: bool = False):
        if os.path.exists(path) and not append:
            raise FileExistsError(f"{path} already exists; pass --resume to continue that run or choose a new --out")
        self.path = path
        self._f = open(path, "a" if append else "x", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, sort_keys=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """``epoch 3/10 [########......] 234/468 loss 0.3412 acc 0.8812 1234 img/s``, redrawn in
    place on a terminal, and one line per epoch otherwise."""

    def __init__(self, total: int, epochs: int, enabled: bool = True, stream=None, width: int = 24):
        self.total, self.epochs, self.enabled, self.width = total, epochs, enabled, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, epoch: int, done: int, info: str) -> None:
        if not self.enabled or not self.tty:
            return
        frac = done / max(self.total, 1)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        self.stream.write(f"\repoch {epoch}/{self.epochs} [{bar}] {done}/{self.total} {info}\033[K")
        self.stream.flush()

    def end_epoch(self, line: str) -> None:
        if not self.enabled:
            return
        self.stream.write(("\r" if self.tty else "") + line + ("\033[K" if self.tty else "") + "\n")
        self.stream.flush()


class Throughput:
    def __init__(self):
        self.t, self.images = time.perf_counter(), 0

    def rate(self, images: int) -> float:
        now = time.perf_counter()
        rate = images / max(now - self.t, 1e-9)
        self.t = now
        return rate


# ----------------------------------------------------------------------------- plot

_COLORS = {"train": (31, 119, 180), "test": (214, 39, 40), "train loss": (31, 119, 180),
           "test loss": (214, 39, 40)}


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _panel(draw, box, title: str, series: dict[str, Sequence[tuple[float, float]]], font) -> None:
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 50, x1 - 10, y0 + 24, y1 - 32
    draw.text((left, y0 + 4), title, fill=(0, 0, 0), font=font)
    pts = [p for s in series.values() for p in s if math.isfinite(p[1])]
    if not pts:
        draw.text((left + 10, top + 10), "no data", fill=(0, 0, 0), font=font)
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xlo, xhi = min(0.0, min(xs)), max(xs) if max(xs) > 0 else 1.0
    ylo, yhi = min(ys), max(ys)
    pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 0.05
    ylo, yhi = ylo - pad, yhi + pad

    def tx(x):
        return left + (x - xlo) / (xhi - xlo or 1.0) * (right - left)

    def ty(y):
        return bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    for t in _ticks(ylo, yhi):
        y = ty(t)
        draw.line((left, y, right, y), fill=(225, 225, 225))
        draw.text((x0 + 4, y - 6), _fmt(t), fill=(0, 0, 0), font=font)
    for t in _ticks(xlo, xhi):
        x = tx(t)
        draw.line((x, bottom, x, bottom + 4), fill=(0, 0, 0))
        draw.text((x - 6, bottom + 6), _fmt(t), fill=(0, 0, 0), font=font)
    draw.text((left + (right - left) // 2 - 15, bottom + 18), "epoch", fill=(0, 0, 0), font=font)
    for i, (name, s) in enumerate(series.items()):
        color = _COLORS.get(name, ((i * 97) % 255, (i * 53) % 255, 160))
        line = [(tx(x), ty(y)) for x, y in s if math.isfinite(y)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line if len(line) <= 40 else []:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        lx = right - 80 * (len(series) - i)          # the legend sits above the box, right-aligned
        draw.line((lx, y0 + 10, lx + 20, y0 + 10), fill=color, width=2)
        draw.text((lx + 24, y0 + 4), name, fill=(0, 0, 0), font=font)


def plot_curves(records: Iterable[dict], path: str, title: str = "") -> str:
    """Draw loss and accuracy curves from metric records to a PNG at ``path``."""
    from PIL import Image, ImageDraw, ImageFont

    records = list(records)
    train = [r for r in records if r.get("split") == "train"]
    test = [r for r in records if r.get("split") == "test"]
    loss = {"train": [(r["epoch"], r["loss"]) for r in train],
            "test": [(r["epoch"], r["loss"]) for r in test if "loss" in r]}
    acc = {"train": [(r["epoch"], r["accuracy"]) for r in train],
           "test": [(r["epoch"], r["top1"]) for r in test]}
    image = Image.new("RGB", (960, 380), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    if title:
        draw.text((10, 4), title, fill=(0, 0, 0), font=font)
    _panel(draw, (0, 16, 480, 380), "loss", loss, font)
    _panel(draw, (480, 16, 960, 380), "accuracy (test: top-1)", acc, font)
    image.save(path)
    return path
