"""Charts as inline SVG, drawn on the server: no script, no style attributes (the CSP allows
neither), readable without JavaScript and in a screenshot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from markupsafe import Markup

PALETTE = (
    "#1f5fa8", "#d9822b", "#2e8b57", "#b3261e", "#7a4fb3",
    "#00838f", "#a86400", "#5d6d7e", "#c2185b", "#558b2f",
)  # fmt: skip


def colours(names: Sequence[str]) -> dict[str, str]:
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}


def _nice_max(n: int) -> int:
    for mag in range(0, 12):
        for step in (1, 2, 5):
            top = step * 10**mag
            if top >= n:
                return top
    return n


def per_day(days: Sequence[Mapping[str, Any]], palette: Mapping[str, str]) -> Markup:
    """Stacked bars: events per day, one colour per source."""
    w, h, left, bottom, top = 760, 220, 40, 28, 10
    n = max(len(days), 1)
    totals = [sum(d["by_source"].values()) for d in days]
    peak = _nice_max(max(totals, default=0) or 1)
    bw = (w - left - 10) / n
    plot_h = h - bottom - top
    parts = [
        f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="events per day by source">'
    ]
    for frac in (0, 0.5, 1):
        y = top + plot_h * (1 - frac)
        parts.append(
            f'<line x1="{left}" x2="{w - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#666">{int(peak * frac)}</text>'
        )
    for i, d in enumerate(days):
        x = left + i * bw
        y = top + plot_h
        for source, count in sorted(d["by_source"].items()):
            bh = plot_h * count / peak
            y -= bh
            parts.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(bw - 2, 1):.1f}" '
                f'height="{bh:.1f}" fill="{palette.get(source, "#999")}">'
                f"<title>{escape(d['day'])} {escape(source)}: {count}</title></rect>"
            )
        if i % max(n // 6, 1) == 0 or i == n - 1:
            parts.append(
                f'<text x="{x + bw / 2:.1f}" y="{h - 10}" text-anchor="middle" font-size="11" '
                f'fill="#666">{escape(d["day"][5:])}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def per_hour(hours: Sequence[int]) -> Markup:
    """24 bars: when in the day feedback was given (local time)."""
    w, h, bottom = 360, 90, 16
    peak = max(max(hours, default=0), 1)
    bw = w / 24
    parts = [
        f'<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" '
        f'aria-label="events by hour of day">'
    ]
    for i, n in enumerate(hours):
        bh = (h - bottom - 4) * n / peak
        parts.append(
            f'<rect x="{i * bw + 1:.1f}" y="{h - bottom - bh:.1f}" width="{bw - 2:.1f}" '
            f'height="{bh:.1f}" fill="#1f5fa8"><title>{i:02d}:00: {n}</title></rect>'
        )
        if i % 6 == 0:
            parts.append(
                f'<text x="{i * bw + 1:.1f}" y="{h - 3}" font-size="10" fill="#666">{i:02d}</text>'
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def share_bar(share: float, colour: str = "#1f5fa8") -> Markup:
    """A small horizontal bar for a share in [0, 1]."""
    width = max(0.0, min(share, 1.0)) * 120
    return Markup(
        '<svg class="bar" width="120" height="10" aria-hidden="true">'
        '<rect width="120" height="10" fill="#eee"/>'
        f'<rect width="{width:.1f}" height="10" fill="{escape(colour)}"/></svg>'
    )
