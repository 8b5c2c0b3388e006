"""Exact greedy k-center selection over embeddings (DESIGN.md section 4).

The textbook algorithm keeps, for every candidate, the squared Euclidean
distance to its nearest centre (pool row or earlier pick) and repeatedly picks
the farthest candidate: one pass over all candidates per pick. This module
gives the same picks (up to ties within float32 rounding) with far less work:

* Distances only shrink, so a stale value is an upper bound. Every candidate
  row ``i`` keeps ``d2[i]``, the exact minimum over the centres ``[0, ver[i])``
  of the centre sequence (pool rows first, then picks in order).
* A *top set* holds the rows whose bound exceeds a threshold ``theta``, brought
  fully up to date; the best of them is provably the global farthest while its
  distance exceeds ``bound`` (the largest value outside the set). New picks are
  applied directly to the top set only and queued for everybody else.
* When the top set runs out, a *refresh* applies the queued centres, as a
  blocked matrix product ``|x|^2 + |c|^2 - 2 x.c``, to the rows above a lower
  threshold; rows falling below it are dropped early. Results within a
  rigorous float32 error bound of the minimum are re-computed as a direct
  difference ``sum((x - c)^2)``, so every stored value is the textbook value.

Memory: O(n) for ``d2`` and ``ver`` plus blocks bounded by about a tenth of
the input size. Runs wherever the tensors are (CPU or CUDA).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from datapool.errors import InputError

__all__ = ["Selection", "k_center_greedy"]

_CHUNK = 512  # centres per matrix product
_BOOT = 256  # centres applied to every row before the first threshold
_MIN_BUDGET = 16 << 20  # bytes; working blocks never need to be smaller


@dataclass(frozen=True)
class Selection:
    """Result of :func:`k_center_greedy`.

    Attributes:
        indices: int64 ``[k]``, row indices into ``candidates`` in pick order.
        min_distances: float64 ``[k]``, Euclidean distance of each pick to the
            nearest pool row or earlier pick at the moment it was picked;
            ``inf`` for the first pick when the pool is empty or None.
    """

    indices: npt.NDArray[np.int64]
    min_distances: npt.NDArray[np.float64]


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    """Wrap ``x`` (numpy array or tensor, [rows, d] floats) without copying."""
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise InputError(f"{name} must hold floating-point values, got dtype {arr.dtype}")
        with warnings.catch_warnings():  # read-only arrays: we never write
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(arr)
    t: torch.Tensor = x
    if not t.is_floating_point():
        raise InputError(f"{name} must hold floating-point values, got dtype {t.dtype}")
    if t.ndim != 2:
        raise InputError(f"{name} must be a 2-D array [rows, dim], got shape {tuple(t.shape)}")
    return t.detach()


def _check_finite(x: torch.Tensor, name: str, rows: int) -> None:
    """Raise InputError if ``x`` holds NaN or inf (checked ``rows`` at a time)."""
    for s in range(0, x.shape[0], rows):
        block = x[s : s + rows]
        if math.isfinite(float(block.sum())):
            continue  # a NaN or inf anywhere makes the sum non-finite (overflow: re-check)
        bad = (~torch.isfinite(block)).any(dim=1).nonzero()
        if bad.numel():
            raise InputError(f"{name} row {s + int(bad[0, 0])} contains NaN or infinite values")


def _check_limits(n_samples: int | None, min_distance: float | None) -> None:
    """Raise InputError unless at least one stopping rule is given and valid."""
    if n_samples is None and min_distance is None:
        raise InputError("k_center_greedy needs n_samples or min_distance (or both)")
    if n_samples is not None and (isinstance(n_samples, bool) or n_samples < 0):
        raise InputError(f"n_samples must be an integer >= 0, got {n_samples!r}")
    if min_distance is not None and not min_distance >= 0:
        raise InputError(f"min_distance must be a number >= 0, got {min_distance!r}")


def _direct(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise squared distances ``sum((a - b)^2)``, float32 [rows]."""
    diff = a - b
    return (diff * diff).sum(dim=1)


