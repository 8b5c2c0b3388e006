"""Exact greedy k-center selection over embeddings (DESIGN.md section 4).

The textbook algorithm keeps, for every candidate, the squared Euclidean
distance to its nearest centre (pool row or earlier pick) and repeatedly picks
the farthest candidate: one pass over all candidates per pick. This module
gives the same picks (up to ties within float32 rounding) with far fewer
passes:

* Every row keeps ``a``, the minimum of *approximate* squared distances
  ``|x|^2 + |c|^2 - 2 x.c`` (matrix products) over the centres applied to it.
  Its difference from the textbook value is below the float32 bound
  ``eps = kappa(d) * (|x|^2 + max |c|^2) + eta`` derived in the Notes below;
  distances only shrink, so ``a + eps`` bounds the textbook distance from
  above even while new centres are still queued.
* A *flush* applies the queued centres to all rows in contiguous blocks
  (one matrix product per block, no gathers), then keeps the ``T`` rows with
  the largest upper bound as the *top set*; ``bound`` is the largest upper
  bound outside it.
* Picks come from the top set: new centres are applied to the top set only
  (one matrix-vector product per pick) and queued for everybody else. Only the
  handful of top-set rows whose interval ``[a - eps, a + eps]`` reaches the
  current maximum are made exact, as the minimum over all centres of the
  direct difference ``sum((x - c)^2)`` (every stored exact value is the
  textbook value). The exact best row is the global farthest while it exceeds
  ``bound``; when it no longer does, the queue is flushed and a new top set
  taken.
* With a pool, the initial distances are a blocked product (candidate blocks
  x pool chunks, keeping only the running minimum; never an n x m matrix),
  and most of it is skipped: the distances of an evenly spaced sample
  of rows estimate the level of the ~``2 T``-th farthest row, and a row stops
  receiving pool chunks as soon as its upper bound falls below that level
  (``pver`` records how far it got). Such a row is only an upper bound; it is
  completed (the rest of the pool applied) if it ever reaches the top set, so
  the estimate affects speed, never the picks.
* When ``n_samples`` is at least a tenth of the rows, the pool pass also keeps
  each row's *textbook* minimum over the pool: the
  few pairs whose approximate value comes within ``2 eps`` of the running
  minimum are re-computed directly as they pass. Making a row exact then
  costs only its distances to the picks, never a second pass over the pool
  (at 10k picks against 200k pool rows that second pass was 3/4 of the time).
* On CPUs that compute bfloat16 natively (``avx512_bf16``/``amx_bf16``) and
  when the pool minima are kept exact (above), the pool pass multiplies
  bfloat16 copies of the centred rows, norms included, and takes row minima on
  the bits (:func:`lowp_error_bound`, Notes): 6.5-7.4 ms per 4096 x 1024 x 128
  block against float32's 16-18 ms (one thread, AMD EPYC with avx512_bf16).
  Its larger error only widens the window of pairs re-computed directly;
  every value the picks depend on is still the textbook one, so the picks do
  not change (``pool_precision`` chooses).
* The blocked passes run on ``threads`` CPU threads (default 1: on a busy
  2-core machine two threads made a 200k-row pool case 2.5x slower, 35 s vs
  14 s, while a quiet one gains 1.9x); the per-pick vector work runs on one.

Memory: O(n) for ``a``, the row norms and ``pver``, plus blocks bounded by the
memory budget. Runs wherever the tensors are (CPU or CUDA).

Every loop makes progress: each round of the top-set and exact re-check loops
completes or re-checks at least one more row, and the top set widens until it
holds every row; a round that cannot progress raises ``RuntimeError`` (an
internal error) instead of spinning.

Notes
-----
**Numerics are pinned during the call.** The bound below assumes IEEE float32
products and sums. TF32 (CUDA) or bf16 (oneDNN) matrix products, which
``torch.set_float32_matmul_precision("high"/"medium")`` or the
``torch.backends.*.matmul.fp32_precision`` flags switch on process-wide, and an
enclosing ``torch.autocast`` region, break it. So :func:`k_center_greedy` sets
both backends' matmul precision to ``"ieee"``, disables autocast and sets the
thread count for the duration of the call, and restores the caller's settings
afterwards (the process-global flags are not thread-safe: don't change them
from another thread during a call).

**The error bound.** Let ``u = 2**-24`` (float32 unit roundoff),
``g_k = k u / (1 - k u)``, ``x`` and ``c`` float32 vectors of dimension ``d``,
``S = |x|^2 + |c|^2`` and ``D = |x - c|^2`` in exact arithmetic. Two forms are
compared:

* the *direct* (textbook) form ``t = sum_i (x_i - c_i)^2``: per term a
  rounded difference, squared (two factors ``1 + delta``) and rounded, then
  ``d - 1`` additions in whatever order the reduction uses. Every term carries
  at most ``d + 2`` roundings, so ``|t - D| <= g_{d+2} D <= 2 g_{d+2} S``
  (``D <= (|x| + |c|)^2 <= 2 S``).
* the *GEMM* form ``g = fl(h + xn)`` with ``xn = fl(sum x_i^2)``,
  ``cn = fl(sum c_i^2)`` (``|xn - |x|^2| <= g_d |x|^2``, same for ``cn``) and
  ``h = fl(cn - 2 sum x_i c_i)`` from ``addmm``/``addmv``: a sum of ``d + 1``
  terms (scaling by -2 is exact), each product rounded at most once and at
  most ``d`` additions in any order (blocked, FMA or wider accumulators only
  round less), so ``|h - (cn - 2 x.c)| <= g_{d+1} (cn + 2 |x||c|)``. Since
  ``|c|^2 + 2|x||c| <= phi S`` (``phi = (1 + sqrt 5) / 2``, the maximum of
  ``(1 + 2r) / (1 + r^2)``), ``|h + xn - D| <= E S`` with
  ``E = g_d + phi g_{d+1} (1 + g_d)``, and the last rounding adds
  ``u |h + xn| <= u (2 + E) S``. (``addmv``'s ``fl(fl(xn - 2 x.c) + cn)`` is
  the same count with ``x`` and ``c`` swapped.)

Worst case: ``|g - t| <= K S`` with ``K = E (1 + u) + 2u + 2 g_{d+2}``, to first
order ``(4.62 d + 7.62) u``: more than twice the ``(2d + 8) u`` an earlier
version asserted, although measured errors on random data stay far below
both. ``eps`` is evaluated in float32 from *computed* norms, which can be
``(1 - g_d)`` times the true ones, and ``kappa`` itself is rounded to float32
in the product, so ``kappa = K / ((1 - g_d)(1 - u)^3)`` (times ``1 + 2**-20``,
for its own float64 evaluation and the rounding of ``eps + eta``) makes the
computed ``eps`` at least ``K S``.
Comparisons need no further slack: rounding is monotone, so ``fl(a + eps)``
is still ``>=`` any float32 value that ``a + eps`` is, and the pair filter
compares ``fl(h + xn)`` with a rounded limit, never ``h`` with a difference.
The bound holds for every ``d`` with ``(d + 2) u < 1``; dimensions above
``2**20`` are refused. Relative bounds fail only under underflow: each
rounding then errs by at most ``2**-126`` absolutely (flush-to-zero included),
fewer than ``5d + 20 < 2**23`` such errors enter one comparison, so the
absolute term ``eta = 2**-100`` covers them. Squared norms are kept below
``2**120`` (larger values are refused) so no sum of them overflows.

**The bfloat16 pool pass.** Rows and pool rows are first centred on the pool's
mean ``mu`` (distances do not change; the error scales with the norms): ``x' =
fl(x - mu)``, ``c' = fl(c - mu)``, with computed squared norms ``xn'``, ``cn'``
and ``S' = xn' + cn'``. One product ``g = fl_b([-2x', 1, xn'] . [c', cn', 1])``
gives the squared distance: bfloat16 inputs (unit roundoff ``w = 2**-8``; ``-2``
is exact), products exact in float32, accumulated in float32 and rounded to
bfloat16 once -- how oneDNN's bf16 GEMMs work (an f32 accumulation buffer, one
down-conversion; a test checks the bound on the machine's kernels). Inputs
err by ``(2w + w^2) 2|x'||c'| + w S'``, the sum by ``g_{d+2}`` relative, the
output by ``w |g| <= 2w S'`` (about), so with ``2|x'||c'| <= S'``: ``|g - D'| <=
(5w + O(w^2)) S'``; the centring moves ``D`` by ``4u S'`` and the textbook form
errs by ``2 g_{d+2} S'`` as above. Hence ``|g - t| <= K_b S'`` with ``K_b = (5w +
12w^2 + 8 g_{d+4} + 16u) / (1 - g_{d+4})`` (the divisor for norms computed low,
times ``1 + 2**-10`` for the rounding of ``eps`` itself; about ``0.0198`` at
d = 128, 800x the float32 bound; ``eta`` as above, bfloat16 having float32's
exponent range). The pass never keeps ``g`` as a bound: a row leaves it with its
textbook pool minimum (the ``2 eps`` window argument holds for any valid
``eps``), which is all the rest of the engine reads.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt
import torch

from datapool.errors import InputError
from datapool.hardware import cpu_has_native_bf16

# Beyond the engine, its float32 building blocks are shared with the strategies'
# combination loop (datapool.strategies), so both paths compute one distance.
__all__ = [
    "Nearest",
    "Selection",
    "checked_inputs",
    "cpu_threads",
    "error_bound",
    "exact_min",
    "k_center_greedy",
    "lowp_error_bound",
    "lowp_pool_pass",
    "nearest",
    "pinned_numerics",
    "pool_minima",
]

_CHUNK = 1024  # centres per matrix product
_CACHE = 1 << 21  # bytes of product output per block (stays in cache)
_EXACT_BATCH = 32  # top-set rows made exact at once
_TOP_DIV = 50  # top set: this fraction of the rows (at least 256) ...
_TOP_BYTES = 16 << 20  # ... but its float32 copy at most this size (stays in cache)
_POOL_TOP = 4  # with a pool, the top set holds at most this many rows per pick
_POOL_ROWS = 4096  # candidate rows per block in the pool pass
# ... in the bfloat16 pass (per 4096 rows x 1024 pool rows x 128, product and row minima:
# 6.5-7.4 ms at 512-4096 rows a block, float32's 16-18 ms; half the blocks of 1024 rows
# halve the per-block Python work)
_LOWP_ROWS = 2048
_SAMPLE = 1024  # rows sampled to estimate the level that matters in the pool pass
# "auto" takes the bfloat16 pass below this share of probed pairs in its window
# (measured: 0.0007-0.0008 where it paid, 0.0063-0.010 where it lost; _State._lowp_pays)
_LOWP_SHARE = 0.002
# ... and whatever the pruning when float32's window holds this many times more pairs
# (measured: unit vectors 0.02-0.2x, rows 50 or 1e5 from the origin 44-1400x)
_LOWP_WIDER = 10
_PROBE_MIN = 1 << 24  # multiply-adds of a whole pass below which auto takes float32 unprobed
_TRACK_SHARE = 10  # keep exact pool minima when n_samples >= n / this (see _select)
_MIN_BUDGET = 64 << 20  # bytes; 4096-row pool-pass blocks (~20 % faster than 16 MiB allowed)
_U = 2.0**-24  # float32 unit roundoff
_W = 2.0**-8  # bfloat16 unit roundoff (8 significant bits)
_ETA = 2.0**-100  # absolute slack for underflow (module Notes)
_MAX_DIM = 1 << 20  # the error bound needs (d + 2) * _U < 1; far beyond any embedding
_MAX_SQ = 2.0**120  # largest squared norm accepted: sums of two never overflow float32


def _gamma(k: int) -> float:
    """``g_k = k u / (1 - k u)``: the classic bound on ``k`` float32 roundings."""
    return k * _U / (1 - k * _U)


def lowp_error_bound(d: int) -> float:
    """Relative bound ``K_b`` of the bfloat16 pool pass (module Notes).

    ``|g - t| <= K_b * (xn' + cn')`` for the centred rows' computed squared
    norms; about ``0.0198`` at ``d = 128``.
    """
    g = _gamma(d + 4)
    return (5 * _W + 12 * _W * _W + 8 * g + 16 * _U) / (1 - g) * (1 + 2.0**-10)


def error_bound(d: int) -> float:
    """Relative float32 error bound between the GEMM and direct forms (module Notes).

    ``|g - t| <= kappa * (xn + cmax)`` for computed squared norms ``xn`` of the
    row and ``cmax`` of the largest centre, any dimension ``1 <= d <= 2**20``.
    """

    gamma = _gamma
    phi = (1 + math.sqrt(5)) / 2
    e = gamma(d) + phi * gamma(d + 1) * (1 + gamma(d))
    k = e * (1 + _U) + 2 * _U + 2 * gamma(d + 2)
    return k / ((1 - gamma(d)) * (1 - _U) ** 3) * (1 + 2.0**-20)


def _stuck(where: str) -> RuntimeError:
    """The error for a loop that could not make progress: a bug, never a hang."""
    return RuntimeError(
        f"internal error in k_center_greedy: {where} made no progress; please report it "
        "with the data that triggers it"
    )


@contextlib.contextmanager
def pinned_numerics(device_type: str, threads: int | None) -> Iterator[None]:
    """Full float32 products, no autocast and ``threads`` CPU threads, restored on exit.

    ``threads`` is the count for the per-pick work; the blocked passes switch
    to their own count (:func:`cpu_threads`) and back.

    The error bound (module Notes) assumes IEEE float32 arithmetic, which the
    caller's process-wide matmul precision (TF32 on CUDA, bf16 in oneDNN) or an
    enclosing autocast region would silently change.
    """
    mkldnn: Any = torch.backends.mkldnn  # its ``matmul`` is missing from torch's stubs
    backends = (torch.backends.cuda.matmul, mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    # cuBLAS may otherwise round a bf16 product's partial sums to bf16 (the bfloat16 pool
    # pass's bound assumes float32 accumulation and one rounding)
    cuda = torch.backends.cuda.matmul
    saved_reduction = cuda.allow_bf16_reduced_precision_reduction
    saved_threads = torch.get_num_threads()
    no_autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if torch.amp.is_autocast_available(device_type):
        no_autocast = torch.autocast(device_type=device_type, enabled=False)
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        cuda.allow_bf16_reduced_precision_reduction = False
        if threads is not None:
            torch.set_num_threads(threads)
        with no_autocast, torch.no_grad():
            yield
    finally:
        for b, value in zip(backends, saved, strict=True):
            b.fp32_precision = value
        cuda.allow_bf16_reduced_precision_reduction = saved_reduction
        torch.set_num_threads(saved_threads)


@contextlib.contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch CPU threads, then the previous count again."""
    before = torch.get_num_threads()
    if count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


