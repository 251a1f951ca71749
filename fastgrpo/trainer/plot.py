"""Training curves as a PNG: matplotlib when installed, else a dependency-free fallback.

Values that are missing, ``None`` (JSON null) or not finite (NaN/inf) are skipped by both
(a gap in the curve, no eval dot); an empty history gives empty panels.

The fallback draws one panel per curve (2 x 3 grid, light grid lines, the curve in colour,
eval points as dots) with a tiny built-in bitmap font for the titles and min/max labels,
and writes the PNG with ``zlib`` only.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

__all__ = ["plot_curves", "plot_bands", "write_png"]

PANELS = [("reward/mean", "reward"), ("accuracy", "accuracy  red: held-out"), ("validity", "validity"),
          ("step_k", "steprar k"), ("kl", "kl"), ("completion_len/mean", "completion length")]

# 3x5 bitmap font: each glyph is 5 rows of 3 bits.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    " ": "000000000000000", "/": "001001010100100", ":": "000010000010000", "e": "000111111100111",
    "a": "000011101101011", "b": "100110101101110", "c": "000111100100111", "d": "001011101101011",
    "f": "011100110100100", "g": "111101111001111", "h": "100110101101101", "i": "010000010010010",
    "k": "100101110101101", "l": "110010010010111", "m": "000111111101101", "n": "000110101101101",
    "o": "000111101101111", "p": "000111101111100", "r": "000111100100100", "s": "000111110011111",
    "t": "010111010010011", "u": "000101101101111", "v": "000101101101010", "w": "000101111111111",
    "x": "000101010101101", "y": "101101111001111", "(": "010100100100010", ")": "010001001001010",
    "_": "000000000000111", "=": "000111000111000", "+": "000010111010000",
}


def write_png(path, pixels: list[bytearray], width: int, height: int) -> None:
    """Write RGB rows (``bytearray`` of ``3 * width`` each) as a PNG."""
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


class _Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.rows = [bytearray(b"\xff" * (3 * w)) for _ in range(h)]

    def px(self, x: int, y: int, c) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            self.rows[y][3 * x:3 * x + 3] = bytes(c)

    def line(self, x0, y0, x1, y1, c, thick: int = 1) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for i in range(n + 1):
            x = round(x0 + (x1 - x0) * i / n)
            y = round(y0 + (y1 - y0) * i / n)
            for dx in range(thick):
                for dy in range(thick):
                    self.px(x + dx, y + dy, c)

    def text(self, x: int, y: int, s: str, c=(0, 0, 0), scale: int = 2) -> None:
        for ch in s.lower():
            g = _FONT.get(ch, _FONT[" "])
            for r in range(5):
                for col in range(3):
                    if g[3 * r + col] == "1":
                        for a in range(scale):
                            for b in range(scale):
                                self.px(x + col * scale + a, y + r * scale + b, c)
            x += 4 * scale


def _num(v) -> float:
    """``v`` as a float; NaN for None, non-numbers and booleans (skipped when drawn)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return math.nan
    return float(v)


def _eval_points(history: list[dict], before: dict | None, after: dict | None,
                 steps: list[int]) -> list[tuple[float, float]]:
    """Held-out accuracy ``(step, value)``: before (step 0), periodic evals, after (last step);
    missing and non-finite values left out."""
    pts = [(0, (before or {}).get("accuracy"))]
    pts += [(m.get("step"), m.get("eval/accuracy")) for m in history if "eval/accuracy" in m]
    if steps:
        pts.append((steps[-1], (after or {}).get("accuracy")))
    pts = [(_num(s), _num(v)) for s, v in pts]
    return [(s, v) for s, v in pts if math.isfinite(s) and math.isfinite(v)]


def _fmt(v: float) -> str:
    if v == 0 or not math.isfinite(v):
        return "0"
    if abs(v) >= 100 or abs(v) < 0.01:
        return f"{v:.2e}"
    return f"{v:.3f}"


def _moving_average(ys: list[float], window: int = 8) -> list[float]:
    out, acc = [], []
    for v in ys:
        acc = (acc + [v])[-window:] if math.isfinite(v) else acc
        out.append(sum(acc) / len(acc) if acc else math.nan)
    return out


