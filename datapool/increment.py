"""One increment of the pool: choose among a batch's candidates, then fold the picks in.

Both steps are idempotent per batch: rows of the pool that the current batch
added earlier are ignored when choosing and replaced when merging, so re-running
an increment (``dvc repro -f``, a changed stopping condition) redoes it rather
than stacking a second copy on top. Which rows are "the current batch's" is
decided by :func:`batch_identity`: only the latest increment (the one the pool's
manifest records) can be redone; an inbox identical to an earlier one is a new
increment. Every other row is kept as the user left
it: labels they edited, columns they added; a redo keeps those of the rows it
picks again too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from datapool.errors import InputError, PoolError
from datapool.pool import (
    EXTRA_COLUMNS,
    column_order,
    embedding_columns,
    embedding_dim,
    embeddings_of,
)

CANDIDATE_COLUMNS = ("content_hash", "batch_id", "model_id", "source")
PICK_COLUMNS = ("filenames", "content_hash", "pick_rank", "pick_distance")

if TYPE_CHECKING:  # torch stays unimported until a selection runs
    from datapool.distributed import World


@dataclass(frozen=True)
class StoppingCondition:
    """When to stop picking: after ``n_samples`` picks (0 = no limit), or after
    ``proportion_samples`` of the new candidates (0-1, 0 = off; at most one of the
    two), or once the farthest remaining candidate is closer than ``min_distance``
    (0 = no threshold; Euclidean, on unit vectors so 0..2). At least one must be active."""

    n_samples: int
    min_distance: float
    proportion_samples: float = 0.0

    def __post_init__(self) -> None:
        if self.n_samples < 0:
            raise InputError(f"stopping_condition.n_samples must be >= 0, got {self.n_samples}")
        if math.isnan(self.min_distance) or self.min_distance < 0:
            raise InputError(
                f"stopping_condition.min_distance must be a number >= 0 (0 disables it), "
                f"got {self.min_distance}"
            )
        p = self.proportion_samples
        if math.isnan(p) or not 0 <= p <= 1:
            raise InputError(
                f"stopping_condition.proportion_samples must be in [0, 1] (0 disables it), got {p}"
            )
        if self.n_samples and p:
            raise InputError(
                "set stopping_condition.n_samples or stopping_condition.proportion_samples, "
                f"not both (got {self.n_samples} and {p})"
            )
        if self.n_samples == 0 and p == 0 and self.min_distance == 0:
            raise InputError(
                "set stopping_condition.n_samples > 0 (or proportion_samples > 0) or "
                "stopping_condition.min_distance > 0; with neither, selection would never stop"
            )

    def count(self, fresh: int) -> int | None:
        """Picks allowed among ``fresh`` new candidates: ``n_samples``, or
        ``ceil(proportion_samples * fresh)``, or None (no limit: min_distance decides).

        The product is rounded to 9 decimals first, so ``0.3 * 10`` is 3 picks, not 4.
        """
        if self.n_samples:
            return self.n_samples
        if self.proportion_samples:
            return math.ceil(round(self.proportion_samples * fresh, 9))
        return None


@dataclass(frozen=True)
class SelectionInputs:
    """What selection reads besides the embeddings (issue 11; ``selection`` in params.yaml).

    The default is plain diversity: greedy k-center on the exact fast engine,
    the picks of every datapool version before strategies existed.

    Attributes:
        strategies: :class:`datapool.strategies.StrategyConfig` entries (from
            :func:`datapool.strategies.parse_strategies`); empty = plain diversity.
        scores_file: per-file scores and metadata (CSV keyed by ``filenames``).
        relevant_file: only the files it lists are candidates.
        masked_file, selected_file: masked / pre-selected files (a name list, or a
            CSV with a ``masked`` / ``selected`` column).
        queries: float32 ``[Q, d]`` query embeddings, for SIMILARITY.
        seed: typicality's reference sample (used above 10,000 candidates).
    """

    strategies: tuple[Any, ...] = ()
    scores_file: Path | None = None
    relevant_file: Path | None = None
    masked_file: Path | None = None
    selected_file: Path | None = None
    queries: npt.NDArray[np.float32] | None = None
    seed: int = 0


def batch_of(candidates: pd.DataFrame) -> str:
    """The batch id shared by every candidate row; PoolError if rows disagree."""
    ids = candidates["batch_id"].unique()
    if len(ids) != 1:
        raise PoolError(f"candidates must come from one batch, found batch ids {sorted(ids)}")
    return str(ids[0])


def batch_identity(*, content_id: str, pool: pd.DataFrame | None, latest: str = "") -> str:
    """The batch id of an increment whose inbox content is named ``content_id``.

    An increment's rows are replaced when it runs again, so the id decides what a
    run may overwrite. The latest increment's id when it had this content (the
    same increment run again: ``dvc repro -f``, a changed stopping condition);
    else ``content_id`` itself when no row of the pool came from that content;
    otherwise, when an earlier increment had identical content, a new id
    ``content_id-N``, so that increment's rows are left alone and its images not
    picked then can be now.

    ``latest`` is the batch id of the increment that wrote the pool's current
    version, as its manifest records it (:attr:`datapool.store.Manifest.latest_batch`,
    written in the same transaction as the rows). It is right even when that
    increment picked nothing or the rows were reordered. Pools whose manifest
    does not record one (combined, imported, migrated from the CSV layout) fall
    back to the batch of the pool's last row, where ``merge`` appends each increment.
    """
    if not latest and pool is not None and not pool.empty:
        latest = str(pool["batch_id"].iloc[-1])
    if latest and _content_of(latest) == content_id:
        return latest
    ids: list[str] = [] if pool is None else [str(b) for b in pool["batch_id"].unique()]
    same = {b for b in ids if _content_of(b) == content_id}
    if not same:
        return content_id
    repeats = [int(b.rpartition("-")[2]) if b != content_id else 1 for b in same]
    return f"{content_id}-{max(repeats) + 1}"


def _content_of(batch_id: str) -> str:
    """``"abc-3"`` -> ``"abc"``: the content part of a :func:`batch_identity` id."""
    head, dash, tail = batch_id.rpartition("-")
    return head if dash and tail.isdigit() else batch_id


def prior_rows(pool: pd.DataFrame | None, batch_id: str) -> pd.DataFrame | None:
    """The pool without the rows ``batch_id`` added earlier (None if there is no pool)."""
    if pool is None:
        return None
    return pool[pool["batch_id"] != batch_id].reset_index(drop=True)


def check_compatible(prior: pd.DataFrame | None, candidates: pd.DataFrame) -> None:
    """Embeddings of the pool and the candidates must have one dimension and one model.

    Raises :class:`PoolError` saying which differs; nothing is written.
    """
    if prior is None or prior.empty or candidates.empty:
        return
    pool_dim, cand_dim = embedding_dim(prior), embedding_dim(candidates)
    if pool_dim != cand_dim:
        raise PoolError(
            f"the pool's embeddings have dimension {pool_dim} but this batch's have {cand_dim}; "
            "a pool's dimension is fixed once created (start a new pool with another datapool.name)"
        )
    from datapool.store import model_ids

    pool_models, cand_models = set(model_ids(prior)), set(model_ids(candidates))
    if pool_models != cand_models:
        raise PoolError(
            f"the pool was embedded by model(s) {sorted(pool_models)} but this batch by "
            f"{sorted(cand_models)}; embeddings of different models cannot be compared"
        )


def new_candidates(candidates: pd.DataFrame, pool: pd.DataFrame | None) -> pd.DataFrame:
    """Candidates whose content is not in the pool's other batches (fresh index)."""
    prior = prior_rows(pool, batch_of(candidates)) if not candidates.empty else None
    if prior is None or prior.empty:
        return candidates.reset_index(drop=True)
    from datapool.store import is_in

    seen = is_in(candidates["content_hash"], prior["content_hash"])
    return candidates[~seen].reset_index(drop=True)