PoolPrecision = Literal["auto", "float32", "bfloat16"]
POOL_PRECISIONS: tuple[PoolPrecision, ...] = ("auto", "float32", "bfloat16")


def lowp_pool_pass(device: torch.device, precision: str) -> bool:
    """Whether the pool pass multiplies in bfloat16 (module Notes) on ``device``.

    ``"auto"``: on CPUs that compute bfloat16 natively (elsewhere oneDNN emulates it,
    slower than float32); not on GPUs yet (unmeasured, and cuBLAS may reduce in
    bfloat16). ``"bfloat16"`` forces it (correct anywhere, only slower), ``"float32"``
    never. Raises InputError for another value.
    """
    if precision not in POOL_PRECISIONS:
        known = ", ".join(POOL_PRECISIONS)
        raise InputError(f"pool_precision must be one of {known}, got {precision!r}")
    if precision != "auto":
        return precision == "bfloat16"
    return device.type == "cpu" and cpu_has_native_bf16()


_F = TypeVar("_F", bound=Callable[..., None])


def _blocked(method: _F) -> _F:
    """Mark a :class:`_State` method as a blocked pass: it runs on ``pass_threads``."""

    @functools.wraps(method)
    def run(self: _State, *args: Any) -> None:
        with cpu_threads(self.pass_threads):
            method(self, *args)

    return cast(_F, run)


