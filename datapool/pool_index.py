"""Exact pool minima that skip whole chunks of the pool (clustered embeddings).

:func:`datapool.selection.pool_minima` needs every candidate's *textbook* squared
distance to its nearest pool row. A plain pass computes all ``n x m`` pairs; on
embeddings that form clusters (a trained model's do) almost all of them are far
from the row's nearest pool row, so most of that work cannot change a minimum.

:func:`pruned_minima` groups the pool rows around ``g`` pivots (evenly spaced pool
rows, ``g`` up to ``m / 128``; each row joins its nearest, by a float32 product:
more pivots than clusters keep a group inside one), cuts the groups into
chunks of at most 1,024 rows, and keeps each chunk's centre ``z`` (float64 mean)
and radius ``R`` (float64, the largest member distance). For a row ``x`` and a
chunk, ``LB = |x - z| - R`` bounds every member's distance from below (triangle
inequality), so the chunk cannot lower the row's exact running minimum ``t``
when ``(1 - 2 g_{d+2}) LB^2 > t + eta``: a textbook value ``fl(sum (x - c)^2)``
is at least ``(1 - g_{d+2})`` times the true squared distance less ``eta =
2^-100`` for underflow (module Notes of :mod:`datapool.selection`; a reviewer's
subnormal rows showed the absolute term is needed), and ``LB`` is computed in
float64 less a slack of
``1e-7 sqrt(d) (|x| + |z| + R)``, above float64's error in ``|x - z|``
(``sqrt(d 2^-52) (|x| + |z|)`` at worst, near ``x = z``) and ``R``. Chunks are
applied with :func:`datapool.selection.exact_min` (the float32 product, then the
direct difference for every pair that may be a minimum), so each row ends with
exactly the textbook minimum the plain pass gives, whatever is skipped.

Candidates are taken in blocks of rows that share a pivot (sorted by their
nearest pivot), each block trying chunks nearest first, so the minima fall early
and whole chunks drop out. Where the data are spread (random directions) nothing
is skipped: a sample of the pool far from every pivot (:func:`_grouped`) or the
first block shows it, and :func:`pruned_minima` hands the rows not done to the
caller's plain pass. Rows far from the origin (float32's bound,
which grows with the norms, wide against the data's spread) go to the plain pass
at once, which centres them in bfloat16. Cost: the grouping, ``m x g x d`` with ``g``
at most ``n / 16`` (a sixteenth of a plain pass), plus the chunks not skipped.
"""

from __future__ import annotations

import math

import torch

from datapool.selection import _ETA, _gamma, error_bound, exact_min

__all__ = ["CHUNK", "MIN_POOL", "pruned_minima"]

CHUNK = 1024  # pool rows per chunk (one centre and radius each)
MIN_POOL = 32 * CHUNK  # pool rows below which a plain pass is cheap enough
_MIN_ROWS = 2048  # candidates: below, the grouping would not pay for itself
_BLOCK = 1024  # candidate rows per block
_MIN_SKIPPED = 0.5  # the first block must skip this share of (row, chunk) pairs