def read_picks(path: Path) -> pd.DataFrame:
    """Read the picks written by :func:`select_increment` (an Arrow file, or CSV from
    older workspaces); PoolError if missing or malformed."""
    from datapool.store import SUFFIX, read_rows

    if path.suffix == SUFFIX:
        picks = read_rows(path)
    else:
        try:
            picks = pd.read_csv(
                path, dtype={"filenames": str, "content_hash": str}, keep_default_na=False
            )
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise PoolError(f"cannot read picks {path}: {err}") from err
    missing = [c for c in PICK_COLUMNS if c not in picks.columns]
    if missing:
        raise PoolError(f"{path} lacks column(s) {', '.join(missing)}")
    repeated = picks["content_hash"].duplicated().to_numpy()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise PoolError(
            f"{path}: row {row + 1} (filenames={picks['filenames'].iloc[row]!r}) picks an "
            "image an earlier row picked; run `dvc repro -f` to sample again"
        )
    return picks


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_increment` decided.

    Attributes:
        picks: the picks in pick order, columns :data:`PICK_COLUMNS` plus one
            ``score_<name>`` per objective other than diversity (its value,
            normalised to (0, 1], when the row was picked; NaN for pre-selected rows).
        next_distance: Euclidean distance of the farthest fresh candidate left
            unpicked to the pool and every pick: the batch's coverage radius after
            this increment and the distance at which selection stopped (0.0 when
            every fresh candidate was picked or there were none).
        fresh: how many candidates were new (not already in the pool's other batches).
        reason: why selection stopped (:class:`datapool.strategies.Combined`).
        strategies: the strategies that picked, name -> settings
            (:func:`datapool.strategies.describe`).
        preselected: how many leading picks were pre-selected by the user.
    """

    picks: pd.DataFrame
    next_distance: float
    fresh: int
    reason: str = "n_samples"
    strategies: dict[str, dict[str, Any]] = field(default_factory=dict)
    preselected: int = 0


@dataclass(frozen=True)
class _Inputs:
    """The selection inputs read for one batch of fresh candidates (masks aligned with it)."""

    relevant: npt.NDArray[np.bool_] | None
    masked: npt.NDArray[np.bool_] | None
    selected: npt.NDArray[np.bool_] | None
    scores: Any  # datapool.strategy_inputs.ScoreTable | None


def _read_inputs(selection: SelectionInputs, names: list[str]) -> _Inputs:
    """Read ``selection``'s files for candidates ``names``; InputError naming a bad file.

    Read even when there is no fresh candidate, so a missing file is reported on
    every run, not only on runs that have something to pick.
    """
    from datapool.strategy_inputs import flags_for, read_flags, read_names, read_scores

    relevant = None
    if selection.relevant_file is not None:
        relevant = flags_for(read_names(selection.relevant_file), names).mask
    masked = selected = None
    if selection.masked_file is not None:
        masked = read_flags(selection.masked_file, "masked", names).mask
    if selection.selected_file is not None:
        selected = read_flags(selection.selected_file, "selected", names).mask
    scores = None if selection.scores_file is None else read_scores(selection.scores_file)
    return _Inputs(relevant, masked, selected, scores)


def _no_picks() -> pd.DataFrame:
    return pd.DataFrame({c: [] for c in PICK_COLUMNS})


def choose_increment(
    candidates: pd.DataFrame,
    pool: pd.DataFrame | None,
    stop: StoppingCondition,
    selection: SelectionInputs | None = None,
    world: World | None = None,
) -> Choice:
    """Choose among ``candidates`` by ``selection``'s strategies, conditioned on the
    pool's other batches (default: plain greedy k-center).

    ``world``: the torch.distributed ranks that share plain diversity; every rank
    calls this with the same arguments and gets the same choice.

    Candidates whose content is already in the pool are never picked.
    ``pick_distance`` is the Euclidean distance to the nearest pool row or
    earlier pick when the candidate was picked (``inf`` for the first pick into
    an empty pool). Goes through :func:`datapool.strategies.select`, which keeps
    plain diversity on :func:`datapool.selection.k_center_greedy` (same picks,
    same speed, one thread as before).

    Weak labels for BALANCE are the candidates' ``labels`` (their sub-folder).
    Raises InputError for every input error of :mod:`datapool.strategies` and
    :mod:`datapool.strategy_inputs` (unknown column, missing file, NaN or negative
    weight, a threshold leaving nothing, an unknown balance label, no queries),
    and PoolError for embeddings that don't fit the pool; nothing is written.
    """
    # Imported here, not at the top: strategies needs torch (seconds to import), and
    # the CLI and workspace modules use this module's pandas helpers without it.
    from datapool.strategies import describe, select

    selection = selection or SelectionInputs()
    prior = prior_rows(pool, batch_of(candidates)) if not candidates.empty else None
    check_compatible(prior, candidates)
    fresh = new_candidates(candidates, pool)
    names = [str(n) for n in fresh["filenames"]]
    inputs = _read_inputs(selection, names)
    described = describe(selection.strategies)
    if fresh.empty:
        return Choice(_no_picks(), 0.0, 0, "no candidates left", described)
    picked = select(
        embeddings_of(fresh),
        names,
        strategies=selection.strategies,
        pool=None if prior is None or prior.empty else embeddings_of(prior),
        n_samples=stop.count(len(fresh)),
        min_distance=stop.min_distance or None,
        relevant=inputs.relevant,
        masked=inputs.masked,
        preselected=inputs.selected,
        scores=inputs.scores,
        labels=[str(label) for label in fresh["labels"]],
        queries=selection.queries,
        seed=selection.seed,
        world=world,
    )
    picks = fresh.iloc[picked.indices][["filenames", "content_hash"]].reset_index(drop=True)
    picks["pick_rank"] = np.arange(1, len(picks) + 1)
    picks["pick_distance"] = picked.distances
    for name, values in picked.objectives.items():
        if name != "diversity":  # selection.csv's score_diversity is the distance itself
            picks[f"score_{name}"] = values
    return Choice(
        picks,
        float(picked.next_distance),
        len(fresh),
        picked.reason,
        picked.strategies,
        picked.preselected,
    )


def select_increment(
    candidates: pd.DataFrame,
    pool: pd.DataFrame | None,
    stop: StoppingCondition,
    selection: SelectionInputs | None = None,
) -> pd.DataFrame:
    """The picks of :func:`choose_increment`, in pick order (columns :data:`PICK_COLUMNS`)."""
    return choose_increment(candidates, pool, stop, selection).picks


def merge_increment(
    pool: pd.DataFrame | None,
    candidates: pd.DataFrame,
    picks: pd.DataFrame,
    *,
    weak_labels: bool,
) -> pd.DataFrame:
    """``pool := (pool minus this batch's earlier rows) + picks``, in Lightly's column order.

    ``picks`` name candidates by ``content_hash``. A pick the pool already holds
    (a redo picking its own batch's image again) keeps the pool row's labels and
    user columns, so edits made since the first run survive; only its pick rank
    and distance are new. Other picks get their sub-folder name as label with
    ``weak_labels``, else ``""``. Raises :class:`PoolError` if a pick is not
    among the candidates or the embeddings don't fit the pool.
    """
    prior = prior_rows(pool, batch_of(candidates)) if not candidates.empty else pool
    check_compatible(prior, candidates)
    by_hash = candidates.set_index("content_hash", drop=False)
    unknown = sorted(set(picks["content_hash"]) - set(by_hash.index))
    if unknown:
        raise PoolError(
            f"picks name {len(unknown)} image(s) not among the candidates, e.g. {unknown[0]}"
        )
    added = by_hash.loc[list(picks["content_hash"])].reset_index(drop=True)
    added["pick_rank"] = picks["pick_rank"].to_numpy()
    added["pick_distance"] = picks["pick_distance"].to_numpy()
    if not weak_labels:
        added["labels"] = ""
    dim = embedding_dim(candidates) if prior is None or prior.empty else embedding_dim(prior)
    ours = column_order(dim, EXTRA_COLUMNS)
    user = [c for c in (pool.columns if pool is not None else []) if c not in ours]
    if pool is not None:
        added = _from_pool(added, pool, ["labels", *user])
        if user and prior is not None:
            prior = _from_pool(prior, pool, user)
    parts = [p for p in (prior, added) if p is not None and not p.empty]
    merged = pd.concat(parts, ignore_index=True) if parts else added
    return merged.reindex(columns=[*ours, *user])


def _from_pool(rows: pd.DataFrame, pool: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """``rows`` with the pool's values of ``columns`` for the images the pool holds.

    Matched by content hash. On a redo these are the batch's own rows of the
    previous run, whose labels and user columns the user may have edited since:
    a redo must not put the sub-folder name back. Where the pool has no value, a
    column keeps the row's own, or ``""`` if the row has none. Values become
    Python objects, so a column of integers does not turn into floats
    (``12345678901`` into ``1.23e+10``) when new rows leave gaps in it.
    """
    from datapool.store import is_in

    if len(pool) > len(rows):  # an increment's rows against a big pool: look at its matches
        pool = pool[is_in(pool["content_hash"], rows["content_hash"])]
    values = pool.drop_duplicates("content_hash").set_index("content_hash")[columns].astype(object)
    found = values.reindex(rows["content_hash"])
    out = rows.copy()
    for column in columns:
        got = found[column].to_numpy(dtype=object)
        own = out[column].to_numpy(dtype=object) if column in out else np.full(len(out), "", object)
        merged = np.where(pd.isna(got), own, got)
        out[column] = np.where(pd.isna(merged), "", merged)
    return out


def describe_stop(
    picks: pd.DataFrame, *, n_fresh: int, stop: StoppingCondition, reason: str = ""
) -> str:
    """Why selection ended, in words: the count, the distance threshold, no candidates
    left, or (``reason`` from :class:`Choice`) no candidate the strategies would take."""
    count = stop.count(n_fresh)
    if count is not None and len(picks) >= count:
        if stop.proportion_samples:
            return f"reached proportion_samples={stop.proportion_samples:g} ({count} picks)"
        return f"reached n_samples={stop.n_samples}"
    if len(picks) >= n_fresh:
        return f"picked every one of the {n_fresh} new candidates"
    if reason == "zero score":
        return "no remaining candidate scored above 0 under the strategies"
    if stop.min_distance:
        return f"the next candidate was closer than min_distance={stop.min_distance:g}"
    return "the remaining candidates duplicate earlier picks"


def image_sources(candidates: pd.DataFrame) -> dict[str, Path]:
    """``{content_hash: original file}`` of each candidate (``source / filenames``)."""
    return {
        str(digest): Path(source) / name
        for digest, source, name in zip(
            candidates["content_hash"], candidates["source"], candidates["filenames"], strict=True
        )
    }


def effective_pool(pool: pd.DataFrame | None, reembedded: Path) -> pd.DataFrame | None:
    """The pool as this run must see it: re-embedded by ``embed`` if it wrote that file.

    ``embed`` writes ``reembedded`` only when this run's model differs from the
    one that embedded the pool. Only its embeddings and ``model_id`` are taken,
    matched by content hash: everything else comes from the pool as it is now,
    because ``sample`` and ``merge`` may run again long after ``embed`` (a changed
    ``n_samples``), and labels the user edited or columns they added in between
    must not be reverted to ``embed``'s copy. Raises :class:`PoolError` if the
    file is malformed or its dimension is not the pool's.
    """
    if not reembedded.exists():
        return pool
    from datapool.store import read_any

    fresh = read_any(reembedded)
    if pool is None:
        return fresh
    dim = embedding_dim(fresh)
    if embedding_dim(pool) != dim:
        raise PoolError(
            f"{reembedded} has embeddings of dimension {dim} but the pool's have "
            f"{embedding_dim(pool)}; run `dvc repro -f` to embed again"
        )
    by_hash = fresh.drop_duplicates("content_hash").set_index("content_hash")
    known = pool["content_hash"].isin(by_hash.index).to_numpy()
    hashes = pool.loc[known, "content_hash"]
    out = pool.copy()
    columns = embedding_columns(dim)
    out.loc[known, columns] = by_hash.loc[hashes, columns].to_numpy(dtype=np.float32)
    out.loc[known, "model_id"] = by_hash.loc[hashes, "model_id"].to_numpy()
    return out