@dataclass(frozen=True)
class Selection:
    """Result of :func:`k_center_greedy`.

    Attributes:
        indices: int64 ``[k]``, row indices into ``candidates`` in pick order.
        min_distances: float64 ``[k]``, Euclidean distance of each pick to the
            nearest pool row or earlier pick at the moment it was picked;
            ``inf`` for the first pick when the pool is empty or None.
        next_distance: Euclidean distance from the pool and every pick to the
            farthest candidate left unpicked: the distance the next pick would
            have had, i.e. the coverage radius of the candidates after this
            selection (below ``min_distance`` when that rule stopped it).
            ``0.0`` when no candidate is left (or only duplicates), ``inf``
            when nothing was picked and there is no pool.
    """

    indices: npt.NDArray[np.int64]
    min_distances: npt.NDArray[np.float64]
    next_distance: float


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


def _check_finite(x: torch.Tensor, name: str, rows: int, first: int = 0) -> None:
    """Raise InputError if ``x`` holds NaN or inf (checked ``rows`` at a time).

    ``first`` is the row number of ``x[0]`` in messages (a slice of a larger array).
    """
    for s in range(0, x.shape[0], rows):
        block = x[s : s + rows]
        if math.isfinite(float(block.sum())):
            continue  # a NaN or inf anywhere makes the sum non-finite (overflow: re-check)
        bad = (~torch.isfinite(block)).any(dim=1).nonzero()
        if bad.numel():
            row = first + s + int(bad[0, 0])
            raise InputError(f"{name} row {row} contains NaN or infinite values")


def _check_norms(sq: torch.Tensor, name: str, first: int) -> torch.Tensor:
    """Return squared norms ``sq`` (rows ``first``...) or raise InputError if one is too large."""
    big = (sq > _MAX_SQ).nonzero()
    if big.numel():
        raise InputError(
            f"{name} row {first + int(big[0, 0])} has a squared norm above 2**120: "
            "its distances would overflow float32; rescale the embeddings"
        )
    return sq


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


def exact_min(
    xb: torch.Tensor, xn: torch.Tensor, d2b: torch.Tensor, c: torch.Tensor, kappa: float
) -> torch.Tensor:
    """Exact ``min(d2b, min_j |xb - c_j|^2)`` for float32 rows ``xb`` [b, d].

    The product ``|c|^2 - 2 x.c`` (+ ``|x|^2``) gives every squared distance
    to within ``eps = kappa * (|x|^2 + max |c|^2) + eta`` (module Notes); only
    pairs that can still be a row's minimum are re-computed as a direct
    difference. ``xn`` [b] holds ``|xb|^2``. Returns a float32 [b] tensor.
    """
    cn = (c * c).sum(dim=1)
    g = torch.addmm(cn.unsqueeze(0), xb, c.T, alpha=-2.0)
    gmin = g.amin(dim=1).add_(xn)
    eps = (xn + cn.max()).mul_(kappa).add_(_ETA)
    # a pair beats d2b only if g <= t + eps < d2b + eps; "<=" keeps a pair whose
    # limit rounded down onto it
    rows = ((gmin <= d2b + eps) & (d2b > 0)).nonzero().squeeze(1)
    if rows.numel() == 0:
        return d2b
    # the row's minimum is within 2 eps of gmin; compared as fl(h + xn), like gmin
    lim = torch.minimum(gmin[rows] + 2 * eps[rows], d2b[rows] + eps[rows])
    if rows.numel() * 4 < xb.shape[0]:
        r, j = (g[rows].add_(xn[rows].unsqueeze(1)) <= lim.unsqueeze(1)).nonzero(as_tuple=True)
        r = rows[r]
    else:
        full = torch.full_like(xn, -math.inf).index_copy_(0, rows, lim)
        r, j = (g.add_(xn.unsqueeze(1)) <= full.unsqueeze(1)).nonzero(as_tuple=True)
    out = d2b.clone()
    step = max(1, xb.shape[0])
    for s in range(0, r.numel(), step):
        ri, ji = r[s : s + step], j[s : s + step]
        out.scatter_reduce_(0, ri, _direct(xb[ri], c[ji]), reduce="amin")
    return out


@dataclass
class _Rows:
    """A block of candidate rows in the pool pass: float32 ``x`` [b, d], squared norms
    ``xn`` [b]; for the bfloat16 pass ``low`` [b, d + 2], ``[-2 x', 1, xn']`` in bfloat16
    (``x'`` the centred row), and ``xnc`` [b], the float32 ``xn'``."""

    x: torch.Tensor
    xn: torch.Tensor
    low: torch.Tensor
    xnc: torch.Tensor
    pos: torch.Tensor  # int64 [b]: each row's position in the block it was cut from

    def take(self, keep: torch.Tensor) -> _Rows:
        """The rows where the boolean [b] ``keep`` is true."""
        return _Rows(*(t[keep] for t in (self.x, self.xn, self.low, self.xnc, self.pos)))

    def head(self, count: int) -> _Rows:
        """The first ``count`` rows."""
        return _Rows(*(t[:count] for t in (self.x, self.xn, self.low, self.xnc, self.pos)))


class _Pending:
    """Pairs of the bfloat16 pass that may hold a row's textbook pool minimum.

    A pair within ``2 eps`` of its row's running minimum when its chunk passes is
    recorded here rather than re-computed at once: most drop out of the window as
    the minimum keeps falling (re-computing each at once cost 60 % of a 20k-row
    pool's pass). :meth:`settle` re-computes those still within ``2 eps`` of
    their row's minimum then (any later minimum only keeps fewer; the true
    minimum's pair always stays) into ``exact``, the textbook minimum per block
    position. Entries are settled early when they pass ``cap``, so memory stays
    bounded however many pairs tie.
    """

    def __init__(self, st: _State, x: torch.Tensor, exact: torch.Tensor, cap: int) -> None:
        self.st, self.x, self.exact, self.cap = st, x, exact, cap
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.count = 0

    def add(self, pos: torch.Tensor, pool_rows: torch.Tensor, g: torch.Tensor) -> None:
        """Record pairs (block position, global pool row, approximate distance)."""
        self.parts.append((pos, pool_rows, g))
        self.count += pos.numel()

    def full(self) -> bool:
        """Whether the entries should be settled now (memory)."""
        return self.count > self.cap

    def settle(self, limit: torch.Tensor, which: torch.Tensor | None = None) -> None:
        """Re-compute the entries of rows ``which`` (bool [b]; all when None) whose value is
        within their row's ``limit`` (float32 [b], by position); keep the others."""
        if not self.parts:
            return
        pos, rows, g = (torch.cat(t) for t in zip(*self.parts, strict=True))
        self.parts, self.count = [], 0
        if which is not None:
            later = ~which[pos]
            if bool(later.any()):
                self.add(pos[later], rows[later], g[later])
            pos, rows, g = pos[~later], rows[~later], g[~later]
        ok = g <= limit[pos]
        pos, rows = pos[ok], rows[ok]
        pool = self.st.centres.pool
        assert pool is not None  # pairs come from pool chunks
        c = pool.index_select(0, rows.to(pool.device)).to(self.st.dev, torch.float32)
        self.exact.scatter_reduce_(0, pos, _direct(self.x[pos], c), reduce="amin")


def _bf16_row_min(g: torch.Tensor) -> torch.Tensor:
    """Row minima (float32 [b]) of bfloat16 ``g`` [b, k].

    Non-negative bfloat16 values order like their bits read as int16, and an int16
    minimum runs ~7x faster than a bfloat16 one here (0.04 vs 0.28 ms per 1024 x
    1024). Rows holding a value with the sign bit set (approximate distances just
    below 0, or -0.0) are taken again as floats.
    """
    bits = g.view(torch.int16).amin(dim=1)
    out = bits.view(torch.bfloat16).float()
    neg = bits < 0
    if bool(neg.any()):
        out[neg] = g[neg].float().amin(dim=1)
    return out


class _Centres:
    """The centre sequence: pool rows first, then picks in order."""

    def __init__(self, pool: torch.Tensor | None, d: int, dev: torch.device) -> None:
        self.pool, self.dev = pool, dev
        self.m = 0 if pool is None else pool.shape[0]
        self.picked = torch.empty((64, d), dtype=torch.float32, device=dev)
        self.k = 0

    def add(self, row: torch.Tensor) -> None:
        """Append a picked row (float32 [d] on the device)."""
        if self.k == self.picked.shape[0]:
            self.picked = torch.cat([self.picked, torch.empty_like(self.picked)])
        self.picked[self.k] = row
        self.k += 1

    def pool_chunks(self, size: int) -> Iterator[torch.Tensor]:
        """Pool rows as float32 blocks of ``size`` rows on the device."""
        if self.pool is not None:
            for s in range(0, self.m, size):
                yield self.pool[s : s + size].to(self.dev, torch.float32)


