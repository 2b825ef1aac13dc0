"""A scatter plot as inline SVG, rendered on the server (no script, no CDN).

One point per build: x = decode speed-up (or size / memory ratio), y = perplexity increase in %
(or any other measure: the leaderboard also plots KL divergence from fp16 against the size ratio);
passing builds are green dots, rejected ones red crosses; the best point can be ringed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup

from modelfactory.interfaces.server.html import TEMPLATES

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


@dataclass(frozen=True, slots=True)
class Tick:
    at: float  # pixel position along its axis
    label: str


@dataclass(frozen=True, slots=True)
class Placed:
    """A point at its pixel position, with the tooltip text of its y value."""

    point: Point
    cx: float
    cy: float
    y_tip: str


def scatter_svg(points: Sequence[Point], *, x_label: str, y_label: str = "perplexity increase (%)",
                title: str = "", y_tip: str = "ppl +{:.3g}%", name: str = "ppl") -> Markup:
    """The plot as an ``<svg>`` element (points carry ``data-run`` and a ``<title>`` tooltip, in which
    *y_tip* formats the y value; *name* is the svg's ``data-plot``): the scales here, the markup in
    ``templates/plot.svg``."""
    frame = {"name": name, "title": title, "x_label": x_label, "y_label": y_label, "width": WIDTH, "height": HEIGHT,
             "left": LEFT, "top": TOP, "plot_w": WIDTH - LEFT - RIGHT, "plot_h": HEIGHT - TOP - BOTTOM}
    if not points:
        return Markup(TEMPLATES.get_template("plot.svg").render(points=[], **frame))
    xs, ys = [p.x for p in points], [p.y for p in points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(0.0, min(ys)), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = frame["plot_w"], frame["plot_h"]

    def sx(v: float) -> float:
        return LEFT + (v - x0) / ((x1 - x0) or 1) * plot_w

    def sy(v: float) -> float:
        return TOP + plot_h - (v - y0) / ((y1 - y0) or 1) * plot_h

    placed = [Placed(point=p, cx=sx(p.x), cy=sy(p.y), y_tip=y_tip.format(p.y))
              for p in sorted(points, key=lambda p: p.best)]  # the best point is drawn last (on top)
    return Markup(TEMPLATES.get_template("plot.svg").render(
        points=placed, x_ticks=[Tick(sx(t), f"{t:g}") for t in x_ticks],
        y_ticks=[Tick(sy(t), f"{t:g}") for t in y_ticks], **frame))
