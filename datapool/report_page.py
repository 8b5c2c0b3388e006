"""The report page: one self-contained HTML file (inline SVG charts, thumbnails as data URIs).

Nothing on the page is fetched: no scripts, fonts or stylesheets from the
network, so it opens from the container's output folder, an e-mail or an
air-gapped machine alike. Thumbnails are downscaled JPEGs (:data:`THUMB_SIDE`
pixels, quality 70: about 1-3 kB each) and capped in number
(:data:`MAX_PICK_THUMBS`, :data:`MAX_PAIRS`), so a 10k-candidate run stays
well under 2 MB.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

import pandas as pd
from PIL import Image

from datapool import svg

THUMB_SIDE = 96
MAX_PICK_THUMBS = 240
MAX_PAIRS = 12

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1240px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.sub{color:#555;margin:0 0 12px} .note{color:#666;font-size:12px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:20px} .card span{color:#555;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #eee;background:#fff}
.chart .title{font-weight:600;text-anchor:middle;font-size:13px}
.chart .axis{stroke:#444;fill:none} .chart .grid{stroke:#eee}
.chart .ytick{text-anchor:end;font-size:10px;fill:#555}
.chart .xtick{text-anchor:middle;font-size:10px;fill:#555}
.chart .label{text-anchor:middle;font-size:11px;fill:#333} .chart .legend{font-size:11px}
.chart .rule{stroke:#59a14f;stroke-dasharray:4 3}
.chart .rulelabel{text-anchor:end;font-size:10px;fill:#2d6a27}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:100px;font-size:11px;text-align:center}
figure img,.missing{width:96px;height:96px;object-fit:contain;background:#f4f4f4;display:block}
figcaption{overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.pair{display:flex;align-items:center;gap:6px;border:1px solid #eee;padding:4px;border-radius:6px}
.pair .d{width:70px;text-align:center;font-size:12px}
.pairs{display:flex;flex-wrap:wrap;gap:10px}
table{border-collapse:collapse} td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
"""


def thumbnail_uri(data: bytes | None, side: int = THUMB_SIDE) -> str | None:
    """``data`` (an image file's bytes) as a JPEG data URI at most ``side`` pixels a side,
    or None when it is missing or does not decode."""
    if data is None:
        return None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (side, side))  # JPEGs decode at a fraction of full size
            small = image.convert("RGB")
            small.thumbnail((side, side))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=70)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Thumb:
    """One image on the page: its name, a caption, and its data URI (None: not readable)."""

    name: str
    caption: str
    uri: str | None


@dataclass(frozen=True)
class Pair:
    """A candidate left out as redundant, beside the pool image nearest to it."""

    candidate: Thumb
    pool: Thumb
    distance: float


@dataclass(frozen=True)
class PageData:
    """Everything the page shows (see :func:`render_page`)."""

    title: str
    metrics: dict[str, Any]
    picks: pd.DataFrame  # selection.csv's table
    histogram: pd.DataFrame  # distance, before, after
    labels: pd.DataFrame  # label, rows
    map_points: dict[str, pd.DataFrame]  # pool / new / picked -> pc1, pc2
    thumbs: Sequence[Thumb]
    pairs: Sequence[Pair]
    settings: dict[str, Any]
    evaluated: tuple[int, int]  # candidates measured for histograms/pairs/map, of how many
    min_distance: float


def _figure(thumb: Thumb) -> str:
    tip = escape(thumb.name, quote=True)
    image = (
        f'<img src="{thumb.uri}" alt="{tip}" title="{tip}">'
        if thumb.uri
        else f'<div class="missing" title="{tip}">not readable</div>'
    )
    return f"<figure>{image}<figcaption>{escape(thumb.caption)}</figcaption></figure>"


def _distance(value: Any) -> str:
    return "none (empty pool)" if value is None or not math.isfinite(value) else f"{value:.4g}"


