"""The files people look at after an increment, written by the ``merge`` stage.

Into the report folder (``work/NAME/report``, :data:`datapool.layout.REPORT_FILES`):
Lightly's lists (``sampled_filenames.txt`` in pick order, ``removed_filenames.txt``,
``duplicate_filenames.txt`` and ``corrupt_filenames.txt`` with the reasons in the
JSON of the same name), ``selection.csv`` and ``report.html``. Beside it:
``metrics.json`` (DVC metrics) and the plot CSVs (DVC plots,
:data:`datapool.layout.PLOT_FILES`). Numbers and plot data come from
:mod:`datapool.metrics`, the page from :mod:`datapool.report_page`.

Written by ``merge`` rather than a stage of its own because merge already holds
every input (pool before and after, candidates, picks) and a new stage script
would have to be copied into every workspace.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from datapool import metrics as m
from datapool.errors import PoolError
from datapool.layout import PLOT_FILES, REPORT_FILES
from datapool.packs import read_image
from datapool.pool import embeddings_of
from datapool.report_page import (
    MAX_PAIRS,
    MAX_PICK_THUMBS,
    PageData,
    Pair,
    Thumb,
    render_page,
    thumbnail_uri,
)


@dataclass(frozen=True)
class RunFacts:
    """What one increment did, as ``merge`` knows it.

    Attributes:
        pool_dir: the pool folder (for the pool's stored images).
        prior: the pool before the run, without rows an earlier run of this
            increment added (None: no pool yet).
        after: the pool after the run.
        candidates: every decoded candidate of the batch (embeddings, source, ...).
        fresh: the candidates not already in the pool, as ``sample`` chose among them.
        picks: the picks in pick order (:data:`datapool.increment.PICK_COLUMNS`).
        next_distance: :attr:`datapool.increment.Choice.next_distance`.
        corrupt: ``{entry: reason}``; duplicates: ``{copy: the file it repeats}``.
        seconds: ``{stage: seconds}`` of the stages' latest runs.
        settings: what the run used, ``{name: value}`` (shown on the page).
    """

    pool_dir: Path
    prior: pd.DataFrame | None
    after: pd.DataFrame
    candidates: pd.DataFrame
    fresh: pd.DataFrame
    picks: pd.DataFrame
    next_distance: float
    corrupt: dict[str, str]
    duplicates: dict[str, str]
    seconds: dict[str, float]
    settings: dict[str, Any]


def pool_image_bytes(pool_dir: Path, row: pd.Series) -> bytes | None:
    """The bytes of a pool row's image, or None if it cannot be read (the page then says so:
    a missing thumbnail must not fail the run).

    The one place the report reads a pool image (the pool's own copy, in its
    batch's pack, else the original file), checked against the row's content hash.
    """
    try:
        return read_image(pool_dir, row)
    except (OSError, PoolError):
        return None


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def write_lists(facts: RunFacts, folder: Path) -> None:
    """Lightly's four lists (one name a line) and the reasons beside two of them."""
    picked = [str(f) for f in facts.picks["filenames"]]
    removed = sorted(set(map(str, facts.candidates["filenames"])) - set(picked))
    lists = {
        "sampled": picked,
        "removed": removed,
        "duplicates": sorted(facts.duplicates),
        "corrupt": sorted(facts.corrupt),
    }
    for role, names in lists.items():
        text = "".join(f"{name}\n" for name in names)
        (folder / REPORT_FILES[role]).write_text(text, encoding="utf-8")
    for role, reasons in (
        ("corrupt_reasons", facts.corrupt),
        ("duplicate_reasons", facts.duplicates),
    ):
        text = json.dumps(dict(sorted(reasons.items())), indent=2, ensure_ascii=False) + "\n"
        (folder / REPORT_FILES[role]).write_text(text, encoding="utf-8")


def _centres(facts: RunFacts) -> pd.DataFrame:
    """The pool after the run in :class:`datapool.metrics.Neighbours` order: prior, then picks."""
    by_hash = facts.fresh.set_index("content_hash", drop=False)
    picked = by_hash.loc[list(facts.picks["content_hash"])].reset_index(drop=True)
    columns = ["filenames", "content_hash", "batch_id", "source"]
    parts = [p[columns] for p in (facts.prior, picked) if p is not None and len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)


def redundant_pairs(facts: RunFacts, near: m.Neighbours, limit: int = MAX_PAIRS) -> list[Pair]:
    """The ``limit`` evaluated candidates not picked that are closest to the pool after the run,
    each beside that nearest pool image (thumbnails)."""
    picked = set(map(str, facts.picks["content_hash"]))
    hashes = facts.fresh["content_hash"].astype(str).to_numpy()[near.rows]
    left_out = np.flatnonzero(~np.isin(hashes, list(picked)) & (near.after_index >= 0))
    order = left_out[np.argsort(near.after[left_out], kind="stable")][:limit]
    centres = _centres(facts)
    pairs = []
    for i in order:
        cand = facts.fresh.iloc[int(near.rows[i])]
        pool_row = centres.iloc[int(near.after_index[i])]
        cand_bytes = _read(Path(str(cand["source"])) / str(cand["filenames"]))
        pairs.append(
            Pair(
                candidate=Thumb(
                    str(cand["filenames"]), str(cand["filenames"]), thumbnail_uri(cand_bytes)
                ),
                pool=Thumb(
                    str(pool_row["filenames"]),
                    str(pool_row["filenames"]),
                    thumbnail_uri(pool_image_bytes(facts.pool_dir, pool_row)),
                ),
                distance=float(near.after[i]),
            )
        )
    return pairs


def pick_thumbs(facts: RunFacts, limit: int = MAX_PICK_THUMBS) -> list[Thumb]:
    """Thumbnails of the first ``limit`` picks in pick order, captioned ``#rank name``."""
    by_hash = facts.fresh.set_index("content_hash", drop=False)
    thumbs = []
    for _, pick in facts.picks.head(limit).iterrows():
        row = by_hash.loc[pick["content_hash"]]
        data = _read(Path(str(row["source"])) / str(row["filenames"]))
        caption = f"#{int(pick['pick_rank'])} {pick['filenames']}"
        thumbs.append(Thumb(str(pick["filenames"]), caption, thumbnail_uri(data)))
    return thumbs


def write_run_report(
    facts: RunFacts, *, report_dir: Path, metrics_file: Path, plots_dir: Path
) -> dict[str, Any]:
    """Write every file of the module docstring; return the metrics written."""
    for folder in (report_dir, plots_dir, metrics_file.parent):
        folder.mkdir(parents=True, exist_ok=True)
    write_lists(facts, report_dir)
    selection = m.selection_table(facts.picks)
    selection.to_csv(report_dir / REPORT_FILES["selection"], index=False)
    numbers = run_numbers(facts)
    metrics_file.write_text(json.dumps(numbers, indent=2) + "\n", encoding="utf-8")
    fresh = m.fresh_embeddings(facts.fresh)
    prior = embeddings_of(facts.prior) if facts.prior is not None and len(facts.prior) else None
    # The picks' rows of `fresh`, in pick order (Neighbours.after_index counts them so).
    pick_rows = pd.Index(facts.fresh["content_hash"]).get_indexer(
        pd.Index(facts.picks["content_hash"])
    )
    near = m.neighbours(fresh, prior, fresh[pick_rows])
    plots = _plot_tables(facts, selection, near, prior, fresh)
    for role, table in plots.items():
        table.to_csv(plots_dir / PLOT_FILES[role], index=False)
    page = _page_data(facts, numbers, selection, plots, near)
    (report_dir / REPORT_FILES["html"]).write_text(render_page(page), encoding="utf-8")
    return numbers


def run_numbers(facts: RunFacts) -> dict[str, Any]:
    """``metrics.json`` of the run (:func:`datapool.metrics.run_metrics`)."""
    return m.run_metrics(
        rows_before=0 if facts.prior is None else len(facts.prior),
        rows_after=len(facts.after),
        candidates=len(facts.candidates),
        fresh=len(facts.fresh),
        picks=facts.picks,
        next_distance=facts.next_distance,
        duplicates=len(facts.duplicates),
        corrupt=len(facts.corrupt),
        seconds=facts.seconds,
    )


def _page_data(
    facts: RunFacts,
    numbers: dict[str, Any],
    selection: pd.DataFrame,
    plots: dict[str, pd.DataFrame],
    near: m.Neighbours,
) -> PageData:
    """What the page shows: the numbers, plot tables, thumbnails and settings."""
    return PageData(
        title=f"datapool: {facts.pool_dir.name} grew by {len(facts.picks)} images",
        metrics=numbers,
        picks=selection,
        histogram=plots["nn"],
        labels=plots["labels"],
        map_points={  # drawn in this order: the many new points under the pool and picks
            "new, not picked": plots["map_new"],
            "pool before": plots["map_pool"],
            "picked": plots["map_picked"],
        },
        thumbs=pick_thumbs(facts),
        pairs=redundant_pairs(facts, near),
        settings=facts.settings,
        evaluated=(len(near.rows), len(facts.fresh)),
        min_distance=float(facts.settings.get("stopping_condition.min_distance", 0.0) or 0.0),
    )


def _plot_tables(
    facts: RunFacts,
    selection: pd.DataFrame,
    near: m.Neighbours,
    prior: np.ndarray | None,
    fresh: np.ndarray,
) -> dict[str, pd.DataFrame]:
    """Every CSV of :data:`datapool.layout.PLOT_FILES`, by role."""
    is_pick = facts.fresh["content_hash"].isin(facts.picks["content_hash"]).to_numpy()
    dim = fresh.shape[1] if fresh.size else (prior.shape[1] if prior is not None else 0)
    empty = np.zeros((0, dim), dtype=np.float32)
    points = m.pca_map(
        {
            "pool": prior if prior is not None else empty,
            "new": fresh[~is_pick] if fresh.size else empty,
            "picked": fresh[is_pick] if fresh.size else empty,
        }
    )
    finite = selection[np.isfinite(selection["distance_at_pick"])]
    return {
        "picks": finite[["pick_rank", "distance_at_pick"]].rename(
            columns={"distance_at_pick": "distance"}
        ),
        "nn": m.histogram(near),
        "labels": m.label_counts(facts.after),
        "map_pool": points["pool"],
        "map_new": points["new"],
        "map_picked": points["picked"],
    }
