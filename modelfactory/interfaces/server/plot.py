"""A scatter plot as inline SVG, rendered on the server (no script, no CDN).

One point per build: x = decode speed-up (or size / memory ratio), y = perplexity increase in %
(or any other measure: the leaderboard also plots KL divergence from fp16 against the size ratio);
passing builds are green dots, rejected ones red crosses; the best point can be ringed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 48
AXES = {
    "speed": ("decode_speedup", "decode speed-up (gptq / fp16, ×)"),
    "size": ("size_ratio", "disk size ratio (gptq / fp16)"),
    "memory": ("memory_ratio", "memory ratio (gptq / fp16)"),
}


@dataclass(frozen=True, slots=True)
class Point:
    run_id: str
    label: str
    x: float
    y: float
    passed: bool
    best: bool = False


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About *count* round tick values covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0]
    if high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks, value = [], start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


#: The KL divergence plot: x = disk size ratio, y = mean KL divergence from fp16 (``RunRow`` fields).
KLD_AXES = ("size_ratio", "disk size ratio (gptq / fp16)", "kld_mean", "KL divergence from fp16, mean (nats/token)")


def scatter_svg(points: Sequence[Point], *, x_label: str, y_label: str = "perplexity increase (%)",
                title: str = "", y_tip: str = "ppl +{:.3g}%", name: str = "ppl") -> str:
    """The plot as an ``<svg>`` element (points carry ``data-run`` and a ``<title>`` tooltip, in which
    *y_tip* formats the y value; *name* is the svg's ``data-plot``)."""
    if not points:
        return (f'<svg class="plot" data-plot="{escape(name)}" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
                f'width="{WIDTH}" height="{HEIGHT}">'
                f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">no finished builds with these '
                f'metrics</text></svg>')
    xs, ys = [p.x for p in points], [p.y for p in points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(v: float) -> float:
        return LEFT + (v - x0) / ((x1 - x0) or 1) * plot_w

    def sy(v: float) -> float:
        return TOP + plot_h - (v - y0) / ((y1 - y0) or 1) * plot_h

    parts = [(f'<svg class="plot" data-plot="{escape(name)}" role="img" aria-label="{escape(title or y_label)}" '
              f'viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'),
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#999"/>']
    for t in x_ticks:
        parts.append(f'<line x1="{sx(t):.1f}" y1="{TOP}" x2="{sx(t):.1f}" y2="{TOP + plot_h}" stroke="#e3e3e3"/>'
                     f'<text class="tick" x="{sx(t):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{t:g}</text>')
    for t in y_ticks:
        parts.append(f'<line x1="{LEFT}" y1="{sy(t):.1f}" x2="{LEFT + plot_w}" y2="{sy(t):.1f}" stroke="#e3e3e3"/>'
                     f'<text class="tick" x="{LEFT - 6}" y="{sy(t) + 4:.1f}" text-anchor="end">{t:g}</text>')
    parts.append(f'<text class="axis" x="{LEFT + plot_w / 2}" y="{HEIGHT - 10}" text-anchor="middle">'
                 f'{escape(x_label)}</text>')
    parts.append(f'<text class="axis" transform="translate(16 {TOP + plot_h / 2}) rotate(-90)" '
                 f'text-anchor="middle">{escape(y_label)}</text>')
    for p in sorted(points, key=lambda p: p.best):  # the best point is drawn last (on top)
        cx, cy = sx(p.x), sy(p.y)
        tip = (f"<title>{escape(p.label)}: x={p.x:.4g}, {escape(y_tip.format(p.y))} "
               f"({'passed' if p.passed else 'rejected'})</title>")
        run = escape(p.run_id)
        if p.passed:
            parts.append(f'<circle class="point pass" data-run="{run}" cx="{cx:.1f}" cy="{cy:.1f}" r="5" '
                         f'fill="#2e7d32">{tip}</circle>')
        else:
            parts.append(f'<path class="point fail" data-run="{run}" d="M{cx - 4:.1f},{cy - 4:.1f}l8,8m0,-8l-8,8" '
                         f'stroke="#c62828" stroke-width="2">{tip}</path>')
        if p.best:
            parts.append(f'<circle class="best" cx="{cx:.1f}" cy="{cy:.1f}" r="9" fill="none" stroke="#f9a825" '
                         f'stroke-width="2.5"/>')
    parts.append("</svg>")
    return "".join(parts)
