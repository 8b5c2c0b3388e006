"""The numbers and plot data of one increment, for ``dvc metrics`` / ``dvc plots`` and the report.

Pure functions of the tables an increment already has (the pool before, the
candidates, the picks); :mod:`datapool.report` reads and writes the files.

Distances are Euclidean between embeddings. Two kinds come from different places:

* The exact ones come from the selection engine (:class:`datapool.increment.Choice`):
  the coverage radius of the batch by the pool *before* the run is the first
  pick's distance (every candidate is at most that far from the pool, or it
  would have been picked first), and *after* it is ``next_distance``.
* The histograms, the redundant pairs and the 2-D map come from
  :func:`datapool.selection.nearest` over the *evaluated* candidates: all of
  them up to :func:`evaluated_limit`, an evenly spaced sample of that many
  above. Each call is one pass of them over the pool (a matrix product), so
  the limit keeps candidates x pool rows near :data:`PAIR_BUDGET` (about 10 s
  on a loaded 2-core machine): 20,000 candidates against a pool of up to 10k
  rows, 1,000 (the floor: still a smooth histogram) against 200k rows and more.
  The exact metrics never depend on the sample; the redundant pairs are the
  closest among the evaluated candidates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from datapool.pool import embeddings_of

# Candidates whose nearest-neighbour distances the report measures (see module doc):
# at most EVALUATED_LIMIT, at least EVALUATED_FLOOR, else PAIR_BUDGET / pool rows.
EVALUATED_LIMIT = 20_000
EVALUATED_FLOOR = 1_000
PAIR_BUDGET = 200_000_000
# Points of the 2-D map per group (pool / new / picked): more only blur the picture.
MAP_LIMIT = 2_000
HISTOGRAM_BINS = 30
STAGES = ("inbox", "select_inputs", "embed", "sample", "merge")


def evaluated_limit(pool_rows: int) -> int:
    """How many candidates to measure against a pool of ``pool_rows`` (module docstring)."""
    return max(EVALUATED_FLOOR, min(EVALUATED_LIMIT, PAIR_BUDGET // max(pool_rows, 1)))


def evaluated_rows(n: int, limit: int = EVALUATED_LIMIT) -> npt.NDArray[np.int64]:
    """Rows ``0..n-1`` when ``n <= limit``, else ``limit`` evenly spaced ones (first and last
    included): deterministic, so a re-run reports the same sample."""
    if n <= limit:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


@dataclass(frozen=True)
class Neighbours:
    """Nearest-neighbour distances of the evaluated fresh candidates.

    Attributes:
        rows: int64 ``[k]``, rows of the fresh candidates evaluated.
        before: float64 ``[k]``, distance to the nearest row of the pool before
            the run (``inf`` for an empty pool).
        after: float64 ``[k]``, distance to the nearest row of the pool after it
            (the pool before plus the picks; 0 for a pick).
        after_index: int64 ``[k]``, that nearest row in ``pool before + picks``
            order: ``< len(pool before)`` is a pool row, the rest are picks in pick order.
    """

    rows: npt.NDArray[np.int64]
    before: npt.NDArray[np.float64]
    after: npt.NDArray[np.float64]
    after_index: npt.NDArray[np.int64]


def neighbours(
    fresh: npt.NDArray[np.floating[Any]],
    prior: npt.NDArray[np.floating[Any]] | None,
    picked: npt.NDArray[np.floating[Any]],
    *,
    limit: int | None = None,
) -> Neighbours:
    """:class:`Neighbours` of the candidates ``fresh`` ``[n, d]`` given the pool before the
    run ``prior`` ``[m, d]`` (None when empty) and the picks ``picked`` ``[k, d]``.

    One pass over the pool and one over the picks (``after`` is the smaller of the
    two). ``limit``: candidates measured, default :func:`evaluated_limit` of the pool.
    """
    from datapool.selection import nearest

    if limit is None:
        limit = evaluated_limit(0 if prior is None else len(prior))
    rows = evaluated_rows(len(fresh), limit)
    if len(rows) == 0:
        empty = np.zeros(0)
        return Neighbours(rows, empty, empty, np.zeros(0, dtype=np.int64))
    queries = fresh[rows]
    m = 0 if prior is None else len(prior)
    if prior is None or m == 0:
        before = np.full(len(rows), np.inf)
        before_index = np.full(len(rows), -1, dtype=np.int64)
    else:
        near = nearest(queries, prior)
        before, before_index = near.distances, near.indices
    to_picks = nearest(queries, picked)
    closer = to_picks.distances < before
    after = np.where(closer, to_picks.distances, before)
    index = np.where(closer, to_picks.indices + m, before_index)
    return Neighbours(rows, before, after.astype(np.float64), index.astype(np.int64))


def finite_or_none(value: float) -> float | None:
    """A distance for JSON, to 6 decimals (float32 embeddings hold no more); JSON has no
    infinity, so ``inf`` (distance to an empty pool) becomes ``null``, as does NaN."""
    return None if math.isinf(value) or math.isnan(value) else round(float(value), 6)


def coverage_before(picks: pd.DataFrame, *, next_distance: float, prior_rows: int) -> float:
    """Largest distance from a fresh candidate to its nearest row of the pool before the run.

    The first pick is the farthest candidate, so its distance is that radius; with
    no pick it is ``next_distance``. ``inf`` when the pool was empty and a candidate
    existed (``pick_distance`` is ``inf`` then).
    """
    if len(picks):
        return float(picks["pick_distance"].iloc[0])
    return math.inf if prior_rows == 0 and next_distance > 0 else next_distance


def run_metrics(
    *,
    rows_before: int,
    rows_after: int,
    candidates: int,
    fresh: int,
    picks: pd.DataFrame,
    next_distance: float,
    duplicates: int,
    corrupt: int,
    seconds: dict[str, float],
) -> dict[str, Any]:
    """``metrics.json``: counts, distances (Euclidean, ``null`` = infinite) and seconds per stage.

    ``rows_before`` is the pool this increment starts from (without rows an earlier
    run of the same increment added), so a redo reports the same numbers.
    """
    radius = coverage_before(picks, next_distance=next_distance, prior_rows=rows_before)
    last = float(picks["pick_distance"].iloc[-1]) if len(picks) else math.nan
    return {
        "pool": {
            "rows_before": rows_before,
            "rows_after": rows_after,
            "added": rows_after - rows_before,
        },
        "candidates": {
            "decoded": candidates,
            "new": fresh,
            "already_in_pool": candidates - fresh,
            "duplicates": duplicates,
            "corrupt": corrupt,
        },
        "selection": {
            "picked": len(picks),
            "last_pick_distance": finite_or_none(last),
            "stop_distance": finite_or_none(next_distance),
            "coverage_radius_before": finite_or_none(radius),
            "coverage_radius_after": finite_or_none(next_distance),
        },
        "seconds": {stage: round(seconds[stage], 3) for stage in STAGES if stage in seconds},
    }


def histogram(near: Neighbours, bins: int = HISTOGRAM_BINS) -> pd.DataFrame:
    """Counts of the evaluated candidates' distances to the pool before and after, on shared bins.

    Columns ``distance`` (bin centre), ``before``, ``after``. Infinite distances (an
    empty pool before) are left out of ``before``. Picks (distance 0 after) are counted.
    """
    finite = np.concatenate([near.before[np.isfinite(near.before)], near.after])
    top = float(finite.max()) if len(finite) else 1.0
    edges = np.linspace(0.0, top if top > 0 else 1.0, bins + 1)
    before, _ = np.histogram(near.before[np.isfinite(near.before)], bins=edges)
    after, _ = np.histogram(near.after, bins=edges)
    centres = (edges[:-1] + edges[1:]) / 2
    return pd.DataFrame({"distance": centres.round(6), "before": before, "after": after})


def label_counts(pool: pd.DataFrame) -> pd.DataFrame:
    """Rows per label in ``pool`` (``labels`` column; ``""`` shown as ``(none)``), most first."""
    labels = pool["labels"].astype(str).replace("", "(none)") if len(pool) else pd.Series([])
    counts = labels.value_counts(sort=False)
    table = pd.DataFrame({"label": counts.index.astype(str), "rows": counts.to_numpy()})
    return table.sort_values(["rows", "label"], ascending=[False, True], ignore_index=True)


def pca_map(
    groups: dict[str, npt.NDArray[np.floating[Any]]], limit: int = MAP_LIMIT
) -> dict[str, pd.DataFrame]:
    """A 2-D map of each group of embeddings (``{name: [n, d]}``) by one PCA of all of them.

    Each group is thinned to ``limit`` evenly spaced rows first. The axes are the
    two principal components, signs fixed so the largest loading is positive (a
    re-run draws the same map). Returns ``{name: DataFrame(pc1, pc2)}``.
    """
    thinned = {k: v[evaluated_rows(len(v), limit)].astype(np.float64) for k, v in groups.items()}
    stacked = [v for v in thinned.values() if len(v)]
    if not stacked:
        return {k: pd.DataFrame({"pc1": [], "pc2": []}) for k in groups}
    everything = np.concatenate(stacked)
    centre = everything.mean(axis=0)
    # Eigenvectors of the d x d covariance: O(n d^2), and quicker than an SVD of the n x d data.
    centred = everything - centre
    _, vectors = np.linalg.eigh(centred.T @ centred)
    axes = np.zeros((2, everything.shape[1]))
    top = vectors[:, ::-1][:, :2].T  # eigh sorts ascending
    axes[: len(top)] = top
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
    axes *= np.where(signs == 0, 1.0, signs)[:, None]
    out = {}
    for name, values in thinned.items():
        xy = (values - centre) @ axes.T if len(values) else np.zeros((0, 2))
        out[name] = pd.DataFrame({"pc1": xy[:, 0].round(5), "pc2": xy[:, 1].round(5)})
    return out


def selection_table(picks: pd.DataFrame) -> pd.DataFrame:
    """``selection.csv``: every pick in pick order with its distance and one score per strategy.

    Columns ``pick_rank``, ``filename``, ``distance_at_pick`` (``inf`` for the first pick
    into an empty pool), ``score_diversity`` (the distance at pick: what diversity
    maximises) and, after it, the picks' other ``score_<strategy>`` columns as ``sample``
    wrote them (``score_typicality``, ``score_weights:uncertainty``...: each objective
    normalised to (0, 1] when the row was picked; empty for pre-selected rows), so a
    cut-off can be moved on any of them.
    """
    table = pd.DataFrame(
        {
            "pick_rank": picks["pick_rank"].astype(int).to_numpy(),
            "filename": picks["filenames"].astype(str).to_numpy(),
            "distance_at_pick": picks["pick_distance"].astype(float).to_numpy(),
            "score_diversity": picks["pick_distance"].astype(float).to_numpy(),
        }
    )
    for column in picks.columns:
        if column.startswith("score_") and column != "score_diversity":
            table[column] = picks[column].astype(float).to_numpy()
    return table


def fresh_embeddings(fresh: pd.DataFrame) -> npt.NDArray[np.float32]:
    """The fresh candidates' embeddings ``[n, d]`` (float32), ``[0, 0]`` when there are none."""
    return embeddings_of(fresh) if len(fresh) else np.zeros((0, 0), dtype=np.float32)


def write_seconds(folder: Path | None, stage: str, seconds: float) -> None:
    """Record that ``stage`` took ``seconds`` in ``folder/STAGE.json`` (nothing when None).

    Kept out of the stages' DVC outputs: a timing differs on every run, and in an
    output it would make the next stage re-run when nothing else changed.
    """
    if folder is None:
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage}.json").write_text(json.dumps({"seconds": seconds}) + "\n", encoding="utf-8")


def read_seconds(folder: Path) -> dict[str, float]:
    """``{stage: seconds}`` of the stages :func:`write_seconds` recorded in ``folder``
    (their latest run); unreadable or missing records are left out."""
    seconds = {}
    for stage in STAGES:
        try:
            value = json.loads((folder / f"{stage}.json").read_text(encoding="utf-8"))["seconds"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(value, int | float):
            seconds[stage] = float(value)
    return seconds