class _Centres:
    """The centre sequence: pool rows ``[0, m)``, then picks in order."""

    def __init__(self, x: torch.Tensor, pool: torch.Tensor | None, dev: torch.device) -> None:
        self.x, self.pool, self.dev = x, pool, dev
        self.m = 0 if pool is None else pool.shape[0]
        self.picked = torch.empty((64, x.shape[1]), dtype=torch.float32, device=dev)
        self.k = 0

    @property
    def total(self) -> int:
        """Number of centres so far."""
        return self.m + self.k

    def add(self, row: torch.Tensor) -> None:
        """Append a picked row (float32 [d] on the device)."""
        if self.k == self.picked.shape[0]:
            self.picked = torch.cat([self.picked, torch.empty_like(self.picked)])
        self.picked[self.k] = row
        self.k += 1

    def get(self, lo: int, hi: int) -> torch.Tensor:
        """Centres ``[lo, hi)`` as float32 [hi - lo, d] on the device."""
        parts = []
        if lo < self.m and self.pool is not None:
            parts.append(self.pool[lo : min(hi, self.m)].to(self.dev, torch.float32))
        if hi > self.m:
            parts.append(self.picked[max(lo, self.m) - self.m : hi - self.m])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _gemm_min(
    xb: torch.Tensor, xn: torch.Tensor, d2b: torch.Tensor, c: torch.Tensor, kappa: float
) -> torch.Tensor:
    """Exact ``min(d2b, min_j |xb - c_j|^2)`` for float32 rows ``xb`` [b, d].

    The product ``|c|^2 - 2 x.c`` (+ ``|x|^2``) gives every squared distance
    to within ``eps = kappa * (|x|^2 + max |c|^2)`` (a rigorous float32 bound);
    only pairs that can still be a row's minimum are re-computed as a direct
    difference. ``xn`` [b] holds ``|xb|^2``. Returns a float32 [b] tensor.
    """
    cn = (c * c).sum(dim=1)
    g = torch.addmm(cn.unsqueeze(0), xb, c.T, alpha=-2.0)
    gmin = g.amin(dim=1).add_(xn)
    eps = kappa * (xn + cn.max())
    rows = ((gmin < d2b + eps) & (d2b > 0)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return d2b
    lim = torch.minimum(gmin[rows] + 2 * eps[rows], d2b[rows] + eps[rows]) - xn[rows]
    if rows.numel() * 4 < xb.shape[0]:
        r, j = (g[rows] <= lim.unsqueeze(1)).nonzero(as_tuple=True)
        r = rows[r]
    else:
        full = torch.full_like(xn, -math.inf).index_copy_(0, rows, lim)
        r, j = (g <= full.unsqueeze(1)).nonzero(as_tuple=True)
    out = d2b.clone()
    step = max(1, xb.shape[0])
    for s in range(0, r.numel(), step):
        ri, ji = r[s : s + step], j[s : s + step]
        out.scatter_reduce_(0, ri, _direct(xb[ri], c[ji]), reduce="amin")
    return out


def _one_min(
    xb: torch.Tensor, xn: torch.Tensor, d2b: torch.Tensor, c: torch.Tensor, kappa: float
) -> None:
    """In place ``d2b = min(d2b, |xb - c|^2)`` for one centre ``c`` [d], exact."""
    cn = float((c * c).sum())
    g = torch.mv(xb, c).mul_(-2.0).add_(xn).add_(cn)
    rows = (g < d2b + kappa * (xn + cn)).nonzero().squeeze(1)
    if rows.numel():
        d2b[rows] = torch.minimum(d2b[rows], _direct(xb[rows], c.unsqueeze(0)))


class _Top:
    """A set of up-to-date rows: indices (ascending), float32 rows, distances."""

    def __init__(self, idx: torch.Tensor, rows: torch.Tensor, d2: torch.Tensor) -> None:
        self.idx, self.rows, self.d2 = idx, rows, d2
        self.rn = (rows * rows).sum(dim=1)

    def best(self) -> tuple[int, float]:
        """Position and squared distance of the farthest row (lowest index on ties)."""
        j = int(torch.argmax(self.d2))
        return j, float(self.d2[j])

    def apply(self, c: torch.Tensor, kappa: float) -> None:
        """Lower the distances by the new centre ``c`` (float32 [d])."""
        _one_min(self.rows, self.rn, self.d2, c, kappa)


class _State:
    """Per-row bounds ``d2`` (float32 [n]) and versions ``ver`` (int64 [n])."""

    def __init__(self, x: torch.Tensor, centres: _Centres, budget: int) -> None:
        n, d = x.shape
        self.x, self.centres, self.dev = x, centres, centres.dev
        self.d2 = torch.full((n,), math.inf, dtype=torch.float32, device=self.dev)
        self.ver = torch.zeros(n, dtype=torch.int64, device=self.dev)
        self.kappa = (2 * d + 8) * 2.0**-24
        self.block = max(64, budget // (4 * (d + 2 * _CHUNK)))

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Candidate rows ``idx`` as float32 [len(idx), d] on the device."""
        return self.x.index_select(0, idx.to(self.x.device)).to(self.dev, torch.float32)

    def refresh(self, theta: float, stop: int) -> None:
        """Apply centres up to ``stop`` to every row above ``theta``.

        Afterwards each row has ``d2 <= theta`` or is exact up to ``stop``.
        """
        todo = ((self.d2 > theta) & (self.ver < stop)).nonzero().squeeze(1)
        todo = todo[torch.argsort(self.ver[todo], stable=True)]
        for s in range(0, todo.numel(), self.block):
            self._refresh_block(todo[s : s + self.block], theta, stop)

    def _refresh_block(self, idx: torch.Tensor, theta: float, stop: int) -> None:
        """:meth:`refresh` for one block of rows (sorted by version)."""
        xb = self.rows(idx)
        xn, d2b, vb = (xb * xb).sum(dim=1), self.d2[idx], self.ver[idx]
        p = int(vb.min())
        while p < stop:
            end = min(p + _CHUNK, stop)
            c = self.centres.get(p, end)  # re-applying [p, ver) is harmless
            act = (vb < end).nonzero().squeeze(1)
            if act.numel() == vb.numel():
                d2b = _gemm_min(xb, xn, d2b, c, self.kappa)
                vb.fill_(end)
            else:
                d2b[act] = _gemm_min(xb[act], xn[act], d2b[act], c, self.kappa)
                vb[act] = end
            keep = d2b > theta
            if not bool(keep.all()):
                drop = ~keep
                self.d2[idx[drop]], self.ver[idx[drop]] = d2b[drop], vb[drop]
                idx, xb, xn, d2b, vb = idx[keep], xb[keep], xn[keep], d2b[keep], vb[keep]
            if idx.numel() == 0:
                return
            p = int(vb.min())
        self.d2[idx], self.ver[idx] = d2b, vb

    def threshold(self, target: int) -> float:
        """The ``target``-th largest bound (0.0 when target covers every row)."""
        n = self.d2.numel()
        if target >= n:
            return 0.0
        return float(torch.kthvalue(self.d2, n - target + 1).values)

    def top(self, t: int) -> tuple[_Top, float] | None:
        """Bring the ~``t`` largest rows up to date; return them and a bound.

        Every row outside the returned set has true squared distance <= bound
        < the set's maximum. None when every row has distance 0.
        """
        target, total = t, self.centres.total
        while True:
            theta = self.threshold(target)
            if theta == math.inf:  # first call: crude bounds for everybody
                self.refresh(-1.0, min(total, int(self.ver.min()) + _BOOT))
                continue
            self.refresh(theta, total)
            cand = (self.d2 > theta).nonzero().squeeze(1)
            if cand.numel() >= max(1, t // 4) or theta == 0.0:
                break
            target *= 4
        return None if cand.numel() == 0 else self._split(cand, t, theta)

    def _split(self, cand: torch.Tensor, t: int, theta: float) -> tuple[_Top, float]:
        """Top set of ``cand`` (ties at the cut kept together) and its bound."""
        vals = self.d2[cand]
        bound = theta
        if cand.numel() > t:
            cut = torch.topk(vals, t).values[-1]
            inside = vals >= cut
            if not bool(inside.all()):
                bound = max(theta, float(vals[~inside].max()))
            cand, vals = cand[inside], vals[inside]
        return _Top(cand, self.rows(cand), vals.clone()), bound

    def store(self, top: _Top) -> None:
        """Write the top set's up-to-date distances back."""
        self.d2[top.idx] = top.d2
        self.ver[top.idx] = self.centres.total


def _pick_phase(
    top: _Top, bound: float, st: _State, limit: int, min_distance: float | None, out: list[Any]
) -> bool:
    """Pick from ``top`` while its best provably beats ``bound``.

    Appends ``(index, distance)`` to ``out``; returns True when selection is
    finished (limit reached or the best distance is below ``min_distance``).
    """
    while len(out) < limit:
        j, v = top.best()
        if v <= bound:
            return min_distance is not None and math.sqrt(max(v, bound)) < min_distance
        if min_distance is not None and math.sqrt(v) < min_distance:
            return True
        out.append((int(top.idx[j]), math.sqrt(v)))
        row = top.rows[j].clone()
        st.centres.add(row)
        top.apply(row, st.kappa)
    return True


def _select(
    x: torch.Tensor,
    pool: torch.Tensor | None,
    dev: torch.device,
    limit: int,
    min_distance: float | None,
    budget: int,
) -> list[Any]:
    """Run the selection; returns ``[(index, distance), ...]`` in pick order."""
    n, d = x.shape
    out: list[Any] = []
    if n == 0 or limit == 0:
        return out
    st = _State(x, _Centres(x, pool, dev), budget)
    if st.centres.m == 0:  # no distances yet: start at row 0
        out.append((0, math.inf))
        st.centres.add(x[0].to(dev, torch.float32))
    t_cap = max(64, budget // 4 // (4 * d))
    while len(out) < limit:
        found = st.top(min(t_cap, max(256, 2 * (limit - len(out)), n // 50)))
        if found is None:
            break
        top, bound = found
        done = _pick_phase(top, bound, st, limit, min_distance, out)
        st.store(top)
        if done:
            break
    return out


def k_center_greedy(
    candidates: Any,
    *,
    pool: Any = None,
    n_samples: int | None = None,
    min_distance: float | None = None,
    device: str | None = None,
    memory_budget: int | None = None,
    threads: int | None = 1,
) -> Selection:
    """Pick candidates greedily, each the farthest from the pool and earlier picks.

    Same picks as the textbook loop (float32 squared distances, running
    minimum, argmax) except where distances tie within float32 rounding.

    Args:
        candidates: ``[n, d]`` numpy array or torch tensor, float32, float16,
            bfloat16 or float64 storage (converted block by block to float32).
        pool: ``[m, d]`` rows already in the dataset, or None / empty.
        n_samples: stop after this many picks.
        min_distance: stop before the first pick whose Euclidean distance to
            the pool and earlier picks would be ``< min_distance``.
        device: where to compute (``"cpu"``, ``"cuda"``...); default: the
            candidates' device. Data is streamed there in blocks.
        memory_budget: bytes for working blocks; default a tenth of the
            candidates' size (at least 16 MiB).
        threads: torch CPU threads during the call (restored afterwards);
            default 1: the many small vector operations stall badly with
            more threads on a busy machine and the products gain little.
            None leaves torch's setting alone.

    Returns:
        :class:`Selection`. With an empty pool the first pick is index 0
        (distance ``inf``). Rows at distance 0 from the pool or an earlier
        pick (duplicates) are never picked; ties go to the lowest index.

    Raises:
        InputError: no stopping rule, negative or NaN limits, non-2-D or
            non-float input, NaN/inf values, or pool and candidates of
            different dimension.
    """
    _check_limits(n_samples, min_distance)
    x = _as_tensor(candidates, "candidates")
    p = None if pool is None else _as_tensor(pool, "pool")
    if p is not None and p.shape[0] > 0 and p.shape[1] != x.shape[1]:
        raise InputError(f"pool has dimension {p.shape[1]} but candidates have {x.shape[1]}")
    budget = memory_budget or max(_MIN_BUDGET, x.numel() * x.element_size() // 10)
    check_rows = max(1, budget // max(1, 8 * x.shape[1]))
    _check_finite(x, "candidates", check_rows)
    if p is not None:
        _check_finite(p, "pool", check_rows)
    dev = torch.device(device) if device is not None else x.device
    limit = x.shape[0] if n_samples is None else min(n_samples, x.shape[0])
    pool_t = p if p is not None and p.shape[0] > 0 else None
    saved = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.no_grad():
            out = _select(x, pool_t, dev, limit, min_distance, budget)
    finally:
        torch.set_num_threads(saved)
    idx = np.fromiter((i for i, _ in out), dtype=np.int64, count=len(out))
    dist = np.fromiter((s for _, s in out), dtype=np.float64, count=len(out))
    return Selection(idx, dist)
