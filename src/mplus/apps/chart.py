"""A dependency-free SVG line chart, enough for a retention curve (no plotting library at run time)."""
from __future__ import annotations

import math
from pathlib import Path

from mplus.formats.atomic import atomic_write_text

COLOURS = ("#d62728", "#1f77b4", "#17becf", "#2ca02c", "#7f7f7f", "#9467bd")


def _ticks(hi: float, log: bool) -> list[float]:
    if log:
        return [0.0] + [10.0 ** e for e in range(0, int(math.log10(max(hi, 1))) + 1)]
    step = 10 ** math.floor(math.log10(max(hi, 1e-9)))
    return [i * step for i in range(int(hi // step) + 1)]


def line_chart(series: dict[str, list[tuple[float, float]]], path: str | Path, *, title: str, x_label: str,
               y_label: str, log_x: bool = True, markers: dict[str, float] | None = None, width: int = 720,
               height: int = 400) -> None:
    """Write series {name: [(x, y), ...]} as an SVG; y in [0, 1]; log_x uses log10(1 + x) so 0 fits.
    markers {label: x}: dashed vertical lines, labelled at the top (e.g. where a memory's rows expire)."""
    left, right, top, bottom = 60, 170, 40, 50
    markers = markers or {}
    x_hi = max([x for pts in series.values() for x, _ in pts] + list(markers.values()))
    fx = (lambda x: math.log10(1 + x)) if log_x else (lambda x: x)
    sx = lambda x: left + (width - left - right) * fx(x) / max(fx(x_hi), 1e-9)  # noqa: E731
    sy = lambda y: top + (height - top - bottom) * (1 - y)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>']
    for y in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    for x in _ticks(x_hi, log_x):
        if x <= x_hi:
            out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{height - bottom}" stroke="#eee"/>'
                       f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:g}</text>')
    out.append(f'<text x="{(left + width - right) / 2}" y="{height - 12}" text-anchor="middle">{x_label}</text>'
               f'<text x="16" y="{(top + height - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(top + height - bottom) / 2})">{y_label}</text>')
    for label, x in markers.items():
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{height - bottom}" stroke="black" '
                   f'stroke-dasharray="5,4"/><text x="{sx(x) - 4:.1f}" y="{top + 12}" text-anchor="end" '
                   f'font-size="11">{label}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in pts]
        ly = top + 10 + 20 * i
        out.append(f'<line x1="{width - right + 12}" x2="{width - right + 32}" y1="{ly}" y2="{ly}" stroke="{colour}" '
                   f'stroke-width="2"/><text x="{width - right + 38}" y="{ly + 4}">{name}</text>')
    out.append("</svg>")
    atomic_write_text(Path(path), "\n".join(out) + "\n")
