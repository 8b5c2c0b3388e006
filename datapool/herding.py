"""HERDING: density-seeking picks that still cover every candidate (issue 12's default).

Greedy k-center (plain diversity) covers the candidates with the smallest radius
but spends small budgets on outliers; kernel herding (MaxHerding, Bae et al. 2024)
picks where the candidates are dense and accounts for what earlier picks cover,
but leaves the sparse outskirts uncovered. :func:`herd_and_cover` keeps both: as
many herding picks as possible such that greedy k-center, continued from them,
still brings the coverage radius within ``radius`` times plain k-center's.

The rule, for ``k`` picks from candidates ``X [n, d]`` with a pool ``P [m, d]``
(pre-selected rows included):

1. ``r``: the coverage radius (largest distance from a candidate to its nearest
   centre) after plain k-center's ``k`` picks
   (:func:`datapool.selection.k_center_greedy`; with only ``min_distance``, ``k``
   is the number of picks it makes). ``rho = radius * r`` (default 1.065),
   ``sigma = bandwidth * r`` (default 0.3).
2. ``H``: ``k`` greedy herding picks. Each maximises the coverage gain
   ``g(c) = sum_j max(0, K(c, z_j) - cov_j)`` over the reference rows ``z_j``, with
   ``K(a, b) = exp(-|a - b|^2 / (2 sigma^2))`` and ``cov_j = max K(s, z_j)`` over the
   pool and earlier picks (0 without). The reference rows are all candidates up to
   :data:`SAMPLE` = 10,000, else a seeded uniform sample of 10,000 (the same
   estimate of covered density at a coarser grain, like typicality's). Gains
   only shrink as ``cov`` grows, so a stale gain bounds the current one: each pick
   re-evaluates only the rows with the highest bounds (lazy greedy; ties: lowest
   index). A candidate is eligible as in the combination loop: its distance to
   the pool and earlier picks is > 0 and ``>= min_distance``.
3. ``h``: the largest count (binary search over ``0..k``) such that greedy
   k-center started from the pool and ``H[:h]``, stopping once every candidate is
   closer than ``max(rho, min_distance)``, needs at most ``k - h`` picks. The
   picks are ``H[:h]``, then those k-center picks, then (budget left over) herding
   picks again, continued from all of them. ``h = 0`` always fits (it is plain
   k-center's own run), so the coverage radius ends ``<= max(rho, min_distance)``.
   The search assumes more herding picks never need fewer k-center picks (not
   proven; it only affects how many herding picks are kept, never the bound).

Unlike the combination loop's picks these depend on the budget: ``k`` picks are
not the first ``k`` of ``2k``. Sigma follows ``r``, so the kernel's reach shrinks
as the budget grows (a fixed sigma herds towards the centre of mass at large
budgets and loses to random picks there).

Cost (n candidates, s = min(n, 10,000) reference rows, m pool rows, d dims):
one pass over the pool for every candidate's exact distance to it
(:func:`datapool.selection.pool_minima`; every later step starts from those, so
the pool is never read again), plain k-center once plus about ``log2(k)`` more
runs for the search (each from at most ``k`` herding picks and those distances),
one ``n x s`` kernel pass for the first gains (like typicality's k-NN pass), and
per pick one ``s``-row kernel update, a few O(n) passes over the bounds and
the re-evaluated rows (``s`` kernel values each, 64 rows and up). Measured
(bench/strategies.py, one thread, 1000 picks, 1M x 128 clustered rows, load ~1.5):
277 s, against 5.2 s for plain k-center and 90 s for diversity x typicality; at
200k rows 53 s (about a third each: the first pass, the picks, the k-center runs).
Memory: O(n + s) beyond the inputs, blocks of at most 16 MiB. Deterministic for
given inputs and threads; with several ranks (:mod:`datapool.distributed`) the
k-center runs are shared by the sharded engine and the rest runs whole on every
rank, so all ranks pick the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from datapool.distributed import World
from datapool.selection import cpu_threads, pool_minima
from datapool.strategies import _Coverage  # strategies imports this module only lazily

__all__ = ["SAMPLE", "Herding", "herd_and_cover"]

SAMPLE = 10_000  # reference rows for the coverage gains (module docstring)
_PASS_BYTES = 16 << 20  # kernel block per product in the gain passes
_FIRST_BATCH = 64  # rows re-evaluated per round of the lazy greedy step (doubling)


class Herding:
    """Greedy kernel-herding state over candidates ``x`` [n, d] (module docstring, step 2).

    Args:
        x: candidates, float32 [n, d] on the CPU.
        sigma: kernel bandwidth (> 0), in the units of ``x``.
        ref: reference row indices into ``x``, int64 [s], sorted.
        pool_d2: each candidate's exact squared distance to the centres already
            there (float32 [n], ``inf`` without any): the reference rows' kernel
            coverage starts from it, ``max_c K(c, z) = exp(-min_c |c - z|^2 / 2 sigma^2)``
            (no pass over the pool's rows).
        min_distance: candidates closer than this to a centre are ineligible.

    Eligibility is checked only for the row about to be picked (its distance to
    the picks so far, direct float32 differences): distances only shrink, so a
    row found ineligible stays so, and no per-pick pass over all rows is needed.
    """

    def __init__(
        self,
        x: torch.Tensor,
        sigma: float,
        ref: torch.Tensor,
        pool_d2: torch.Tensor,
        min_distance: float | None,
    ) -> None:
        self.x, self.z, self.pool_d2 = x, x[ref], pool_d2
        self.xn = _Coverage(x, 1).xn  # squared norms, computed in blocks
        self.zn = (self.z * self.z).sum(dim=1)
        self.scale = -1.0 / (2.0 * sigma * sigma)
        self.min_distance = min_distance
        self.picked = x[:0].clone()
        self.cov = pool_d2[ref].mul(self.scale).exp_()  # exp(-inf) = 0: nothing covered
        self.bound = self.gains(torch.arange(x.shape[0]))

    def _kernel(self, a: torch.Tensor, an: torch.Tensor) -> torch.Tensor:
        """``K(a_i, z_j)``, float32 [len(a), s] (one block: callers keep ``a`` small)."""
        g = torch.addmm(self.zn.unsqueeze(0), a, self.z.T, alpha=-2.0)
        g.add_(an.unsqueeze(1)).clamp_(min=0)
        return g.mul_(self.scale).exp_()

    def gains(self, rows: torch.Tensor) -> torch.Tensor:
        """Exact current gains of candidates ``rows`` (int64 [r]), float64 [r], blocked."""
        out = torch.empty(rows.shape[0], dtype=torch.float64)
        step = max(1, _PASS_BYTES // (4 * self.z.shape[0]))
        for s in range(0, rows.shape[0], step):
            idx = rows[s : s + step]
            k = self._kernel(self.x[idx], self.xn[idx])
            out[s : s + step] = (k - self.cov).clamp_(min=0).sum(dim=1, dtype=torch.float64)
        return out

    def _eligible(self, j: int) -> bool:
        """Row ``j``'s distance to the pool and picks is > 0 and ``>= min_distance``."""
        d2 = float(self.pool_d2[j])
        if self.picked.shape[0]:
            d2 = min(d2, float((self.x[j] - self.picked).square().sum(dim=1).min()))
        return d2 > 0 and (self.min_distance is None or math.sqrt(d2) >= self.min_distance)

    def add(self, i: int) -> None:
        """Make candidate ``i`` a centre (its kernel coverage; it is never picked again)."""
        xi = self.x[i : i + 1]
        self.cov = torch.maximum(self.cov, self._kernel(xi, self.xn[i : i + 1])[0])
        self.picked = torch.cat([self.picked, xi])
        self.bound[i] = -math.inf

    def extend(self, picks: list[int], k: int) -> list[int]:
        """``picks`` followed by herding picks (each made a centre) until ``k`` or none is
        eligible; the centres ``picks`` must already be in the state's distances."""
        while len(picks) < k:
            j = self.next()
            if j is None:
                break
            picks.append(j)
            self.add(j)
        return picks

    def next(self) -> int | None:
        """The eligible candidate with the largest gain (lowest index on ties), or None."""
        fresh = torch.zeros(self.x.shape[0], dtype=torch.bool)
        batch = _FIRST_BATCH
        while True:
            j = int(self.bound.argmax())  # the first of equal maxima
            if self.bound[j] == -math.inf:
                return None
            if fresh[j]:
                if self._eligible(j):
                    return j
                self.bound[j] = -math.inf  # for good: distances only shrink
                continue
            stale = torch.where(fresh, -math.inf, self.bound)
            top = stale.topk(min(batch, int((stale > -math.inf).sum()))).indices
            self.bound[top] = self.gains(top)
            fresh[top] = True
            batch *= 2


@dataclass(frozen=True)
class Covered:
    """Result of :func:`herd_and_cover` (indices into the candidates).

    Attributes:
        indices: int64 [k] in pick order: herding picks, k-center's, herding's again.
        herded: how many leading picks are herding picks (``h``).
        radius: plain k-center's coverage radius ``r`` for the same budget.
        bound: the coverage radius guaranteed, ``max(rho, min_distance)``.
    """

    indices: npt.NDArray[np.int64]
    herded: int
    radius: float
    bound: float


def _reference(n: int, sample: int, seed: int) -> torch.Tensor:
    """Reference rows: all ``n`` up to ``sample``, else a seeded uniform sample (sorted)."""
    if n <= sample:
        return torch.arange(n)
    chosen = np.sort(np.random.default_rng(seed).choice(n, size=sample, replace=False))
    return torch.from_numpy(chosen)


def _k_center(
    x: torch.Tensor,
    start: torch.Tensor | None,
    n_samples: int | None,
    min_distance: float | None,
    threads: int | None,
    world: World | None,
    prior: torch.Tensor | None,
) -> tuple[npt.NDArray[np.int64], float]:
    """Greedy k-center's ``(picks, radius after them)`` from centres ``start`` and the
    ``prior`` (exact squared distances to the pool); shared across ``world``'s ranks."""
    from datapool.strategies import _plain  # strategies imports this module

    got = _plain(x, start, n_samples, min_distance, threads, world, prior=prior)
    return got.indices, got.next_distance


def herd_and_cover(
    x: torch.Tensor,
    *,
    pool: torch.Tensor | None = None,
    prior: torch.Tensor | None = None,
    n_samples: int | None = None,
    min_distance: float | None = None,
    radius: float = 1.065,
    bandwidth: float = 0.3,
    seed: int = 0,
    sample: int = SAMPLE,
    threads: int | None = 1,
    world: World | None = None,
) -> Covered:
    """The HERDING picks among candidates ``x`` float32 [n, d] (module docstring).

    Args:
        pool: centres already there (pool and pre-selected rows) [m, d], or None.
        prior: instead of ``pool``, each candidate's exact squared distance to
            those centres (float32 [n], :func:`datapool.selection.pool_minima`):
            the pool is then never read again (every k-center run of the search
            and the kernel coverage start from it).
        n_samples: picks to make; None: at most as many as plain k-center makes
            with ``min_distance``, stopping like it once no candidate is eligible
            (every one closer than ``min_distance``). At least one of the two is
            required (the caller checks).
        radius: the coverage bound as a multiple (>= 1) of plain k-center's radius.
        bandwidth: the kernel's sigma as a multiple (> 0) of that radius.
        seed: the reference sample's seed (above ``sample`` candidates).
        threads: CPU threads for the blocked products (None: torch's setting).
        world: ranks sharing the k-center runs (every rank passes the same inputs).
    """
    n = x.shape[0]
    if prior is None and pool is not None and pool.shape[0]:
        prior = torch.from_numpy(pool_minima(x, pool, threads=threads))
    base, r = _k_center(x, None, n_samples, min_distance, threads, world, prior)
    k = len(base) if n_samples is None else min(n_samples, n)
    if k == 0 or len(base) < k or not 0 < r < math.inf:
        # k-center already stops early or covers everything: nothing to trade
        return Covered(base, 0, r, r)
    bound = max(radius * r, min_distance or 0.0)
    with torch.no_grad(), cpu_threads(threads or torch.get_num_threads()):
        d2 = torch.full((n,), math.inf, dtype=torch.float32) if prior is None else prior.clone()
        state = Herding(x, bandwidth * r, _reference(n, sample, seed), d2, min_distance)
        herd = state.extend([], k)

    def cover(h: int) -> npt.NDArray[np.int64] | None:
        """k-center's picks after ``herd[:h]`` down to ``bound``, or None if over budget."""
        start = x[torch.tensor(herd[:h], dtype=torch.int64)] if h else None
        picks, left = _k_center(x, start, k - h, bound, threads, world, prior)
        return picks if left < bound or len(picks) < k - h else None

    lo, hi, best = 1, len(herd), cover(0)
    h = 0
    while lo <= hi:
        mid = (lo + hi) // 2
        got = cover(mid)
        if got is None:
            hi = mid - 1
        else:
            h, best, lo = mid, got, mid + 1
    assert best is not None  # h = 0 is k-center's own run, which reaches r <= bound
    picks = [*herd[:h], *(int(i) for i in best)]
    if len(picks) < k:
        picks = _fill(x, picks, k, prior, bandwidth * r, min_distance, seed, sample, threads)
    return Covered(np.asarray(picks, dtype=np.int64), h, r, bound)


def _fill(
    x: torch.Tensor,
    picks: list[int],
    k: int,
    prior: torch.Tensor | None,
    sigma: float,
    min_distance: float | None,
    seed: int,
    sample: int,
    threads: int | None,
) -> list[int]:
    """``picks`` continued by herding (centres: the pool, via ``prior``, and ``picks``) up
    to ``k``."""
    with torch.no_grad(), cpu_threads(threads or torch.get_num_threads()):
        cov = _Coverage(x, torch.get_num_threads(), prior)
        cov.add(x[torch.tensor(picks, dtype=torch.int64)])
        state = Herding(x, sigma, _reference(x.shape[0], sample, seed), cov.d2, min_distance)
        return state.extend(list(picks), k)