class _State:
    """Approximate distances ``a`` (float32 [n]) and row norms ``xn`` of all rows."""

    def __init__(
        self, x: torch.Tensor, centres: _Centres, budget: int, pass_threads: int = 1
    ) -> None:
        n, d = x.shape
        self.pass_threads = pass_threads  # CPU threads for the blocked products
        self.x, self.centres, self.dev = x, centres, centres.dev
        self.a = torch.full((n,), math.inf, dtype=torch.float32, device=self.dev)
        self.xn = torch.empty(n, dtype=torch.float32, device=self.dev)
        self.kappa = error_bound(d)
        self.cmax = 0.0  # largest squared norm of any centre applied so far
        self.budget = budget
        self.queued = 0  # picks [queued, k) not yet applied to every row
        self.pool_chunks: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.pver: torch.Tensor | None = None  # pool rows applied per row, if not all
        # textbook minimum over the pool rows applied so far (exact, not a bound), kept
        # only when many rows will be made exact (``track``, set by the caller)
        self.tpool = torch.full((n,), math.inf, dtype=torch.float32, device=self.dev)
        self.track = False
        self.pool_cmax = 0.0  # largest squared norm of a pool row
        # bfloat16 pool pass (module Notes); set by the caller before first_pass, with track
        self.lowp = False
        # "auto": first_pass keeps ``lowp`` only where it pays (:meth:`_lowp_pays`)
        self.lowp_probe = False
        self.kappa_lowp = lowp_error_bound(d)
        self.pool_lowp: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mu = torch.zeros(d, dtype=torch.float32, device=self.dev)  # the pool's mean
        self.lowp_cmax = 0.0  # largest squared norm of a centred pool row
        # textbook squared distances to centres outside ``pool`` (k_center_greedy's prior)
        self.prior: torch.Tensor | None = None

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Candidate rows ``idx`` as float32 [len(idx), d] on the device."""
        return self.x.index_select(0, idx.to(self.x.device)).to(self.dev, torch.float32)

    def slack(self, xn: torch.Tensor) -> torch.Tensor:
        """``eps`` (float32, shaped like ``xn``): bound on |approximate - textbook| per row."""
        return (xn + self.cmax).mul_(self.kappa).add_(_ETA)

    def _block_rows(self, q: int) -> int:
        """Rows per block so that a [rows, q] product stays cache- and budget-sized."""
        d = self.x.shape[1]
        return max(256, min(_CACHE // (4 * max(q, 1)), self.budget // (8 * (d + q))))

    def _apply(
        self,
        lo: int,
        hi: int,
        xb: torch.Tensor,
        c: torch.Tensor,
        cn: torch.Tensor,
        buf: torch.Tensor,
    ) -> None:
        """``a[lo:hi] = min(a[lo:hi], approx |xb - c_j|^2)`` for centres ``c`` (norms ``cn``)."""
        g = buf[: hi - lo, : c.shape[0]]
        torch.addmm(cn.unsqueeze(0), xb, c.T, alpha=-2.0, out=g)
        gmin = g.amin(dim=1).add_(self.xn[lo:hi])
        torch.minimum(self.a[lo:hi], gmin, out=self.a[lo:hi])

    def _pool(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pool rows as float32 chunks of ``_CHUNK`` rows with their squared norms."""
        if self.pool_chunks is None:
            # One tensor for all norms: a small result allocated between each chunk's
            # 512 KB temporary pinned the freed temporaries in the heap (+517 MB at 1M rows).
            norms = torch.empty(self.centres.m, dtype=torch.float32, device=self.dev)
            self.pool_chunks = []
            for j, c in enumerate(self.centres.pool_chunks(_CHUNK)):
                cn = norms[j * _CHUNK : j * _CHUNK + c.shape[0]]
                torch.sum(c * c, dim=1, out=cn)
                self.pool_chunks.append((c, cn))
            _check_norms(norms, "pool", 0)
            self.pool_cmax = float(norms.max()) if self.centres.m else 0.0
            self.cmax = max(self.cmax, self.pool_cmax)
        return self.pool_chunks

    def _pool_lowp(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Centred pool rows as bfloat16 chunks (views of one tensor) with their float32
        squared norms; sets ``mu`` (the pool's mean) and ``lowp_cmax``."""
        if self.pool_lowp is None:
            chunks = self._pool()
            m, d = self.centres.m, self.x.shape[1]
            total = torch.zeros(d, dtype=torch.float64, device=self.dev)
            for c, _ in chunks:
                total += c.sum(dim=0, dtype=torch.float64)
            self.mu = (total / max(m, 1)).float()
            # one tensor each, filled in place: kept chunks allocated between the
            # temporaries would pin them in the heap (see _pool)
            low = torch.ones((m, d + 2), dtype=torch.bfloat16, device=self.dev)
            norms = torch.empty(m, dtype=torch.float32, device=self.dev)
            self.pool_lowp = []
            for j, (c, _) in enumerate(chunks):
                s, e = j * _CHUNK, j * _CHUNK + c.shape[0]
                centred = c - self.mu
                torch.sum(centred * centred, dim=1, out=norms[s:e])
                low[s:e, :d].copy_(centred)
                low[s:e, d].copy_(norms[s:e])  # [c', cn', 1]: the product adds both norms
                self.pool_lowp.append((low[s:e], norms[s:e]))
            self.lowp_cmax = float(norms.max()) if m else 0.0
        return self.pool_lowp

    def _pool_chunk(
        self,
        rows: _Rows,
        ab: torch.Tensor,
        tb: torch.Tensor,
        j: int,
        pending: _Pending | None = None,
    ) -> None:
        """Apply pool chunk ``j`` to ``rows`` in place: ``ab`` approximate, ``tb`` exact minima.

        A pair can be a row's textbook minimum over the whole pool only if its
        approximate value is within ``2 eps`` of the row's final approximate
        minimum (see :func:`exact_min`), hence within ``2 eps`` of the running
        minimum when its chunk is applied (the running minimum only falls). Those
        pairs, usually one per row and chunk that lowers the minimum, are
        re-computed directly, so ``tb`` ends as the textbook minimum without a
        second pass over the pool. In the bfloat16 pass (``lowp``) ``g`` is the
        centred rows' product and ``eps`` its bound (module Notes); the pairs go to
        ``pending`` (None: approximate minima only) instead of ``tb``, and ``ab``
        must start from the exact minimum so far (exact values are valid
        approximations).
        """
        if self.lowp:
            self._lowp_chunk(rows, ab, j, pending)
            return
        c, cn = self._pool()[j]
        g = torch.addmm(cn.unsqueeze(0), rows.x, c.T, alpha=-2.0)
        gm = g.amin(dim=1).add_(rows.xn)
        torch.minimum(ab, gm, out=ab)
        if not self.track:
            return
        lim = self.pool_slack(rows).mul_(2).add_(ab)
        sel = (gm <= lim).nonzero().squeeze(1)
        if sel.numel() == 0:
            return
        gr = g[sel] if sel.numel() < rows.x.shape[0] else g
        r, k = (gr.add_(rows.xn[sel].unsqueeze(1)) <= lim[sel].unsqueeze(1)).nonzero(as_tuple=True)
        r = sel[r]
        tb.scatter_reduce_(0, rows.pos[r], _direct(rows.x[r], c[k]), reduce="amin")

    def _lowp_chunk(self, rows: _Rows, ab: torch.Tensor, j: int, pending: _Pending | None) -> None:
        """:meth:`_pool_chunk` in the bfloat16 pass: pairs in the window go to ``pending``."""
        g = self._lowp_products(rows, j)
        gm = _bf16_row_min(g)
        torch.minimum(ab, gm, out=ab)
        if pending is None:
            return
        lim = self.pool_slack(rows).mul_(2).add_(ab)
        sel = (gm <= lim).nonzero().squeeze(1)
        if sel.numel() == 0:
            return
        gr = (g[sel] if sel.numel() < rows.x.shape[0] else g).float()
        r, k = (gr <= lim[sel].unsqueeze(1)).nonzero(as_tuple=True)
        pending.add(rows.pos[sel[r]], k + j * _CHUNK, gr[r, k])

    def pool_slack(self, rows: _Rows) -> torch.Tensor:
        """``eps`` of the pool pass for ``rows`` (float32 [b]): the bfloat16 bound on the
        centred norms when ``lowp``, else the float32 one."""
        if self.lowp:
            return (rows.xnc + self.lowp_cmax).mul_(self.kappa_lowp).add_(_ETA)
        return (rows.xn + self.pool_cmax).mul_(self.kappa).add_(_ETA)

    def _lowp_products(self, rows: _Rows, j: int) -> torch.Tensor:
        """Approximate squared distances (bfloat16 [b, chunk]) of centred ``rows`` and pool
        chunk ``j``: ``[-2 x', 1, xn'] . [c', cn', 1]``, bfloat16 inputs, one rounding;
        within ``K_b (xn' + cn')`` of the textbook values (module Notes)."""
        return torch.mm(rows.low, self._pool_lowp()[j][0].T)

    def _rows_of(self, xb: torch.Tensor, xn: torch.Tensor) -> _Rows:
        """Rows ``xb`` (norms ``xn``) with their centred bfloat16 copy when ``lowp``."""
        pos = torch.arange(xb.shape[0], device=self.dev)
        if not self.lowp:
            return _Rows(xb, xn, xb[:, :0], xn, pos)
        self._pool_lowp()  # sets mu
        centred = xb - self.mu
        xnc = (centred * centred).sum(dim=1)
        d = xb.shape[1]
        low = torch.ones((xb.shape[0], d + 2), dtype=torch.bfloat16, device=self.dev)
        low[:, :d].copy_(centred * -2.0)  # -2 x' rounds as x' does
        low[:, d + 1].copy_(xnc)
        return _Rows(xb, xn, low, xnc, pos)

    def _prunes(self, keep: int) -> bool:
        """Whether the pool pass may stop rows early (:meth:`_drop_level`): fewer than half
        the rows are to be kept, and there are enough to sample a level from."""
        n = self.x.shape[0]
        return keep < n // 2 and min(_SAMPLE, n // 4) >= 64

    def _lowp_pays(self, *, prunes: bool) -> bool:
        """Whether the bfloat16 pass beats float32 here (``pool_precision="auto"``).

        Its products are ~2.3x faster, but every pair within ``2 eps`` of its row's
        running minimum is kept and re-computed, and its ``eps`` is ~800x float32's
        on centred rows (module Notes). Probed on up to 256 evenly spaced rows against
        up to 8 evenly spaced pool chunks (float32): the share of pairs within each
        pass's ``2 eps`` of their row's minimum. On unit vectors it paid only without
        pruning (``prunes``: rows may stop early, which float32 does cheaply; with it
        0.98-1.2x float32's time on spread rows, 1.5-2.1x on tight clusters) and
        with a thin window: spread data measured a share of 0.0007-0.0008 and took
        0.45-0.81x float32's time, tight clusters 0.0063-0.010 and 1.6-2.35x
        (docs/BENCHMARKS.md). Far from the origin float32's own window (its ``eps``
        grows with the uncentred norms) holds nearly every pair, and the centred
        bfloat16 pass wins whatever the pruning (0.08 vs 1.9 s at 1e5 from the origin).
        """
        n, chunks = self.x.shape[0], self._pool()
        if n * self.centres.m * self.x.shape[1] < _PROBE_MIN:
            return False  # the probe would be most of the pass: float32 is cheap here anyway
        idx = torch.linspace(0, n - 1, min(256, n), dtype=torch.float64, device=self.dev).long()
        js = sorted({int(v) for v in torch.linspace(0, len(chunks) - 1, min(8, len(chunks)))})
        # (chunk by chunk, no temporary beyond one chunk's centred copy: freed blocks of
        # that size stay in the heap, ~100 MB more at d = 2048 before)
        mu = torch.stack([chunks[j][0].sum(dim=0) for j in js]).sum(dim=0)
        mu /= sum(chunks[j][0].shape[0] for j in js)
        x = self.rows(idx)
        xc = x - mu
        xn = (xc * xc).sum(dim=1)
        columns, cn_max = [], 0.0
        for j in js:  # one chunk's centred copy at a time (memory: the budget's blocks)
            cc = chunks[j][0] - mu
            products = torch.mm(xc, cc.T)
            cn = cc.mul_(cc).sum(dim=1)
            columns.append(products.mul_(-2.0).add_(cn.unsqueeze(0)))
            cn_max = max(cn_max, float(cn.max()))
        g = torch.cat(columns, dim=1).add_(xn.unsqueeze(1))  # <= 256 x 8192 float32
        gm = g.amin(dim=1)
        eps_b = (xn + cn_max).mul_(2 * self.kappa_lowp)
        c_max = max(float(chunks[j][1].max()) for j in js)  # uncentred, as _pool stored them
        eps_f = ((x * x).sum(dim=1) + c_max).mul_(2 * self.kappa)
        share_b = float((g <= (gm + eps_b).unsqueeze(1)).float().mean())
        share_f = float((g <= (gm + eps_f).unsqueeze(1)).float().mean())
        if share_f > _LOWP_WIDER * share_b:
            return True
        return not prunes and share_b < _LOWP_SHARE

    def _drop_level(self, keep: int) -> float:
        """Estimated squared distance of the ``keep``-th farthest row from the pool.

        Exact min distances of an evenly spaced sample of rows; rows whose upper
        bound falls to this level during the pool pass stop receiving pool rows
        (they are completed later only if they reach the top set).
        """
        n = self.x.shape[0]
        if not self._prunes(keep):
            return -math.inf
        ns = min(_SAMPLE, n // 4)
        idx = torch.linspace(0, n - 1, ns, dtype=torch.float64, device=self.dev).long()
        xs = self.rows(idx)
        rows = self._rows_of(xs, (xs * xs).sum(dim=1))
        t = torch.full_like(rows.xn, math.inf)
        if self.prior is not None:
            t = self.prior[idx].clone()
        track, self.track = self.track, False  # an estimate: approximate minima suffice
        try:
            for j in range(len(self._pool())):
                self._pool_chunk(rows, t, t, j)
        finally:
            self.track = track
        rank = max(1, ns * keep // n)
        return float(torch.topk(t, rank).values[-1])

    @_blocked
    def first_pass(self, keep: int) -> None:
        """Row norms, and the pool applied to every row (blocked product, running min).

        Rows of a block whose upper bound drops below the estimated level of the
        ``keep``-th farthest row stop early; ``pver`` records how many pool rows
        they received.
        """
        n, m = self.x.shape[0], self.centres.m
        if m and self.lowp and self.lowp_probe:  # before the block size, which depends on it
            self._pool()
            self.lowp = self._lowp_pays(prunes=self._prunes(keep))
        most = _LOWP_ROWS if self.lowp else _POOL_ROWS
        b = max(256, min(most, self.budget // (8 * (self.x.shape[1] + _CHUNK))))
        if m == 0:
            for s in range(0, n, b):
                xb = self.x[s : s + b].to(self.dev, torch.float32)
                self.xn[s : s + b] = _check_norms((xb * xb).sum(dim=1), "candidates", s)
            if self.prior is not None:
                self.a, self.tpool = self.prior.clone(), self.prior.clone()
            return
        self._pool()  # norms and the largest one, before the level is estimated
        theta = self._drop_level(keep)
        pver = torch.full((n if theta > -math.inf else 0,), m, dtype=torch.int64, device=self.dev)
        if theta > -math.inf:
            self.pver = pver
        for s in range(0, n, b):
            e = min(n, s + b)
            xb = self.x[s:e].to(self.dev, torch.float32)
            xn = _check_norms((xb * xb).sum(dim=1), "candidates", s)
            self.xn[s:e] = xn
            self._block_pass(self._rows_of(xb, xn), s, theta, pver)

    def _block_pass(self, rows: _Rows, s: int, theta: float, pver: torch.Tensor) -> None:
        """The pool pass of rows ``s...`` (``rows``): fills ``a``, ``tpool`` and ``pver``."""
        chunks = self._pool()
        # exact values are valid approximations: the window argument holds from them
        ab = self._start(s, rows.xn)
        tb = self._start(s, rows.xn)  # textbook minima by position
        pending = _Pending(self, rows.x, tb, self.budget // 24) if self.lowp else None
        for j in range(len(chunks)):
            self._pool_chunk(rows, ab, tb, j, pending)
            if pending is not None and pending.full():
                self._settle(pending, rows, ab)
            if theta == -math.inf or j == len(chunks) - 1:
                continue
            if pending is None:
                keep_rows = ab + self.pool_slack(rows) > theta
            else:  # bfloat16's bound is loose: decide on exact minima where it is unsure
                unsure = ab - self.pool_slack(rows) <= theta
                if not bool(unsure.any()):
                    continue
                self._settle(pending, rows, ab, which=rows.pos[unsure])
                keep_rows = tb[rows.pos] > theta  # others: tb >= textbook > theta
            if bool(keep_rows.all()):
                continue
            drop = ~keep_rows
            done = rows.pos[drop]
            self.a[s + done] = tb[done] if pending is not None else ab[drop]
            self.tpool[s + done] = tb[done]
            pver[s + done] = (j + 1) * _CHUNK
            rows, ab = rows.take(keep_rows), ab[keep_rows]
            if rows.pos.numel() == 0:
                break
        if pending is not None:
            self._settle(pending, rows, ab)
        self.a[s + rows.pos] = tb[rows.pos] if pending is not None else ab
        self.tpool[s + rows.pos] = tb[rows.pos]

    def _start(self, s: int, xn: torch.Tensor) -> torch.Tensor:
        """Minima before the pool: the prior of rows ``s...`` (as many as ``xn``), else inf."""
        if self.prior is None:
            return torch.full_like(xn, math.inf)
        return self.prior[s : s + xn.numel()].clone()

    def _settle(
        self, pending: _Pending, rows: _Rows, ab: torch.Tensor, which: torch.Tensor | None = None
    ) -> None:
        """Settle ``pending`` for ``rows`` (running minima ``ab``), or only positions ``which``."""
        size = pending.exact.numel()
        limit = torch.full((size,), -math.inf, dtype=torch.float32, device=self.dev)
        limit[rows.pos] = self.pool_slack(rows).mul_(2).add_(ab)
        mask = None
        if which is not None:
            mask = torch.zeros(size, dtype=torch.bool, device=self.dev)
            mask[which] = True
        pending.settle(limit, mask)

    def late_mask(self) -> torch.Tensor:
        """Boolean [n]: rows that stopped the pool pass early."""
        if self.pver is None:
            return torch.zeros_like(self.a, dtype=torch.bool)
        return self.pver < self.centres.m

    def late(self, idx: torch.Tensor) -> torch.Tensor:
        """The rows of ``idx`` that stopped the pool pass early."""
        if self.pver is None:
            return idx[:0]
        return idx[self.pver[idx] < self.centres.m]

    @_blocked
    def complete(self, idx: torch.Tensor) -> None:
        """Apply the rest of the pool to rows ``idx`` (blocks of rows, by version)."""
        if self.pver is None or idx.numel() == 0:
            return
        pv, order = torch.sort(self.pver[idx])
        idx = idx[order]
        step = max(64, self.budget // (8 * (self.x.shape[1] + _CHUNK)))
        for s in range(0, idx.numel(), step):
            self._complete(idx[s : s + step], pv[s : s + step])

    def _complete(self, idx: torch.Tensor, pv: torch.Tensor) -> None:
        """:meth:`complete` for one block of rows sorted by ``pv = pver[idx]``."""
        assert self.pver is not None
        rows = self._rows_of(self.rows(idx), self.xn[idx])
        # The window must start from the pool's own minima: ``a`` may hold picks' distances
        # by now (a flush), whose error bound is not the pool pass's (the exact prefix
        # minimum is a valid approximation; without tracking no window is used).
        ar = (self.tpool[idx] if self.track else self.a[idx]).clone()
        tr = self.tpool[idx]
        pending = _Pending(self, rows.x, tr, self.budget // 24) if self.lowp else None
        for j, chunk in enumerate(self._pool()):
            cnt = int(torch.searchsorted(pv, j * _CHUNK + chunk[0].shape[0]))  # rows missing it
            if cnt == 0:
                continue
            self._pool_chunk(rows.head(cnt), ar[:cnt], tr[:cnt], j, pending)
            if pending is not None and pending.full():
                self._settle(pending, rows, ar)
        if pending is not None:
            self._settle(pending, rows, ar)
        self.a[idx] = torch.minimum(self.a[idx], tr if self.lowp else ar)
        self.tpool[idx] = tr
        self.pver[idx] = self.centres.m

    @_blocked
    def flush(self) -> None:
        """Apply the queued picks to every row, in contiguous row blocks."""
        k = self.centres.k
        if self.queued == k:
            return
        c_all = self.centres.picked[self.queued : k]
        q = min(_CHUNK, c_all.shape[0])
        b = self._block_rows(q)
        buf = torch.empty((b, q), dtype=torch.float32, device=self.dev)
        chunks = [
            (c, (c * c).sum(dim=1)) for c in (c_all[j : j + q] for j in range(0, len(c_all), q))
        ]
        for _, cn in chunks:
            self.cmax = max(self.cmax, float(cn.max()))
        n = self.x.shape[0]
        for s in range(0, n, b):
            e = min(n, s + b)
            xb = self.x[s:e].to(self.dev, torch.float32)
            for c, cn in chunks:
                self._apply(s, e, xb, c, cn, buf)
        self.queued = k

    def exact(self, idx: torch.Tensor, xr: torch.Tensor, xnr: torch.Tensor) -> torch.Tensor:
        """Textbook squared distances of rows ``idx`` (values ``xr``) to every centre so far.

        The rows must have received the whole pool (not late). With ``track``
        their pool part is already exact (:meth:`_pool_chunk`) and only the picks
        are applied here; without, the pool is applied again to these rows.
        """
        if self.track:
            t = self.tpool[idx].clone()
        else:
            t = torch.full_like(xnr, math.inf) if self.prior is None else self.prior[idx].clone()
            for c, _ in self._pool():
                t = exact_min(xr, xnr, t, c, self.kappa)
        k = self.centres.k
        for s in range(0, k, _CHUNK):
            t = exact_min(xr, xnr, t, self.centres.picked[s : min(s + _CHUNK, k)], self.kappa)
        return t


class _Top:
    """The top set: rows with the largest upper bounds, kept up to date.

    ``hi``/``lo`` bound each row's textbook distance; for rows made exact
    (positions ``epos``) both equal the exact value ``te``. ``idx`` (sorted)
    names the rows in the pick output; ``exact(pos)`` returns the textbook
    distances of the set's positions ``pos`` to every centre so far (default:
    :meth:`_State.exact`). The sharded engine (datapool.selection_sharded)
    builds one from the union of every rank's top rows, with global indices.
    """

    def __init__(
        self,
        st: _State,
        idx: torch.Tensor,
        rows: torch.Tensor,
        xn: torch.Tensor,
        a: torch.Tensor,
        bound: float,
        exact: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.st, self.idx, self.rows, self.xn, self.a, self.bound = st, idx, rows, xn, a, bound
        self._exact = exact or (lambda pos: st.exact(self.idx[pos], self.rows[pos], self.xn[pos]))
        # picks of this phase come from these rows: their norms bound every new centre's
        st.cmax = max(st.cmax, float(self.xn.max()))
        self.eps = st.slack(self.xn)
        self.hi = self.a + self.eps
        self.lo = self.a - self.eps
        self.ex = torch.zeros(idx.numel(), dtype=torch.bool, device=st.dev)
        self.epos = torch.empty(0, dtype=torch.int64, device=st.dev)
        self.erows = self.rows[:0]
        self.te = self.a[:0]

    @classmethod
    def take(cls, st: _State, t: int) -> _Top:
        """The ``t`` rows of ``st`` with the largest upper bounds (every row if ``t >= n``)."""
        idx, bound = cls.rows_of(st, t)
        return cls(st, idx, st.rows(idx), st.xn[idx], st.a[idx].clone(), bound)

    @classmethod
    def rows_of(cls, st: _State, t: int) -> tuple[torch.Tensor, float]:
        """Sorted row indices of the top ``t`` (all complete) and the largest bound outside.

        The bound is ``-inf`` when ``t >= n`` (every row is in the set).
        """
        n = st.a.numel()
        if t >= n:
            idx = torch.arange(n, device=st.dev)
            late = st.late(idx)
            if late.numel():
                st.complete(late)
            return idx, -math.inf
        vals, idx = cls._take(st, t)
        return idx[:t].sort().values, float(vals[t])

    @staticmethod
    def _take(st: _State, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``t + 1`` largest upper bounds and their rows, the first ``t`` complete.

        Late rows (pool pass stopped early) hold only an upper bound from part of
        the pool, so they are completed before they may enter the top set. Each
        round completes every late row at or above the ``t``-th largest bound of
        the complete rows (ties included), and always the late rows that are
        in the top ``t`` now, so the number of late rows strictly falls.
        """
        while True:
            up = st.a + st.slack(st.xn)
            vals, idx = torch.topk(up, t + 1)
            late_top = st.late(idx[:t])
            if late_top.numel() == 0:
                return vals, idx
            late = st.late_mask()
            ok = up[~late]
            floor = float(torch.topk(ok, t).values[-1]) if ok.numel() >= t else -math.inf
            todo = late & (up >= floor)
            todo[late_top] = True
            before = int(late.sum())
            st.complete(todo.nonzero().squeeze(1))
            if int(st.late_mask().sum()) >= before:
                raise _stuck("completing late rows of the top set")

    def _make_exact(self, pos: torch.Tensor) -> None:
        t = self._exact(pos)
        self.ex[pos] = True
        self.epos = torch.cat([self.epos, pos])
        self.erows = torch.cat([self.erows, self.rows[pos]])
        self.te = torch.cat([self.te, t])
        self.hi[pos] = t
        self.lo[pos] = t

    def best(self) -> tuple[int, float]:
        """Position and exact squared distance of the farthest row (lowest index on ties)."""
        while True:
            cand = (self.hi >= self.lo.max()).nonzero().squeeze(1)
            if bool(self.ex[cand].all()):
                break
            # make a few more of the highest rows exact too: the next picks need them
            near = torch.topk(self.hi, min(_EXACT_BATCH, self.hi.numel())).indices
            want = torch.zeros_like(self.ex)
            want[cand] = True
            want[near] = True
            todo = (want & ~self.ex).nonzero().squeeze(1)
            if todo.numel() == 0:  # unreachable: some row of cand is not exact
                raise _stuck("the exact re-check of the top set")
            self._make_exact(todo)
        j = int(cand[torch.argmax(self.hi[cand])])
        return j, float(self.hi[j])

    def apply(self, c: torch.Tensor) -> None:
        """Lower the bounds by the new centre ``c`` (float32 [d], a row of the set)."""
        g = torch.addmv(self.xn, self.rows, c, alpha=-2.0).add_(float((c * c).sum()))
        torch.minimum(self.a, g, out=self.a)
        torch.add(self.a, self.eps, out=self.hi)
        torch.sub(self.a, self.eps, out=self.lo)
        if self.epos.numel():
            torch.minimum(self.te, _direct(self.erows, c.unsqueeze(0)), out=self.te)
            self.hi[self.epos] = self.te
            self.lo[self.epos] = self.te


def _pick_phase(
    top: _Top, st: _State, limit: int, min_distance: float | None, out: list[Any]
) -> float | None:
    """Pick from ``top`` while its best provably beats ``top.bound``.

    Appends ``(index, distance)`` to ``out``. Returns the exact squared distance
    of the next pick once selection is finished (limit reached, best distance 0
    or below ``min_distance``), or None when a new phase must decide it.
    """
    while True:
        j, v = top.best()
        if v <= top.bound:
            return None
        if len(out) >= limit or v == 0.0:
            return v
        if min_distance is not None and math.sqrt(v) < min_distance:
            return v
        out.append((int(top.idx[j]), math.sqrt(v)))
        row = top.rows[j].clone()
        st.centres.add(row)
        top.apply(row)


def _start_at_row_0(st: _State, x: torch.Tensor, out: list[tuple[int, float]], limit: int) -> bool:
    """Without any centre yet, pick row 0 first (distance inf), as the textbook loop does.

    Appends it to ``out`` and makes it a centre; False (nothing done) when ``limit`` is 0.
    """
    if limit == 0:
        return False
    out.append((0, math.inf))
    st.centres.add(x[0].to(st.dev, torch.float32))
    return True


def _select(
    x: torch.Tensor,
    pool: torch.Tensor | None,
    dev: torch.device,
    limit: int,
    min_distance: float | None,
    budget: int,
    planned: int,
    pass_threads: int,
    lowp: bool = False,
    prior: torch.Tensor | None = None,
    probe: bool = False,
) -> tuple[list[Any], float]:
    """Run the selection; returns ``[(index, distance), ...]`` in pick order and the
    distance of the next pick (:attr:`Selection.next_distance`). ``planned`` is
    the number of picks known in advance (``n_samples``), 0 if unknown; ``lowp``:
    the bfloat16 pool pass where pool minima are kept exact (:func:`lowp_pool_pass`),
    only where it pays with ``probe`` (``"auto"``);
    ``prior``: float32 [n] on ``dev``, see :func:`k_center_greedy`."""
    n, d = x.shape
    out: list[Any] = []
    if n == 0:
        return out, 0.0
    st = _State(x, _Centres(pool, d, dev), budget, pass_threads)
    st.prior = prior
    # Keeping exact pool minima costs ~20 % of the pool pass; re-checking a row
    # against the pool costs a pass of that row. It pays once about a tenth of
    # the rows will be made exact (each pick is one): 10k of 10k picks against
    # 200k pool rows took 9.8 s with it, 34.7 s without; 200 of 2,000 against
    # 20k rows 0.25 s without, 0.32 s with.
    st.track = pool is not None and planned * _TRACK_SHARE >= n
    st.lowp = st.track and lowp  # its approximate minima are no bound: only exact ones leave it
    st.lowp_probe = probe
    t_cap = max(64, budget // (8 * d))
    t_base = min(t_cap, _TOP_BYTES // (4 * d), max(256, n // _TOP_DIV))
    if pool is not None:  # the pool pass costs work per row kept: keep fewer
        t_base = min(t_base, max(256, _POOL_TOP * limit))
    # at least ~planned rows reach a top set (each pick comes from one): letting
    # many of them stop the pool pass early would only defer their pool work to
    # smaller, slower blocks
    st.first_pass(max(2 * t_base, 2 * planned))
    if st.centres.m == 0 and prior is None and not _start_at_row_0(st, x, out, limit):
        return out, math.inf
    grow = 1
    while True:
        st.flush()
        t = t_base * grow
        top = _Top.take(st, t)
        before = len(out)
        nxt = _pick_phase(top, st, limit, min_distance, out)
        if nxt is not None:
            return out, math.sqrt(nxt)
        if len(out) == before and t >= n:  # every row in the set: a pick was certain
            raise _stuck("a pick phase over every row")
        grow = grow * 4 if len(out) == before else 1  # undecided: widen the top set


def checked_inputs(
    candidates: Any, pool: Any, memory_budget: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Candidates [n, d] and pool [m, d] as tensors (pool None if empty) and the budget in bytes.

    Raises InputError for non-2-D or non-float input, mismatched or too large
    dimension, and NaN/inf values (checked in budget-sized blocks).
    """
    x = _as_tensor(candidates, "candidates")
    p = None if pool is None else _as_tensor(pool, "pool")
    if p is not None and p.shape[0] > 0 and p.shape[1] != x.shape[1]:
        raise InputError(f"pool has dimension {p.shape[1]} but candidates have {x.shape[1]}")
    if x.shape[1] > _MAX_DIM:
        raise InputError(f"candidates have dimension {x.shape[1]}; at most {_MAX_DIM} is supported")
    budget = memory_budget or max(_MIN_BUDGET, x.numel() * x.element_size() // 10)
    check_rows = max(1, budget // max(1, 8 * x.shape[1]))
    _check_finite(x, "candidates", check_rows)
    if p is not None:
        _check_finite(p, "pool", check_rows)
    return x, (p if p is not None and p.shape[0] > 0 else None), budget


def k_center_greedy(
    candidates: Any,
    *,
    pool: Any = None,
    n_samples: int | None = None,
    min_distance: float | None = None,
    device: str | None = None,
    memory_budget: int | None = None,
    threads: int | None = 1,
    pool_precision: PoolPrecision = "auto",
    prior: Any = None,
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
            candidates' size (at least 64 MiB). A pool not stored as float32 on
            the device is also held there as a float32 copy.
        threads: torch CPU threads for the blocked matrix products (the
            pool pass, flushes of queued picks); default 1, None: torch's
            current setting. More threads help on an idle machine (1.9x on
            two cores) and hurt badly on a busy one (2.5x slower), where
            every product waits for its slowest thread. The per-pick vector
            operations always run on one thread. The caller's setting is
            restored afterwards.
        pool_precision: the pool pass's products when many picks are planned
            (``n_samples`` at least a tenth of the rows): ``"auto"`` (bfloat16 on
            CPUs that compute it natively, where a probe finds that it pays: spread
            rows and no pruning, or rows far from the origin; see ``_lowp_pays``),
            ``"float32"`` or ``"bfloat16"`` (:func:`lowp_pool_pass`). The picks are
            the same either way.
        prior: ``[n]`` textbook squared distances of each candidate to centres not
            given in ``pool`` (:func:`pool_minima` of a big pool, once): the picks
            are those with those centres in ``pool``, without another pass over
            them (``inf``: no such centre). None: no prior.

    Returns:
        :class:`Selection`. With an empty pool the first pick is index 0
        (distance ``inf``). Rows at distance 0 from the pool or an earlier
        pick (duplicates) are never picked; ties go to the lowest index.

    The caller's torch settings do not change the picks: matmul precision
    (TF32/bf16 flags), autocast and the thread count are pinned for the call
    and restored afterwards (module Notes).

    Raises:
        InputError: no stopping rule, negative or NaN limits, an unknown
            ``pool_precision``, a ``prior`` not of shape [n] or with negative or
            NaN values, non-2-D or
            non-float input, NaN/inf values, a squared norm above ``2**120``,
            dimension above ``2**20``, or pool and candidates of different
            dimension.
        RuntimeError: an internal loop could not make progress (a bug; it
            raises instead of hanging).
    """
    _check_limits(n_samples, min_distance)
    x, pool_t, budget = checked_inputs(candidates, pool, memory_budget)
    dev = torch.device(device) if device is not None else x.device
    limit = x.shape[0] if n_samples is None else min(n_samples, x.shape[0])
    passes = threads or torch.get_num_threads()
    lowp = lowp_pool_pass(dev, pool_precision)
    start = _checked_prior(prior, x.shape[0], dev)
    with pinned_numerics(dev.type, 1):
        planned = 0 if n_samples is None else limit
        out, nxt = _select(
            x,
            pool_t,
            dev,
            limit,
            min_distance,
            budget,
            planned,
            passes,
            lowp,
            start,
            probe=pool_precision == "auto",
        )
    idx = np.fromiter((i for i, _ in out), dtype=np.int64, count=len(out))
    dist = np.fromiter((s for _, s in out), dtype=np.float64, count=len(out))
    return Selection(idx, dist, nxt)


def _checked_prior(prior: Any, n: int, dev: torch.device) -> torch.Tensor | None:
    """``prior`` as float32 [n] on ``dev`` (None stays None); InputError if it is not one."""
    if prior is None:
        return None
    t = torch.as_tensor(np.asarray(prior) if not isinstance(prior, torch.Tensor) else prior)
    if t.shape != (n,):
        raise InputError(
            f"prior must have shape [{n}] (one value per candidate), got {tuple(t.shape)}"
        )
    t = t.to(dev, torch.float32)
    if bool(torch.isnan(t).any()) or bool((t < 0).any()):
        raise InputError("prior must hold squared distances >= 0 (inf: none), got NaN or < 0")
    return t


def pool_minima(
    candidates: Any,
    pool: Any,
    *,
    device: str | None = None,
    threads: int | None = 1,
    pool_precision: PoolPrecision = "auto",
) -> npt.NDArray[np.float32]:
    """Each candidate's textbook squared distance to its nearest pool row, float32 ``[n]``.

    The exact values :func:`k_center_greedy` works from (``sum((x - c)^2)`` in
    float32), from one blocked pass over the pool (bfloat16 where
    :func:`lowp_pool_pass` says so); pass them as its ``prior`` to run several
    selections against one big pool. ``inf`` for every row when the pool is empty.
    Raises InputError as :func:`k_center_greedy` does for its inputs.
    """
    x, pool_t, budget = checked_inputs(candidates, pool, None)
    dev = torch.device(device) if device is not None else x.device
    n = x.shape[0]
    if pool_t is None or n == 0:
        return np.full(n, np.inf, dtype=np.float32)
    lowp = lowp_pool_pass(dev, pool_precision)
    passes = threads or torch.get_num_threads()
    out = np.full(n, np.inf, dtype=np.float32)
    rest = np.ones(n, dtype=bool)
    with pinned_numerics(dev.type, 1):
        if dev.type == "cpu" and x.device.type == "cpu" and pool_t.device.type == "cpu":
            from datapool.pool_index import pruned_minima

            with cpu_threads(passes):
                start = torch.full((n,), math.inf)
                got = pruned_minima(x.float(), pool_t.float(), start)
            if got is not None:  # clustered rows: whole chunks of the pool skipped
                out[:] = got[0].numpy()
                rest = ~got[1].numpy()
        if rest.any():
            idx = np.flatnonzero(rest)
            xr = x if rest.all() else x[torch.from_numpy(idx).to(x.device)]
            st = _State(xr, _Centres(pool_t, x.shape[1], dev), budget, passes)
            st.track, st.lowp, st.lowp_probe = True, lowp, pool_precision == "auto"
            st.first_pass(len(idx))  # keep every row: no pruning
            out[idx] = st.tpool.cpu().numpy()
    return out


@dataclass(frozen=True)
class Nearest:
    """Result of :func:`nearest`.

    Attributes:
        distances: float64 ``[n]``, Euclidean distance of each query to its
            nearest centre (``inf`` when there are no centres).
        indices: int64 ``[n]``, row of that centre (``-1`` when there are none).
    """

    distances: npt.NDArray[np.float64]
    indices: npt.NDArray[np.int64]


def nearest(
    queries: Any, centres: Any, *, device: str | None = None, threads: int | None = 1
) -> Nearest:
    """Each query's nearest centre, for reports (histograms, redundant pairs).

    Distances come from the GEMM form ``|q|^2 + |c|^2 - 2 q.c`` in float32
    (accurate to the bound in the module Notes, about ``1e-5`` relative for
    unit vectors: fine to plot, not to decide ties; :func:`k_center_greedy`
    is the exact engine). Cost: one blocked pass of the queries over the
    centres, memory O(blocks).

    Args:
        queries: ``[n, d]`` float array or tensor.
        centres: ``[m, d]`` float array or tensor, or None / empty.
        device: where to compute; default the queries' device.
        threads: torch CPU threads during the call (default 1, as
            :func:`k_center_greedy`); None: torch's setting.

    Raises:
        InputError: non-2-D or non-float input, NaN/inf values, or different
            dimensions.
    """
    q, c, budget = checked_inputs(queries, centres, None)
    n = q.shape[0]
    if c is None or n == 0:
        return Nearest(np.full(n, np.inf), np.full(n, -1, dtype=np.int64))
    dev = torch.device(device) if device is not None else q.device
    best = torch.full((n,), math.inf, dtype=torch.float32, device=dev)
    arg = torch.full((n,), -1, dtype=torch.int64, device=dev)
    rows = max(256, min(_POOL_ROWS, budget // (8 * (q.shape[1] + _CHUNK))))
    with pinned_numerics(dev.type, threads):
        chunks = [(s, c[s : s + _CHUNK].to(dev, torch.float32)) for s in range(0, len(c), _CHUNK)]
        chunks_n = [(s, ck, (ck * ck).sum(dim=1)) for s, ck in chunks]
        for r in range(0, n, rows):
            qb = q[r : r + rows].to(dev, torch.float32)
            qn = (qb * qb).sum(dim=1)
            for s, ck, cn in chunks_n:
                g = torch.addmm(cn.unsqueeze(0), qb, ck.T, alpha=-2.0)
                val, pos = g.min(dim=1)
                val.add_(qn)
                better = val < best[r : r + rows]
                best[r : r + rows] = torch.where(better, val, best[r : r + rows])
                arg[r : r + rows] = torch.where(better, pos + s, arg[r : r + rows])
    dist = best.clamp_(min=0).sqrt_().double().cpu().numpy()
    return Nearest(dist, arg.cpu().numpy())