def pruned_minima(
    x: torch.Tensor, pool: torch.Tensor, start: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact textbook pool minima of the rows of ``x`` (float32 [n, d]) over ``pool``
    (float32 [m, d]), starting from ``start`` (float32 [n], exact values or inf).

    Returns ``(minima, done)``: float32 [n] and bool [n], the rows whose minima are
    final (all of them, or only the first block's when the data prove spread: the
    caller's plain pass finishes the others); None when the inputs are too small
    for grouping to pay.
    """
    n, d = x.shape
    m = pool.shape[0]
    if m < MIN_POOL or n < _MIN_ROWS:
        return None
    groups = max(16, min(m // 128, n // 16))
    pivots = pool[_pivots(m, groups)]
    spread = _spread(pivots)
    if _wide_window(pool, spread, error_bound(d)) or not _grouped(pool, pivots, spread):
        return None
    chunks, centres, radii = _chunks(pool, pivots)
    order = torch.argsort(_nearest(x, pivots))
    minima, done = start.clone(), torch.zeros(n, dtype=torch.bool)
    kappa, shrink = error_bound(d), 1.0 - 2.0 * _gamma(d + 2)
    for s in range(0, n, _BLOCK):
        rows = order[s : s + _BLOCK]
        skipped = _block(x[rows], minima, rows, chunks, centres, radii, kappa, shrink)
        done[rows] = True
        if s == 0 and skipped < _MIN_SKIPPED:
            break  # spread data: a plain pass is cheaper than skipping nothing
    return minima, done


def _pivots(m: int, groups: int) -> torch.Tensor:
    """Indices of ``groups`` evenly spaced pool rows."""
    return torch.linspace(0, m - 1, groups, dtype=torch.float64).long()


def _nearest(x: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest pivot (float32 products, in blocks of rows)."""
    pn = (pivots * pivots).sum(dim=1)
    out = torch.empty(x.shape[0], dtype=torch.int64)
    for s in range(0, x.shape[0], 8192):
        g = torch.addmm(pn.unsqueeze(0), x[s : s + 8192], pivots.T, alpha=-2.0)
        out[s : s + 8192] = g.argmin(dim=1)
    return out


def _spread(pivots: torch.Tensor) -> float:
    """The data's spread: the median squared distance between pivots (float64; 0 with
    fewer than two). Both step-aside checks compare against it: computed once, as the
    pairs are ``g^2 / 2`` (~0.3 s at 3,000 pivots)."""
    gaps = torch.pdist(pivots.double()).square()
    return float(gaps.median()) if gaps.numel() else 0.0


def _wide_window(pool: torch.Tensor, spread: float, kappa: float) -> bool:
    """Whether float32's error bound is wide against the data's ``spread`` (rows far from
    the origin: the bound grows with the norms): then :func:`exact_min` re-computes
    nearly every pair directly, and the caller's plain pass (which can centre the rows
    in bfloat16) is far faster."""
    return 2 * kappa * float((pool * pool).sum(dim=1).max()) > 1e-3 * spread


def _grouped(pool: torch.Tensor, pivots: torch.Tensor, spread: float) -> bool:
    """Whether the pool forms groups the pivots can hold: the median squared distance of
    up to 4,096 evenly spaced pool rows to their nearest pivot is under a quarter of the
    ``spread``. Tight clusters measured ~0.1, random directions in 32-128
    dimensions ~0.6-0.7 (nothing to skip there: the grouping would be wasted)."""
    if pivots.shape[0] < 2:
        return False
    sample = pool[_pivots(pool.shape[0], min(4096, pool.shape[0]))].double()
    near = torch.cdist(sample, pivots.double()).amin(dim=1).square()
    return float(near.median()) < 0.25 * spread


def _chunks(
    pool: torch.Tensor, pivots: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The pool cut into chunks of rows near one pivot: the chunks (float32 [<=CHUNK, d]),
    their centres (float64 [k, d]) and radii (float64 [k])."""
    groups = pivots.shape[0]
    near = _nearest(pool, pivots)
    order = torch.argsort(near, stable=True)
    bounds = torch.searchsorted(near[order], torch.arange(groups + 1)).tolist()
    ordered = pool[order]  # one copy, grouped; the chunks are views of it
    chunks, centres, radii = [], [], []
    for gi in range(groups):
        for s in range(bounds[gi], bounds[gi + 1], CHUNK):
            c = ordered[s : min(s + CHUNK, bounds[gi + 1])]
            c64 = c.double()
            z = c64.mean(dim=0)
            chunks.append(c)
            centres.append(z)
            radii.append(float((c64 - z).square().sum(dim=1).max().sqrt()))
    return chunks, torch.stack(centres), torch.tensor(radii, dtype=torch.float64)


def _block(
    xb: torch.Tensor,
    minima: torch.Tensor,
    rows: torch.Tensor,
    chunks: list[torch.Tensor],
    centres: torch.Tensor,
    radii: torch.Tensor,
    kappa: float,
    shrink: float,
) -> float:
    """Apply to rows ``rows`` (``xb``) every chunk that may lower their minima, nearest
    first; updates ``minima[rows]``. Returns the share of (row, chunk) pairs skipped."""
    x64 = xb.double()
    xn = (xb * xb).sum(dim=1)
    dist = torch.cdist(x64, centres)  # float64 [b, k]
    # float64's error in |x - z| (a product form) is below sqrt(d 2^-52) (|x| + |z|)
    slack = 1e-7 * math.sqrt(xb.shape[1])
    norms = x64.norm(dim=1, keepdim=True) + centres.norm(dim=1).unsqueeze(0) + radii.unsqueeze(0)
    lb = (dist - radii.unsqueeze(0) - slack * norms).clamp_(min=0.0)
    lb2 = lb.square_().mul_(shrink)  # below every member's textbook value
    t = minima[rows].clone()
    nearest = lb2.amin(dim=0)
    order = torch.argsort(nearest).tolist()
    skipped = 0
    for i, j in enumerate(order):
        # + _ETA: under underflow each rounding errs absolutely (selection's Notes)
        limit = t.double() + _ETA
        if float(nearest[j]) > float(limit.max()):  # so are all later chunks: nearest first
            skipped += xb.shape[0] * (len(order) - i)
            break
        need = (lb2[:, j] <= limit).nonzero().squeeze(1)
        skipped += xb.shape[0] - need.numel()
        if need.numel():
            t[need] = exact_min(xb[need], xn[need], t[need], chunks[j], kappa)
    minima[rows] = t
    return skipped / max(1, xb.shape[0] * len(chunks))