def _fallback(history: list[dict], path, before: dict | None = None,
              after: dict | None = None) -> None:
    pw, ph, pad = 320, 220, 40
    cols, rows = 3, 2
    cv = _Canvas(cols * pw, rows * ph)
    rows = [m for m in history if math.isfinite(_num(m.get("step")))]
    steps = [int(m["step"]) for m in rows]
    for k, (key, title) in enumerate(PANELS):
        ox, oy = (k % cols) * pw, (k // cols) * ph
        x0, x1, y0, y1 = ox + pad, ox + pw - 12, oy + 28, oy + ph - 24
        ys = [_num(m.get(key)) for m in rows]
        evals = []
        if key == "accuracy":  # held-out greedy accuracy: before, periodic evals, after
            evals = _eval_points(rows, before, after, steps)
        vals = [v for v in ys if math.isfinite(v)] + [v for _, v in evals]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        cv.text(ox + pad, oy + 8, title)
        for g in range(5):
            gy = y0 + (y1 - y0) * g / 4
            cv.line(x0, gy, x1, gy, (225, 225, 225))
        cv.line(x0, y0, x0, y1, (120, 120, 120))
        cv.line(x0, y1, x1, y1, (120, 120, 120))
        cv.text(ox + 4, y0 - 2, _fmt(hi), (90, 90, 90), 1)
        cv.text(ox + 4, y1 - 4, _fmt(lo), (90, 90, 90), 1)
        last = steps[-1] if steps else 0
        cv.text(x1 - 40, y1 + 6, f"step {last}", (90, 90, 90), 1)
        s0 = min(steps[:1] + [e[0] for e in evals], default=0)
        s1 = max(last, s0 + 1)

        def to_xy(s, v):
            return x0 + (x1 - x0) * (s - s0) / (s1 - s0), y1 - (y1 - y0) * (v - lo) / (hi - lo)

        # raw per-step values light, their moving average (8 steps) dark
        for series, colour, width in ((ys, (170, 200, 230), 1),
                                      (_moving_average(ys), (31, 119, 180), 2)):
            prev = None
            for s, v in zip(steps, series):
                if not math.isfinite(v):
                    prev = None
                    continue
                p = to_xy(s, v)
                if prev is not None:
                    cv.line(prev[0], prev[1], p[0], p[1], colour, width)
                prev = p
        for s, v in evals:
            x, y = to_xy(s, v)
            for dx in range(-3, 4):
                for dy in range(-3, 4):
                    cv.px(int(x) + dx, int(y) + dy, (214, 39, 40))
    write_png(path, cv.rows, cv.w, cv.h)


def plot_curves(history: list[dict], before: dict | None, after: dict | None, path) -> Path:
    """Write the main training curves of ``history`` (the per-step metric dicts) to ``path``."""
    path = Path(path)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _fallback(history, path, before, after)
        return path
    rows = [m for m in history if math.isfinite(_num(m.get("step")))]
    steps = [int(m["step"]) for m in rows]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, PANELS):
        ax.plot(steps, [_num(m.get(key)) for m in rows], label=key)  # NaN: a gap
        if key == "accuracy":
            pts = _eval_points(rows, before, after, steps)
            if pts:
                ax.plot(*zip(*pts), "o-", color="tab:red", label="held-out greedy")
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_ARM_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                (140, 86, 75), (23, 190, 207)]


def plot_bands(series: dict[str, tuple[list[float], list[float], list[float]]], path,
               title: str = "held-out accuracy") -> Path:
    """One line per named series with a band of +-1 standard error: ``series[name] =
    (steps, means, standard errors)``; a legend names the colours.  Dependency-free PNG."""
    path = Path(path)
    w, h, pad = 760, 420, 56
    cv = _Canvas(w, h)
    x0, x1, y0, y1 = pad, w - 190, 36, h - 36
    clean = {}
    for name, (st, ms, es) in series.items():  # missing / non-finite points are skipped
        trip = [(_num(s), _num(m), _num(e)) for s, m, e in zip(st, ms, es)]
        trip = [(s, m, e if math.isfinite(e) else 0.0) for s, m, e in trip
                if math.isfinite(s) and math.isfinite(m)]
        clean[name] = ([t[0] for t in trip], [t[1] for t in trip], [t[2] for t in trip])
    series = clean
    pts = [(s, m - e, m + e) for st, ms, es in series.values() for s, m, e in zip(st, ms, es)]
    lo, hi = min((p[1] for p in pts), default=0.0), max((p[2] for p in pts), default=1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    s0, s1 = min((p[0] for p in pts), default=0), max((p[0] for p in pts), default=1)
    s1 = max(s1, s0 + 1)

    def to_xy(s, v):
        return x0 + (x1 - x0) * (s - s0) / (s1 - s0), y1 - (y1 - y0) * (v - lo) / (hi - lo)

    cv.text(x0, 10, title)
    for g in range(5):
        gy = y0 + (y1 - y0) * g / 4
        cv.line(x0, gy, x1, gy, (225, 225, 225))
    cv.line(x0, y0, x0, y1, (120, 120, 120))
    cv.line(x0, y1, x1, y1, (120, 120, 120))
    cv.text(4, y0 - 2, _fmt(hi), (90, 90, 90), 1)
    cv.text(4, y1 - 4, _fmt(lo), (90, 90, 90), 1)
    cv.text(x1 - 40, y1 + 8, f"step {s1}", (90, 90, 90), 1)
    for k, (name, (steps, means, ses)) in enumerate(series.items()):
        colour = _ARM_COLOURS[k % len(_ARM_COLOURS)]
        light = tuple(255 - (255 - c) // 4 for c in colour)
        for s, m, e in zip(steps, means, ses):  # the band: a vertical bar at each eval step
            xa, ya = to_xy(s, m + e)
            _, yb = to_xy(s, m - e)
            cv.line(xa - 3, ya, xa + 3, ya, light, 2)
            cv.line(xa, ya, xa, yb, light, 3)
            cv.line(xa - 3, yb, xa + 3, yb, light, 2)
        prev = None
        for s, m in zip(steps, means):
            p = to_xy(s, m)
            if prev is not None:
                cv.line(prev[0], prev[1], p[0], p[1], colour, 2)
            prev = p
        ly = y0 + 18 * k
        cv.line(x1 + 14, ly + 4, x1 + 34, ly + 4, colour, 3)
        cv.text(x1 + 40, ly, name, (0, 0, 0), 2)
    write_png(path, cv.rows, cv.w, cv.h)
    return path