def _cards(metrics: dict[str, Any]) -> str:
    """The headline numbers, in words an ML engineer reads at a glance."""
    pool, cands, sel = metrics["pool"], metrics["candidates"], metrics["selection"]
    cards = [
        (f"{pool['rows_before']} → {pool['rows_after']}", "pool rows (before → after)"),
        (f"{sel['picked']} of {cands['new']}", "new images picked"),
        (str(cands["already_in_pool"]), "candidates already in the pool"),
        (f"{cands['duplicates']} / {cands['corrupt']}", "duplicates / corrupt files skipped"),
        (
            _distance(sel["coverage_radius_before"]),
            "coverage radius before: farthest new image from the pool",
        ),
        (
            _distance(sel["coverage_radius_after"]),
            "coverage radius after (where selection stopped)",
        ),
    ]
    body = "".join(
        f'<div class="card"><b>{escape(v)}</b><span>{escape(k)}</span></div>' for v, k in cards
    )
    return f'<div class="cards">{body}</div>'


def _charts(data: PageData) -> str:
    """The four charts: distance per pick, distance histograms, labels, 2-D map."""
    picks, hist = data.picks, data.histogram
    stop = data.metrics["selection"]["stop_distance"]
    rules = [(stop, f"stopped: next would be {stop:.3g}")] if stop else []
    if data.min_distance:
        rules.append((data.min_distance, f"min_distance {data.min_distance:g}"))
    charts = [
        svg.line_chart(
            "picks",
            list(picks["pick_rank"]),
            list(picks["distance_at_pick"]),
            title="Distance of each pick to the pool and earlier picks",
            x_label="pick rank (order of selection)",
            y_label="distance",
            rules=rules,
        ),
        svg.histogram_chart(
            "nn",
            list(hist["distance"]),
            {"before": list(hist["before"]), "after (picks at 0)": list(hist["after"])},
            title="New images' distance to the nearest pool image",
            x_label="distance to nearest pool image",
            y_label="images",
        ),
        svg.scatter_chart(
            "map",
            {k: (list(v["pc1"]), list(v["pc2"])) for k, v in data.map_points.items()},
            title="2-D map of the embeddings (PCA)",
            x_label="PC 1",
            y_label="PC 2",
        ),
        svg.bar_chart(
            "labels",
            list(data.labels["label"][:40]),
            list(data.labels["rows"][:40]),
            title="Pool rows per label, after the run",
            x_label="label",
            y_label="rows",
        ),
    ]
    return f'<div class="charts">{"".join(charts)}</div>'


def _pairs(pairs: Sequence[Pair]) -> str:
    if not pairs:
        return '<p class="note">No candidate was left out.</p>'
    items = "".join(
        f'<div class="pair">{_figure(p.candidate)}<div class="d">distance<br><b>'
        f"{p.distance:.4g}</b></div>{_figure(p.pool)}</div>"
        for p in pairs
    )
    return f'<div class="pairs">{items}</div>'


def _settings(settings: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{escape(str(k))}</th><td>{escape(str(v))}</td></tr>" for k, v in settings.items()
    )
    return f"<table>{rows}</table>"


def render_page(data: PageData) -> str:
    """The whole page as one HTML string (UTF-8, no external reference)."""
    shown, total = data.evaluated
    sample = "" if shown == total else f" (an even sample of {shown} of the {total} new images)"
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in data.metrics.get("seconds", {}).items())
    n_picks = len(data.picks)
    more = (
        f' <span class="note">(first {len(data.thumbs)} of {n_picks}; all in selection.csv)</span>'
        if len(data.thumbs) < n_picks
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(data.title)}</title><style>{CSS}</style></head><body>
<h1>{escape(data.title)}</h1>
<p class="sub">Greedy k-center picked the new images farthest from the pool and from each
other, until the stopping condition. Distances are Euclidean between embeddings
(0&ndash;2 on unit vectors).</p>
{_cards(data.metrics)}
<h2>Plots</h2>
<p class="note">Red: this run's picks and the distances after it; grey: the pool before the
run; blue: new images not picked. Histograms and map: {shown} new images{escape(sample)}.</p>
{_charts(data)}
<h2>Picks in order{more}</h2>
<div class="thumbs">{"".join(_figure(t) for t in data.thumbs)}</div>
<h2>Closest images left out as redundant</h2>
<p class="note">Left: a new image not picked. Right: the pool image (after the run) nearest
to it, which made it redundant.</p>
{_pairs(data.pairs)}
<h2>Settings</h2>
{_settings(data.settings)}
<p class="note">Stage times (their latest run): {escape(seconds) or "not recorded"}.</p>
</body></html>
"""
