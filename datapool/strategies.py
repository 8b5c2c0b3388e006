"""Selection strategies beyond diversity, combined with greedy k-center (issue 11).

Lightly's selection is a list of strategies; this module gives the same over
arrays: small strategy functions, one combination loop (:func:`combine`) and a
dispatcher (:func:`select`) that applies the inputs, evaluates the strategies
and keeps plain diversity on the exact fast engine
(:func:`datapool.selection.k_center_greedy`). File readers are in
:mod:`datapool.strategy_inputs`.

The combination
---------------
Candidates are first narrowed: only ``relevant`` rows, never ``masked`` ones
(they influence nothing: no objective, no distance, no balance count), never
``preselected`` ones (those are picks already), then every THRESHOLD
(``column op value``, op one of ``< <= > >=``) in order. A threshold that
leaves no candidate is an error. Every objective below is computed over the
candidates that remain (the set picks come from), never over masked rows.

Pre-selected rows count as pool (their distances shape everyone's diversity)
and come first in the picks, in candidate order, whatever their distance and
even when not relevant or below a threshold: the user chose them. A row both
masked and pre-selected is an error.
Like Lightly's ``n_samples`` ("including the preselected"), ``n_samples``
counts them: the strategies add ``n_samples - len(preselected)`` picks.

Then each greedy step takes, among the *eligible* candidates, the one
maximising

    score(i) = prod_s objective_s(i) ** strength_s

(ties: the lowest index; computed as ``sum_s strength_s * log objective_s(i)``
in float64, where equal objectives give equal sums, so ties stay ties).
Normalisations (each objective is positive and scale-free):

* DIVERSITY: ``d(i) / max_j d(j)``, ``d`` the Euclidean distance to the
  nearest pool row, pre-selected row or pick, the maximum over the remaining
  candidates, both updated after every pick. Before any centre exists (no pool,
  nothing picked) every ``d`` is ``inf`` and the objective is 1.
* TYPICALITY: ``1 / m(i)`` normalised by its maximum, i.e. ``min_j m(j) / m(i)``,
  ``m`` the mean distance to the ``k`` nearest other candidates (default 20;
  ``min(k, size - 1)`` when fewer are there; 1 for a lone candidate). Exact up to
  :data:`TYPICALITY_SAMPLE` = 10,000 candidates (all candidates are the
  reference; blocked products of at most 16 MiB, never an n x n matrix). Above
  that the neighbours are searched in a seeded uniform random sample of 10,000
  candidates (``seed``): the mean distance to the ``k`` nearest sample points
  estimates the mean distance to the ``k * n / 10,000`` nearest candidates, i.e.
  the same density at a coarser scale (outliers, far from every sample point,
  still score lowest). The cost is then ``n x 10,000`` distances: 82-89 s for
  1M x 128 on one core of the 2-core VM (bench/strategies.py). ``m`` is clamped
  below at its smallest positive value: ``k`` exact duplicates would give
  ``m = 0`` and a division by zero; they get the maximum, 1.
* WEIGHTS: a non-negative numeric column divided by its maximum (an all-zero
  column is refused: nothing to weigh).
* BALANCE over a categorical column (or weak labels): with ``p`` picks so far
  (pre-selected included) and ``count_l`` of them labelled ``l``, label ``l``
  scores ``max(target_l * (p + 1) - count_l, 0)``, normalised by the maximum over
  labels. Targets: ``uniform`` (1/L over the candidates' labels), ``input`` (the
  candidates' label distribution) or explicit proportions (summing to 1; labels
  not named get 0). Targets are renormalised over the labels that still have an
  eligible candidate, so some label always scores > 0; with integer
  ``target_l * n_samples`` the final counts equal the targets exactly.
* SIMILARITY to query embeddings: ``1 / (1 + q(i) / mean_j q(j))``, ``q`` the
  distance to the nearest query (:func:`datapool.selection.nearest`); 1 for all
  when every ``q`` is 0.

A negative strength inverts an objective (``o ** -s = (1/o) ** s``); strength 0
ignores it (``o ** 0 = 1``, even for ``o = 0``). An objective of 0 under a
positive strength makes the score 0, and a candidate scoring 0 is never
picked (a balance label at its target, a zero weight); under a negative
strength it makes the score infinite (such candidates win, lowest index
first); with both, 0 wins.

A candidate is *eligible* while it is unpicked, its diversity distance is
> 0 (a duplicate of a centre is never picked) and ``>= min_distance`` (when
given), and its score is > 0. Selection stops when ``n_samples`` is reached or
no candidate is eligible; for plain diversity that is exactly
:func:`k_center_greedy`'s stop rule. Distances are always tracked, even when
DIVERSITY is not configured, for that rule and the reported pick distances.

The RADIUS GUARD (diversity's ``guard``, in [0, 1], 0 = off) narrows each
step further: among the eligible candidates, only those at least ``guard``
times as far as the farthest eligible candidate compete (compared squared, in
float64: ``d2 >= guard**2 * max d2``). The farthest always passes, so greedy
k-center's argument carries over with a factor: after any number of picks,
the picks and the farthest candidate are pairwise at least ``guard * r``
apart (``r`` the coverage radius then), so ``r`` is at most ``2 / guard``
times the optimal radius for that many centres (k-center: 2). Within that,
the other objectives choose. With DIVERSITY strength 0 and TYPICALITY, each
pick is the most typical candidate among the far ones: issue 12's measured
default (docs/BENCHMARKS.md). A guard leaves plain diversity unchanged.

HERDING is not a factor of this product but its own rule
(:mod:`datapool.herding`, issue 12's default): kernel-herding picks for as long
as greedy k-center, continued from them, still brings the coverage radius within
``radius`` times plain k-center's for the budget. It combines only with
THRESHOLDs (and the relevant / masked / pre-selected inputs); :func:`select`
dispatches to it.

Exactness and cost
------------------
Distances are the textbook float32 values ``sum((x - c)^2)`` that
:func:`k_center_greedy` matches: centres are applied to rows as matrix
products, and only rows whose distance may change are recomputed directly
(``selection.exact_min``, shared so both paths have one definition). So
diversity alone through :func:`combine` gives :func:`k_center_greedy`'s picks.
Two loops make the same picks (tests compare them):

* the full loop (``_run``): every pick is applied to every row, one pass over
  the candidates per pick. Used with BALANCE (its term moves whole labels at
  once) and with a negative diversity strength (shrinking distances raise
  scores, so a stale distance bounds nothing).
* the lazy loop (``_run_lazy``, otherwise): distances only shrink, so with a
  diversity strength >= 0 a stale distance bounds a row's score from above. A
  top set (the n/50 rows, at least 256 and at most 16 MiB, with the highest
  bound, plus as many farthest rows) is kept exact pick by pick; its best row is
  picked while it beats every other row's bound strictly (a tie would need the
  lower index) and its farthest row is at least every other row's stale
  distance (so the recorded maximum is exact). Otherwise the phase's picks are
  applied to all rows in one blocked product, far cheaper per centre than a
  pass each, and a new top set is taken (four times larger when the phase
  picked nothing).

Measured (bench/strategies.py, random unit rows, 1000 picks, one thread, the
2-core VM under load 2.6-3.5): at 1M x 128 diversity x typicality took 107 s,
89 s of it typicality's k-NN pass and 18 s the lazy loop (the full loop: 124 s);
:func:`k_center_greedy` 4.7 s; diversity alone through the lazy loop 18.6 s,
same picks. At 100k x 128: lazy loop 3.6 s, full loop 14.0 s, same picks.
The pool pass is not pruned as the fast engine's is: O(n m d).
Everything runs on the CPU (tensors on another device are copied there):
per-pick work on one thread, the blocked passes (pool, typicality) on
``threads``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from datapool.distributed import World, gather_in_order, shard_range
from datapool.errors import InputError
from datapool.selection import (
    checked_inputs,
    cpu_threads,
    error_bound,
    exact_min,
    k_center_greedy,
    nearest,
    pinned_numerics,
    pool_minima,
)
from datapool.strategy_config import (
    KINDS,
    OPERATIONS,
    StrategyConfig,
    describe,
    is_plain_diversity,
    parse_strategies,
)
from datapool.strategy_inputs import ScoreTable

__all__ = [
    "KINDS",
    "OPERATIONS",
    "TYPICALITY_SAMPLE",
    "Balance",
    "Combined",
    "Objective",
    "Picks",
    "StrategyConfig",
    "balance_targets",
    "combine",
    "describe",
    "is_plain_diversity",
    "parse_strategies",
    "select",
    "similarity",
    "threshold",
    "typicality",
    "weights",
]

TYPICALITY_SAMPLE = 10_000  # reference rows for the k-NN search (module docstring)
_PICK_ROWS = 1 << 16  # rows per block of the per-pick update
_TOP_DIV = 50  # lazy loop's top set: this fraction of the candidates ...
_TOP_MIN = 256  # ... at least this many rows ...
_TOP_BYTES = 16 << 20  # ... and its float32 copy at most this size (stays in cache)
_PASS_BYTES = 16 << 20  # product output per block in the blocked passes
_CHUNK = 1024  # centres per product in the pool pass
_CHAIN = 256  # rows per block of _chain_distances
_GUARD_LEVEL = 0.9  # lazy loop with a guard: a phase ends once the max d2 is below this x its start


# --------------------------------------------------------------------------- strategies


def _float32(x: Any) -> torch.Tensor:
    """``x`` as a CPU float32 tensor [n, d] (no copy when it already is one)."""
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return t.detach().to("cpu", torch.float32)


def _knn_mean(x: torch.Tensor, ref: torch.Tensor, self_pos: torch.Tensor, k: int) -> torch.Tensor:
    """Mean Euclidean distance of each row of ``x`` to its ``k`` nearest ``ref`` rows.

    ``self_pos[i]`` is row i's own position in ``ref`` (-1 if absent), which is
    skipped. Blocked: ``rows x len(ref)`` products of at most 16 MiB.
    """
    rn = (ref * ref).sum(dim=1)
    rows = max(1, _PASS_BYTES // (4 * ref.shape[0]))
    out = torch.empty(x.shape[0], dtype=torch.float64)
    for s in range(0, x.shape[0], rows):
        xb = x[s : s + rows]
        g = torch.addmm(rn.unsqueeze(0), xb, ref.T, alpha=-2.0)
        g.add_((xb * xb).sum(dim=1, keepdim=True))
        pos = self_pos[s : s + rows]
        own = (pos >= 0).nonzero().squeeze(1)
        g[own, pos[own]] = math.inf
        near = g.topk(k, dim=1, largest=False).values
        # rounding can push a true 0 slightly below 0: sqrt would give NaN
        out[s : s + rows] = near.clamp_(min=0).sqrt_().mean(dim=1, dtype=torch.float64)
    return out


def typicality(
    x: Any,
    *,
    k: int = 20,
    sample: int = TYPICALITY_SAMPLE,
    seed: int = 0,
    threads: int | None = 1,
    world: World | None = None,
) -> npt.NDArray[np.float64]:
    """TYPICALITY objective of each row of ``x`` [n, d], float64 ``[n]`` in (0, 1].

    ``min_j m(j) / m(i)`` with ``m`` the mean distance to the ``k`` nearest other
    rows, searched among all rows when ``n <= sample`` and else among a seeded
    uniform sample of ``sample`` rows (module docstring). ``threads``: torch CPU
    threads for the products (default 1; None: torch's setting).

    With a ``world`` of several ranks (every rank passing the same ``x``), each rank
    computes ``m`` for its slice of the rows (:func:`datapool.distributed.shard_range`)
    and the slices are gathered: every rank returns the whole result, equal to one
    process's up to the rounding of differently sized matrix blocks (~1e-7 relative).
    """
    t = _float32(x)
    n = t.shape[0]
    if n <= 1:
        return np.ones(n)
    if n <= sample:
        ref_idx = torch.arange(n)
    else:
        chosen = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
        ref_idx = torch.from_numpy(chosen)
    self_pos = torch.full((n,), -1, dtype=torch.int64)
    self_pos[ref_idx] = torch.arange(len(ref_idx))
    mine = range(n) if world is None else shard_range(n, world)
    with torch.no_grad(), cpu_threads(threads or torch.get_num_threads()):
        part = t[mine.start : mine.stop]
        m = _knn_mean(part, t[ref_idx], self_pos[mine.start : mine.stop], min(k, len(ref_idx) - 1))
    if world is not None:
        m = gather_in_order(m, world)
    positive = m[m > 0]
    if positive.numel() == 0:
        return np.ones(n)
    floor = positive.min()
    return (floor / m.clamp(min=float(floor))).numpy()


def weights(values: Any, *, where: Any = None) -> npt.NDArray[np.float64]:
    """WEIGHTS objective: ``values / max(values)``, float64 ``[n]`` in [0, 1].

    ``where(i)`` names row i in messages (e.g. :meth:`ScoreTable.where`).
    Raises InputError for a NaN, infinite or negative value, or all zeros.
    """
    v = np.asarray(values, dtype=np.float64)
    name = where or (lambda i: f"row {i}")
    bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{name(i)}: weight {v[i]!r} must be a finite number >= 0")
    top = float(v.max()) if v.size else 0.0
    if v.size and top == 0:
        raise InputError("every weight is 0: nothing to weigh (check the column)")
    return v / top if v.size else v


def threshold(values: Any, operation: str, value: float) -> npt.NDArray[np.bool_]:
    """THRESHOLD: bool ``[n]``, True where ``values <operation> value`` (``< <= > >=``)."""
    if operation not in OPERATIONS:
        raise InputError(f"threshold operation must be one of < <= > >=, got {operation!r}")
    out: npt.NDArray[np.bool_] = OPERATIONS[operation](np.asarray(values, np.float64), value)
    return out


def similarity(x: Any, queries: Any, *, threads: int | None = 1) -> npt.NDArray[np.float64]:
    """SIMILARITY objective: ``1 / (1 + q / mean(q))``, float64 ``[n]`` in (0, 1].

    ``q`` is each row's distance to its nearest query ``[Q, d]``. Raises
    InputError when there are no queries, or for mismatched dimensions.
    """
    if queries is None or len(queries) == 0:
        raise InputError("similarity needs query embeddings, got none (no query images?)")
    q = nearest(x, queries, threads=threads).distances
    mean = float(q.mean()) if q.size else 0.0
    if mean == 0:
        return np.ones(len(q))
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + q / mean)
    return out


def balance_targets(labels: Sequence[str], target: str | Mapping[str, float]) -> dict[str, float]:
    """Target proportion per label of the candidates' ``labels`` (module docstring).

    Raises InputError for an explicit target naming a label no candidate has.
    """
    if len(labels) == 0:  # nothing to balance (every file masked, say): no target to check
        return {}
    present, counts = np.unique(np.asarray(list(labels), dtype=object), return_counts=True)
    names = [str(p) for p in present]
    if target == "uniform":
        return {p: 1 / len(names) for p in names}
    if target == "input":
        return {p: float(c) / len(labels) for p, c in zip(names, counts, strict=True)}
    if isinstance(target, str):
        raise InputError(f"balance target must be uniform, input or proportions, got {target!r}")
    unknown = sorted(set(target) - set(names))
    if unknown:
        raise InputError(
            f"balance target names label {unknown[0]!r}, which no candidate has "
            f"(labels: {', '.join(names) or 'none'})"
        )
    return {p: float(target.get(p, 0.0)) for p in names}


# --------------------------------------------------------------------------- combination


@dataclass(frozen=True)
class Objective:
    """A fixed objective over the candidates: float64 ``values`` [n] in [0, 1]."""

    name: str
    strength: float
    values: npt.NDArray[np.float64]


@dataclass(frozen=True)
class Balance:
    """The BALANCE term of :func:`combine`.

    Attributes:
        name, strength: as for :class:`Objective`.
        codes: int64 ``[n]``, each candidate's label as an index into ``targets``.
        targets: float64 ``[L]``, target proportion per label (sum 1).
        counts: int64 ``[L]``, picks already made per label (the pre-selected).
        made: how many picks already exist (pre-selected, labelled or not).
    """

    name: str
    strength: float
    codes: npt.NDArray[np.int64]
    targets: npt.NDArray[np.float64]
    counts: npt.NDArray[np.int64]
    made: int = 0


@dataclass(frozen=True)
class Combined:
    """Result of :func:`combine` (indices into its candidates).

    Attributes:
        indices: int64 ``[k]`` in pick order.
        distances: float64 ``[k]``, each pick's diversity distance when picked
            (``inf`` for a first pick without pool).
        objectives: name -> float64 ``[k]``, each objective's normalised value
            at the moment of the pick (``"diversity"`` always included).
        next_distance: distance of the farthest unpicked candidate to the
            centres when selection stopped (``inf``: no centre; 0.0: none left).
        reason: why it stopped: ``"n_samples"``, ``"min_distance"``,
            ``"zero score"`` or ``"no candidates left"``.
    """

    indices: npt.NDArray[np.int64]
    distances: npt.NDArray[np.float64]
    objectives: dict[str, npt.NDArray[np.float64]]
    next_distance: float
    reason: str


class _Coverage:
    """Exact (textbook float32) squared distance ``d2`` [n] of each row to its nearest centre.

    ``start``: exact squared distances to centres already applied elsewhere (float32 [n],
    e.g. :func:`datapool.selection.pool_minima` of a pool), copied; default ``inf``.
    """

    def __init__(
        self, x: torch.Tensor, pass_threads: int, start: torch.Tensor | None = None
    ) -> None:
        self.x = x
        self.xn = torch.empty(x.shape[0], dtype=torch.float32)
        for s in range(0, x.shape[0], _PICK_ROWS):  # blocked: x * x would copy all of x
            b = x[s : s + _PICK_ROWS]
            self.xn[s : s + _PICK_ROWS] = (b * b).sum(dim=1)
        self.d2 = (
            torch.full((x.shape[0],), math.inf, dtype=torch.float32)
            if start is None
            else start.clone()
        )
        self.kappa = error_bound(max(1, x.shape[1]))
        self.threads = pass_threads
        self.centres = 0

    def add(self, c: torch.Tensor) -> None:
        """Apply centres ``c`` [m, d] (any float dtype) to every row, blocked.

        One centre (a pick): 64k-row blocks on one thread. Many (the pool):
        4096-row blocks, each taking every 1024-centre chunk while it is in cache.
        """
        if c.shape[0] == 0:
            return
        n = self.x.shape[0]
        if c.shape[0] == 1:
            c1 = c.to("cpu", torch.float32)
            for s in range(0, n, _PICK_ROWS):
                e = s + _PICK_ROWS
                self.d2[s:e] = exact_min(self.x[s:e], self.xn[s:e], self.d2[s:e], c1, self.kappa)
        else:
            chunks = [
                c[j : j + _CHUNK].to("cpu", torch.float32) for j in range(0, c.shape[0], _CHUNK)
            ]
            rows = max(1, _PASS_BYTES // (4 * _CHUNK))
            with cpu_threads(self.threads):
                for s in range(0, n, rows):
                    e = s + rows
                    d2b = self.d2[s:e]
                    for cj in chunks:
                        d2b = exact_min(self.x[s:e], self.xn[s:e], d2b, cj, self.kappa)
                    self.d2[s:e] = d2b
        self.centres += c.shape[0]


def _log_term(o: torch.Tensor, strength: float) -> torch.Tensor:
    """``strength * log(o)`` with ``o = 0`` giving -inf (positive strength) or +inf (negative)."""
    if strength == 0:  # o ** 0 = 1, even for o = 0
        return torch.zeros_like(o, dtype=torch.float64)
    zero = -math.inf if strength > 0 else math.inf
    # clamp only keeps log(0) out of the branch torch.where discards
    return torch.where(o > 0, o.double().clamp(min=1e-300).log() * strength, zero)


def _static_score(objectives: Sequence[Objective], n: int) -> torch.Tensor:
    """Sum of ``strength * log(value)`` over the fixed objectives, float64 [n]."""
    score = torch.zeros(n, dtype=torch.float64)
    for o in objectives:
        if o.strength != 0:
            score += _log_term(torch.from_numpy(np.asarray(o.values, np.float64)), o.strength)
    # -inf + inf is NaN: a zero under a positive strength wins (never picked)
    return torch.nan_to_num(score, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _balance_values(
    b: Balance, eligible: torch.Tensor, made: int, counts: torch.Tensor
) -> torch.Tensor:
    """Normalised balance objective per label, float64 [L] (module docstring)."""
    codes = torch.from_numpy(b.codes)
    available = torch.bincount(codes[eligible], minlength=len(b.targets)) > 0
    t = torch.from_numpy(b.targets) * available
    if float(t.sum()) > 0:
        t = t / t.sum()
    v = (t * (made + 1) - counts).clamp(min=0)
    top = float(v.max()) if v.numel() else 0.0
    return v / top if top > 0 else v


@dataclass
class _Loop:
    """State of :func:`combine` between picks."""

    cov: _Coverage
    static: torch.Tensor
    objectives: Sequence[Objective]
    diversity: float
    min_distance: float | None
    guard2: float = 0.0  # the radius guard, squared (0: off)
    picked: list[int] = field(default_factory=list)
    dists: list[float] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def reach(self, d2: torch.Tensor) -> torch.Tensor:
        """Rows whose distance allows a pick: > 0 and ``>= min_distance``."""
        ok = d2 > 0
        if self.min_distance is not None:
            ok &= d2.double().sqrt() >= self.min_distance
        return ok

    def score(self, static: torch.Tensor, d2: torch.Tensor, reach: torch.Tensor) -> torch.Tensor:
        """Log score without the common normalisations, -inf out of reach (float64).

        Dividing every objective by its maximum adds the same constant to every
        row, so it is left out of comparisons (both loops compute the same
        values, so they break ties alike); it is applied to recorded values.
        """
        u = static
        if self.diversity != 0 and self.cov.centres > 0:
            u = static + d2.double().log() * (self.diversity / 2)
        return torch.where(reach, u, -math.inf)

    def guarded(self, score: torch.Tensor, d2: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``score`` with the radius guard applied, and the farthest live ``d2``.

        Live rows are those scoring > -inf (they could be picked); a live row
        stays only if its ``d2 >= guard^2 * max live d2`` (float64). Returns
        ``(score, -inf)`` when the guard is off or no row is live.
        """
        live = score > -math.inf
        if self.guard2 == 0 or not bool(live.any()):
            return score, -math.inf
        far = float(d2[live].max())
        return torch.where(d2.double() >= self.guard2 * far, score, -math.inf), far

    def record(self, i: int, d2_i: float, d2_max: float) -> None:
        """Append pick ``i`` (squared distance ``d2_i``, largest ``d2_max``) and its objectives."""
        self.picked.append(i)
        self.dists.append(math.sqrt(d2_i))
        self.values["diversity"].append(1.0 if math.isinf(d2_max) else math.sqrt(d2_i / d2_max))
        for o in self.objectives:
            self.values[o.name].append(float(o.values[i]))


def combine(
    x: Any,
    *,
    pool: Any = None,
    preselected: Any = None,
    objectives: Sequence[Objective] = (),
    balance: Balance | None = None,
    diversity: float = 1.0,
    n_samples: int | None = None,
    min_distance: float | None = None,
    guard: float = 0.0,
    threads: int | None = 1,
    lazy: bool = True,
) -> Combined:
    """The combination loop: greedy picks maximising the product of objectives.

    Args:
        x: candidates ``[n, d]`` (numpy or torch, float).
        pool: rows already in the dataset ``[m, d]``, or None.
        preselected: rows picked before this call ``[p, d]``: centres like the pool.
        objectives: fixed objectives over the candidates (values ``[n]``).
        balance: the BALANCE term, or None.
        diversity: DIVERSITY's strength (0: distances only decide eligibility).
        n_samples: picks to make (None: until no candidate is eligible).
        min_distance: candidates closer than this to a centre are ineligible.
        guard: the radius guard in [0, 1] (0: off): each pick is chosen only
            among the eligible candidates whose distance is at least ``guard``
            times the largest distance of an eligible candidate.
        threads: CPU threads for the pool pass (default 1; None: torch's setting).
        lazy: without balance and with diversity strength >= 0, keep stale
            distances as upper bounds and refresh only a top set per pick
            (:func:`_run_lazy`: same picks, far fewer passes). False forces
            one pass per pick (for tests and benchmarks).

    Raises:
        InputError: as :func:`k_center_greedy` for the arrays, a negative
            ``n_samples`` or ``min_distance``, a guard outside [0, 1], or
            objectives of the wrong length.
    """
    if n_samples is not None and n_samples < 0:
        raise InputError(f"n_samples must be >= 0, got {n_samples}")
    if not 0 <= guard <= 1:
        raise InputError(f"guard must be in [0, 1], got {guard!r}")
    if min_distance is not None and not min_distance >= 0:
        raise InputError(f"min_distance must be a number >= 0, got {min_distance!r}")
    xt, pool_t, _ = checked_inputs(x, pool, None)
    n = xt.shape[0]
    for o in objectives:
        if len(o.values) != n:
            raise InputError(f"objective {o.name} has {len(o.values)} values for {n} candidates")
    pre = None if preselected is None else checked_inputs(preselected, None, None)[0]
    limit = n if n_samples is None else min(n_samples, n)
    if n == 0:
        empty = np.empty(0)
        names = ["diversity", *(o.name for o in objectives), *([balance.name] if balance else [])]
        return Combined(
            np.empty(0, np.int64), empty, {k: empty for k in names}, 0.0, "no candidates left"
        )
    with pinned_numerics("cpu", 1):
        cov = _Coverage(xt.to("cpu", torch.float32), threads or torch.get_num_threads())
        for c in (pool_t, pre):
            if c is not None:
                cov.add(c)
        loop = _Loop(
            cov, _static_score(objectives, n), objectives, diversity, min_distance, guard * guard
        )
        loop.values = {"diversity": [], **{o.name: [] for o in objectives}}
        if balance is not None:
            loop.values[balance.name] = []
        if lazy and balance is None and diversity >= 0:
            # a first pick without any centre has no distances to bound: one full pass
            reason = _run(loop, None, min(limit, 1)) if cov.centres == 0 else None
            reason = reason or _run_lazy(loop, limit)
        else:
            reason = _run(loop, balance, limit)
        if reason is None:
            reason = "n_samples" if limit == n_samples else "no candidates left"
    d2 = cov.d2
    nxt = math.sqrt(float(d2.max()))
    return Combined(
        np.asarray(loop.picked, dtype=np.int64),
        np.asarray(loop.dists, dtype=np.float64),
        {k: np.asarray(v, dtype=np.float64) for k, v in loop.values.items()},
        nxt,
        reason,
    )


def _run(loop: _Loop, balance: Balance | None, limit: int) -> str | None:
    """One pass over every candidate per pick until ``limit`` picks; returns the
    stop reason, or None when ``limit`` was reached."""
    counts = torch.zeros(0, dtype=torch.float64)
    if balance is not None:
        counts = torch.from_numpy(balance.counts.astype(np.float64))
    made = 0 if balance is None else balance.made
    while len(loop.picked) < limit:
        d2 = loop.cov.d2
        reach = loop.reach(d2)
        score = loop.score(loop.static, d2, reach)
        bal = None
        if balance is not None:
            bal = _balance_values(balance, score > -math.inf, made, counts)
            term = _log_term(bal[torch.from_numpy(balance.codes)], balance.strength)
            score = torch.nan_to_num(score + term, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        score = loop.guarded(score, d2)[0]
        eligible = score > -math.inf  # NaN (excluded) compares False too
        if not bool(eligible.any()):
            return _why(d2, reach)
        i = int(torch.where(eligible, score, -math.inf).argmax())
        loop.record(i, float(d2[i]), float(d2.max()))
        if balance is not None and bal is not None:
            code = int(balance.codes[i])
            loop.values[balance.name].append(float(bal[code]))
            counts[code] += 1
            made += 1
        loop.cov.add(loop.cov.x[i : i + 1])
    return None


def _top_size(n: int, d: int) -> int:
    """Rows of a top set: n / 50, at least 256, its float32 copy at most 16 MiB."""
    return max(1, min(max(_TOP_MIN, n // _TOP_DIV), _TOP_BYTES // (4 * d), n))


def _run_lazy(loop: _Loop, limit: int) -> str | None:
    """:func:`_run` without balance and with a diversity strength >= 0, lazily.

    Distances only shrink, so a stale distance gives an upper bound on a
    row's score. Each *phase* takes a top set (the rows with the highest
    bound and those farthest from the centres), keeps it exact pick by pick,
    and picks its best row while that beats ``bound_u``, every other row's
    bound, and its farthest row is at least every other row's stale distance
    (so the recorded maximum is exact). Otherwise the phase's picks are applied
    to every row in one blocked product and a new top set is taken (four
    times larger if the phase picked nothing). Same picks as :func:`_run`.

    With the radius guard, the top set also holds the farthest *live* rows
    (those that could be picked), and the phase goes on while the top's
    farthest live row is at least ``bound_e``: every other live row's stale
    distance (so the guard's maximum is exact), and at least
    :data:`_GUARD_LEVEL` times the phase's starting maximum (squared). So
    ``bound_u`` only counts rows whose stale distance passes the guard at
    ``bound_e``: one below can't be picked in the phase. Without that level,
    the band between ``guard^2 * bound_e`` and the guard's real threshold kept
    ``bound_u`` high and phases short (3x slower on clustered rows).
    """
    cov = loop.cov
    n, d = cov.x.shape
    base, grow = _top_size(n, d), 1
    while len(loop.picked) < limit:
        t = min(n, base * grow)
        upper = loop.score(loop.static, cov.d2, loop.reach(cov.d2))  # d2 exact here
        live = upper > -math.inf
        rest = torch.ones(n, dtype=torch.bool)
        rest[cov.d2.topk(t).indices] = False
        if loop.guard2:
            rest[torch.where(live, cov.d2, -1.0).topk(t).indices] = False
        level = -math.inf
        if loop.guard2 and bool(live.any()):
            level = _GUARD_LEVEL * float(cov.d2[live].max())
        bounds = _bounds(loop, upper, live, rest, level)
        rest[torch.where(bounds.could, upper, -math.inf).topk(min(t, n)).indices] = False
        bounds = _bounds(loop, upper, live, rest, level)
        top = (~rest).nonzero().squeeze(1)  # sorted
        before = len(loop.picked)
        done = _phase(loop, top, bounds, limit)
        if done:
            return _why(cov.d2, loop.reach(cov.d2))
        if len(loop.picked) == before and top.numel() == n:
            raise RuntimeError("internal error in strategies.combine: a phase over every row")
        grow = grow * 4 if len(loop.picked) == before else 1
    return None


@dataclass(frozen=True)
class _Bounds:
    """What the rows outside a top set can do during a phase (:func:`_run_lazy`).

    ``u``: the highest score bound of a row that could pass the guard (-inf:
    none); ``d``: the largest stale squared distance (0: none); ``e``: the
    largest stale squared distance of a live row (-inf: none or no guard);
    ``could``: bool [n], rows of ``rest`` that could pass the guard.
    """

    u: float
    d: float
    e: float
    could: torch.Tensor


def _bounds(
    loop: _Loop, upper: torch.Tensor, live: torch.Tensor, rest: torch.Tensor, level: float
) -> _Bounds:
    """The :class:`_Bounds` of the rows ``rest`` (bool [n]) given exact ``upper`` scores.

    With the guard, ``e`` is at least ``level``: the phase then ends once the
    guard's maximum falls below it, and in exchange only rows that pass the
    guard at ``level`` count in ``u`` (a tighter bound, longer phases).
    """
    far = loop.cov.d2
    e = -math.inf
    could = rest
    if loop.guard2 and bool((rest & live).any()):
        e = max(level, float(far[rest & live].max()))
        could = rest & (far.double() >= loop.guard2 * e)
    u = float(upper[could].max()) if bool(could.any()) else -math.inf
    d = float(far[rest].max()) if bool(rest.any()) else 0.0
    return _Bounds(u, d, e, could)


def _phase(loop: _Loop, top: torch.Tensor, bounds: _Bounds, limit: int) -> bool:
    """Pick from the top set ``top`` (sorted indices) while that is provably right.

    Returns True when no candidate is eligible anywhere. The picks are then
    applied to every row.
    """
    cov = loop.cov
    xt, xn, d2 = cov.x[top], cov.xn[top], cov.d2[top]
    static = loop.static[top]
    queue: list[torch.Tensor] = []
    done = False
    while len(loop.picked) < limit:
        score, far_e = loop.guarded(loop.score(static, d2, loop.reach(d2)), d2)
        if far_e < bounds.e:  # a live row outside may be the farthest: the guard is unknown
            break
        j = int(score.argmax())  # first of equals: top is sorted, so the lowest index
        best, far = float(score[j]), float(d2.max())
        if best == -math.inf and bounds.u == -math.inf:
            done = True
            break
        if not best > bounds.u or far < bounds.d:
            break
        loop.record(int(top[j]), float(d2[j]), far)
        queue.append(xt[j : j + 1].clone())
        d2 = exact_min(xt, xn, d2, queue[-1], cov.kappa)
        cov.centres += 1
    cov.d2[top] = d2
    if queue:
        centres = cov.centres
        cov.add(torch.cat(queue))
        cov.centres = centres
    return done


def _why(d2: torch.Tensor, reach: torch.Tensor) -> str:
    """Stop reason when no candidate is eligible."""
    if not bool((d2 > 0).any()):
        return "no candidates left"
    if not bool(reach.any()):
        return "min_distance"
    return "zero score"


# --------------------------------------------------------------------------- dispatcher


@dataclass(frozen=True)
class Picks:
    """Result of :func:`select` (indices into the rows given to it).

    Attributes:
        indices: int64 ``[k]``: the pre-selected rows first, then the picks in order.
        distances: float64 ``[k]``: each one's Euclidean distance to the pool and
            the rows before it (``inf`` for the first without pool).
        objectives: name -> float64 ``[k]``: each strategy's normalised
            objective at the moment of the pick (NaN for pre-selected rows).
        preselected: how many leading rows of ``indices`` were pre-selected.
        next_distance: see :class:`Combined`.
        reason: see :class:`Combined`.
        strategies: :func:`describe` of the configuration.
    """

    indices: npt.NDArray[np.int64]
    distances: npt.NDArray[np.float64]
    objectives: dict[str, npt.NDArray[np.float64]]
    preselected: int
    next_distance: float
    reason: str
    strategies: dict[str, dict[str, Any]]


def _chain_distances(
    rows: torch.Tensor, pool: torch.Tensor | None, prior: torch.Tensor | None = None
) -> npt.NDArray[np.float64]:
    """Distance of each of ``rows`` [p, d] to the pool and the rows before it (float64 [p]);
    ``prior``: instead of ``pool``, the rows' exact squared distances to it (float32 [p]).

    Exact (textbook float32) minima, in blocks of :data:`_CHAIN` rows: a block against
    every earlier block in one product (:func:`datapool.selection.exact_min`), then its
    rows against the block's earlier rows directly (10,000 picks: ~0.5 s, where one
    pass per row took 3.6 s).
    """
    with pinned_numerics("cpu", 1):
        cov = _Coverage(rows.to(torch.float32), 1, prior)
        if pool is not None:
            cov.add(pool)
        x, xn, d2 = cov.x, cov.xn, cov.d2
        for a in range(0, x.shape[0], _CHAIN):
            b = min(x.shape[0], a + _CHAIN)
            for c in range(0, a, _CHUNK):  # earlier blocks
                cj = x[c : min(a, c + _CHUNK)]
                d2[a:b] = exact_min(x[a:b], xn[a:b], d2[a:b], cj, cov.kappa)
            for i in range(a + 1, b):  # the block's earlier rows, textbook differences
                diff = x[a:i] - x[i]
                d2[i] = torch.minimum(d2[i], (diff * diff).sum(dim=1).min())
    out: npt.NDArray[np.float64] = np.sqrt(d2.double().numpy())
    return out


def _plain(
    xc: torch.Tensor,
    pool: torch.Tensor | None,
    budget: int | None,
    min_distance: float | None,
    threads: int | None,
    world: World | None = None,
    prior: torch.Tensor | None = None,
) -> Combined:
    """Plain diversity on the exact fast engine, as a :class:`Combined`.

    With a ``world`` of several ranks, every rank calls this with the same rows and
    :func:`datapool.selection_sharded.k_center_greedy_sharded` shares the work
    (identical picks). ``prior``: exact squared distances to centres not in ``pool``
    (:func:`datapool.selection.k_center_greedy`).
    """
    if world is not None and world.size > 1:
        from datapool.selection_sharded import k_center_greedy_sharded

        chosen = k_center_greedy_sharded(
            xc, world=world, pool=pool, n_samples=budget, min_distance=min_distance, prior=prior
        )
    else:
        chosen = k_center_greedy(
            xc, pool=pool, n_samples=budget, min_distance=min_distance, threads=threads,
            prior=prior,
        )  # fmt: skip
    k = len(chosen.indices)
    if budget is not None and k == budget:
        reason = "n_samples"
    elif chosen.next_distance == 0:
        reason = "no candidates left"
    else:
        reason = "min_distance"
    # each pick is the farthest candidate: its normalised distance is 1
    return Combined(
        chosen.indices,
        chosen.min_distances,
        {"diversity": np.ones(k)},
        chosen.next_distance,
        reason,
    )


def _herded(
    xc: torch.Tensor,
    pool: torch.Tensor | None,
    pre_rows: torch.Tensor | None,
    budget: int | None,
    min_distance: float | None,
    strategies: Sequence[StrategyConfig],
    seed: int,
    threads: int | None,
    world: World | None,
) -> Combined:
    """HERDING (:mod:`datapool.herding`) as a :class:`Combined`.

    Recorded per pick: its distance to the pool, pre-selected rows and earlier
    picks, and ``"diversity"``, that distance over plain k-center's radius ``r``
    for the budget (not the running maximum the combination loop records).
    """
    from datapool.herding import herd_and_cover  # imports this module

    cfg = next(c for c in strategies if c.strategy == "herding")
    parts = [t.to(torch.float32) for t in (pool, pre_rows) if t is not None]
    centres = torch.cat(parts) if parts else None
    x = xc.to("cpu", torch.float32)
    # every candidate's distance to the pool, once: no step below reads the pool again
    prior = None if centres is None else torch.from_numpy(_minima(x, centres, threads, world))
    got = herd_and_cover(
        x, prior=prior, n_samples=budget, min_distance=min_distance, radius=cfg.radius,
        bandwidth=cfg.bandwidth, seed=seed, threads=threads, world=world,
    )  # fmt: skip
    idx = torch.from_numpy(got.indices)
    dist = _chain_distances(x[idx], None, None if prior is None else prior[idx])
    cov = _Coverage(x, threads or torch.get_num_threads(), prior)
    cov.add(x[idx])  # the radius left: next_distance
    left = float(cov.d2.max().sqrt()) if x.shape[0] else 0.0
    if budget is not None and len(idx) == budget:
        reason = "n_samples"
    elif left == 0:
        reason = "no candidates left"
    else:
        reason = "min_distance"
    r = got.radius if 0 < got.radius < math.inf else 1.0
    return Combined(got.indices, dist, {"diversity": dist / r}, left, reason)


def _reads_pool_whole(x: torch.Tensor, pool: torch.Tensor, budget: int | None) -> bool:
    """Whether plain k-center's pool pass would keep every row's exact pool minimum (a
    tenth of the rows or more to pick, :mod:`datapool.selection`) over a pool big
    enough for :func:`datapool.pool_index.pruned_minima`: then those minima are
    taken first, as the prior (same picks), so whole chunks of a clustered pool are
    skipped; an engine pass that may stop rows early is left as it is."""
    from datapool.pool_index import MIN_POOL
    from datapool.selection import _TRACK_SHARE  # the engine's own rule, not a copy of it

    big = pool.shape[0] >= MIN_POOL
    return budget is not None and big and budget * _TRACK_SHARE >= x.shape[0]


def _minima(
    x: torch.Tensor, pool: torch.Tensor, threads: int | None, world: World | None
) -> npt.NDArray[np.float32]:
    """Each candidate's exact squared distance to ``pool``, the ranks of ``world`` sharing
    the pass (:func:`datapool.selection_sharded.pool_minima_sharded`)."""
    if world is not None and world.size > 1:
        from datapool.selection_sharded import pool_minima_sharded

        return pool_minima_sharded(x, pool, world=world, threads=threads)
    return pool_minima(x, pool, threads=threads)


def _mask(value: Any, n: int, name: str, default: bool) -> npt.NDArray[np.bool_]:
    """``value`` as a bool [n] mask (``default`` everywhere when None)."""
    if value is None:
        return np.full(n, default)
    out = np.asarray(value, dtype=bool)
    if out.shape != (n,):
        raise InputError(f"{name} must have one flag per candidate ({n}), got shape {out.shape}")
    return out


def _need_scores(scores: ScoreTable | None, cfg: StrategyConfig) -> ScoreTable:
    if scores is None:
        raise InputError(
            f"{cfg.name} reads column {cfg.column!r} but no score file is given "
            "(selection.scores_file)"
        )
    return scores


def _thresholds(
    keep: npt.NDArray[np.bool_],
    configs: Sequence[StrategyConfig],
    scores: ScoreTable | None,
    filenames: Sequence[str],
) -> npt.NDArray[np.int64]:
    """Indices of the rows of ``keep`` that pass every THRESHOLD, in order.

    Raises InputError when a threshold leaves no candidate.
    """
    idx = np.flatnonzero(keep)
    for cfg in configs:
        if cfg.strategy != "threshold" or idx.size == 0:
            continue
        table = _need_scores(scores, cfg)
        values = table.numbers(cfg.column, [filenames[int(i)] for i in idx])
        passed = idx[threshold(values, cfg.operation, cfg.value)]
        if passed.size == 0:
            raise InputError(
                f"threshold {cfg.column} {cfg.operation} {cfg.value:g} leaves none of the "
                f"{idx.size} candidates (values from {table.path} range "
                f"{values.min():g} to {values.max():g})"
            )
        idx = passed
    return idx


def _labels(
    cfg: StrategyConfig,
    rows: npt.NDArray[np.int64],
    filenames: Sequence[str],
    scores: ScoreTable | None,
    weak: Sequence[str] | None,
) -> list[str]:
    """The balance labels of ``rows``: a score-file column, or the weak labels."""
    if cfg.column:
        return list(_need_scores(scores, cfg).labels(cfg.column, [filenames[i] for i in rows]))
    if weak is None:
        raise InputError(f"{cfg.name} balances weak labels, but none are given")
    return [str(weak[i]) for i in rows]


def _balance(
    cfg: StrategyConfig,
    cand: npt.NDArray[np.int64],
    pre: npt.NDArray[np.int64],
    filenames: Sequence[str],
    scores: ScoreTable | None,
    weak: Sequence[str] | None,
) -> Balance:
    """The :class:`Balance` term for candidates ``cand`` after pre-selected rows ``pre``."""
    own = _labels(cfg, cand, filenames, scores, weak)
    targets = balance_targets(own, cfg.target)
    order = {label: j for j, label in enumerate(targets)}
    counts = np.zeros(len(order), dtype=np.int64)
    for label in _labels(cfg, pre, filenames, scores, weak) if pre.size else []:
        if label in order:
            counts[order[label]] += 1
    codes = np.array([order[label] for label in own], dtype=np.int64)
    return Balance(
        cfg.name, cfg.strength, codes, np.array(list(targets.values())), counts, len(pre)
    )


def _objectives(
    configs: Sequence[StrategyConfig],
    xc: torch.Tensor,
    cand: npt.NDArray[np.int64],
    filenames: Sequence[str],
    scores: ScoreTable | None,
    queries: Any,
    seed: int,
    threads: int | None,
    world: World | None = None,
) -> list[Objective]:
    """The fixed objectives (typicality, weights, similarity) over the candidates ``cand``;
    typicality shared across ``world``'s ranks."""
    out = []
    names = [filenames[i] for i in cand]
    for cfg in configs:
        if cfg.strategy == "typicality":
            values = typicality(xc, k=cfg.k, seed=seed, threads=threads, world=world)
        elif cfg.strategy == "weights":
            table = _need_scores(scores, cfg)
            raw = table.numbers(cfg.column, names)
            values = weights(raw, where=lambda i, t=table: t.where(names[i]))
        elif cfg.strategy == "similarity":
            values = similarity(xc, queries, threads=threads)
        else:
            continue
        out.append(Objective(cfg.name, cfg.strength, values))
    return out


def select(
    embeddings: Any,
    filenames: Sequence[str],
    *,
    strategies: Sequence[StrategyConfig] = (),
    pool: Any = None,
    n_samples: int | None = None,
    min_distance: float | None = None,
    relevant: Any = None,
    masked: Any = None,
    preselected: Any = None,
    scores: ScoreTable | None = None,
    labels: Sequence[str] | None = None,
    queries: Any = None,
    seed: int = 0,
    threads: int | None = 1,
    world: World | None = None,
) -> Picks:
    """Choose among ``embeddings`` [n, d] (one row per ``filenames`` entry) by ``strategies``.

    Plain diversity (:func:`is_plain_diversity`) runs on :func:`k_center_greedy`
    over the narrowed candidates with the pre-selected rows added to the pool:
    the same picks and speed as calling it directly. Anything else goes through
    :func:`combine`.

    Args:
        relevant, masked, preselected: bool ``[n]`` masks (e.g.
            :attr:`datapool.strategy_inputs.Flags.mask`); default: all relevant,
            none masked or pre-selected.
        scores: the score file, for ``weights``, ``threshold`` and column ``balance``.
        labels: weak labels ``[n]``, for ``balance`` without a column.
        queries: query embeddings ``[Q, d]`` for ``similarity``.
        n_samples: total picks, pre-selected included; min_distance: as in
            :func:`combine`. At least one is required.
        seed: typicality's reference sample. threads: CPU threads for the
            blocked passes (default 1; None: torch's setting).
        world: the ranks sharing the work (:mod:`datapool.distributed`; every
            rank calls ``select`` with the same arguments and gets the same
            picks): plain diversity by the sharded engine, typicality's
            neighbour search by slices; the combination loop itself runs whole
            on every rank (deterministic, so all ranks agree).

    Raises:
        InputError: every input error named in the module docstring and in
            :mod:`datapool.strategy_inputs`, a row both masked and pre-selected,
            masks of the wrong length, no stopping rule.
    """
    if n_samples is None and min_distance is None:
        raise InputError("selection needs n_samples or min_distance (or both)")
    if n_samples is not None and (isinstance(n_samples, bool) or n_samples < 0):
        raise InputError(f"n_samples must be an integer >= 0, got {n_samples!r}")
    xt, pool_t, _ = checked_inputs(embeddings, pool, None)
    n = xt.shape[0]
    if len(filenames) != n:
        raise InputError(f"{len(filenames)} filenames for {n} embeddings")
    rel = _mask(relevant, n, "relevant", True)
    msk = _mask(masked, n, "masked", False)
    pre = _mask(preselected, n, "preselected", False)
    both = np.flatnonzero(msk & pre)
    if both.size:
        raise InputError(f"{filenames[int(both[0])]!r} is both masked and pre-selected")
    cand = _thresholds(rel & ~msk & ~pre, strategies, scores, filenames)
    pre_idx = np.flatnonzero(pre)
    pre_rows = xt[torch.from_numpy(pre_idx)] if pre_idx.size else None
    pre_dist = np.empty(0) if pre_rows is None else _chain_distances(pre_rows, pool_t)
    budget = None if n_samples is None else max(0, n_samples - pre_idx.size)
    xc = xt if cand.size == n else xt[torch.from_numpy(cand)]
    if is_plain_diversity(strategies):
        centres = pool_t
        if pre_rows is not None:
            parts = [t.to(torch.float32) for t in (pool_t, pre_rows) if t is not None]
            centres = torch.cat(parts)
        prior = None
        if centres is not None and _reads_pool_whole(xc, centres, budget):
            # exact minima first: whole chunks of a clustered pool may be skipped
            prior, centres = torch.from_numpy(_minima(xc, centres, threads, world)), None
        got = _plain(xc, centres, budget, min_distance, threads, world, prior=prior)
    elif any(c.strategy == "herding" for c in strategies):
        got = _herded(xc, pool_t, pre_rows, budget, min_distance, strategies, seed, threads, world)
    else:
        div = [c for c in strategies if c.strategy == "diversity"]
        bal = [c for c in strategies if c.strategy == "balance"]
        got = combine(
            xc,
            pool=pool_t,
            preselected=pre_rows,
            objectives=_objectives(
                strategies, xc, cand, filenames, scores, queries, seed, threads, world
            ),
            balance=_balance(bal[0], cand, pre_idx, filenames, scores, labels) if bal else None,
            diversity=div[0].strength if div else 0.0,
            n_samples=budget,
            min_distance=min_distance,
            guard=div[0].guard if div else 0.0,
            threads=threads,
        )
    nan = np.full(pre_idx.size, math.nan)
    return Picks(
        np.concatenate([pre_idx, cand[got.indices]]).astype(np.int64),
        np.concatenate([pre_dist, got.distances]),
        {k: np.concatenate([nan, v]) for k, v in got.objectives.items()},
        int(pre_idx.size),
        got.next_distance,
        got.reason,
        describe(strategies),
    )
