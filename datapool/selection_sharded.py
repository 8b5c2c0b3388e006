"""Exact greedy k-center selection sharded across ``torch.distributed`` ranks (issue 14).

:func:`k_center_greedy_sharded` returns, on every rank, exactly the picks of
the single-process :func:`datapool.selection.k_center_greedy` (same indices in
the same order, same distances, same ``next_distance``). That engine picks
the row with the largest *textbook* distance (minimum over centres of the
direct float32 ``sum((x - c)^2)``), lowest index on ties, and every exact
value it compares is that textbook value; this module computes the same
values, so the same argmax, whatever the split. Ties go to the lowest
*global* row index, as in one process.

How the work is split (each rank holds contiguous slices, in rank order,
:func:`datapool.distributed.shard_range`):

* **Initial pool pass**, by shape (:func:`choose_split`). ``"candidates"``:
  each rank applies the whole pool to its candidate slice (the engine's
  pruned pass, unchanged). ``"pool"``: each rank applies its *pool slice* to
  every candidate, then the ranks all-reduce (MIN) the approximate and the
  textbook per-candidate minima: the textbook minimum over the pool is the
  minimum of the slices' minima. The pool split is chosen when the pool is at
  least as large as the candidates and at least a quarter of the candidates
  will be picked (the issue-10 case, 10k picks into a 1M-row pool): each rank
  then holds a slice of the larger array, and the pruning it gives up would
  not have applied (the engine prunes only when fewer than ``n / 4`` picks are
  planned). Otherwise the candidates are split and pruning keeps working.
* **Picking**, always by candidate slice. Each phase: every rank applies the
  queued picks to its slice (the blocked flush) and takes its own top set and
  bound; the union of the top rows (global index, embedding, approximate
  distance, norm, textbook pool minimum) is all-gathered and the bound
  all-reduced (MAX); rank 0 runs the engine's pick phase on the union while
  its best row provably beats the global bound, and broadcasts the picks; all
  ranks append them to their centres, queued for the next flush. Four small
  collectives per phase (the union's row counts and rows, the bound, the
  picks), none per pick. Each rank contributes ``1 / size``
  of the top set the engine would keep for its slice, so the serial pick
  work shrinks with the ranks as the flushes do (:func:`_top_size`).
* Textbook pool minima are always kept (the engine keeps them only when many
  rows will be made exact): the rank that owns a top row knows its pool
  minimum, so rank 0 makes any union row exact with the picks alone, and the
  pool never travels. This costs ~20 % of the pool pass.

Only rank 0 computes the pick phase, so ranks on machines whose float
arithmetic differs slightly (vector widths) cannot diverge; the others wait
for its broadcast. That serial share is what more ranks do not shorten
(``bench/distributed.py`` prints it: 0.9 of rank 0's 2.5 CPU seconds for
1000 picks among 1M x 128 rows on 2 ranks).

Inputs are the *full* arrays on every rank (numpy memory maps or tensors):
a rank reads only the rows it needs, its candidate slice and the whole pool
(candidate split) or every candidate and its pool slice (pool split). Every
rank validates only its own slices and the ranks agree before any other
collective, so bad input raises the same InputError on every rank instead
of leaving ranks waiting.

Device: computation runs on ``device`` (default the World's); collectives on
``world.device`` (CPU for gloo, CUDA for NCCL). Only gloo/CPU is tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist

from datapool.distributed import World, agree, all_gather_rows, shard_range
from datapool.errors import InputError
from datapool.selection import (
    _CHUNK,
    _MAX_DIM,
    _MIN_BUDGET,
    _POOL_TOP,
    _TOP_BYTES,
    _TOP_DIV,
    PoolPrecision,
    Selection,
    _as_tensor,
    _Centres,
    _check_finite,
    _check_limits,
    _check_norms,
    _checked_prior,
    _pick_phase,
    _start_at_row_0,
    _State,
    _stuck,
    _Top,
    exact_min,
    lowp_pool_pass,
    pinned_numerics,
)

__all__ = ["Split", "choose_split", "k_center_greedy_sharded", "pool_minima_sharded"]

Split = Literal["candidates", "pool"]


def choose_split(n: int, m: int, planned: int) -> Split:
    """How to split the initial pass: ``"pool"`` or ``"candidates"`` (module docstring).

    ``n`` candidates, ``m`` pool rows, ``planned`` picks (``n_samples``, 0 if
    only ``min_distance`` limits them).
    """
    return "pool" if m > 0 and m >= n and 4 * planned >= n else "candidates"


@dataclass
class _Union:
    """The union of every rank's top rows, sorted by global index."""

    idx: torch.Tensor  # int64 [u], global row indices
    rows: torch.Tensor  # float32 [u, d]
    xn: torch.Tensor  # float32 [u], squared norms
    a: torch.Tensor  # float32 [u], approximate distances (every centre applied)
    tpool: torch.Tensor  # float32 [u], textbook minimum over the pool (inf: no pool)
    bound: float  # largest upper bound of any row outside the union


def _check_slice(x: torch.Tensor, name: str, rows: range, block: int) -> None:
    """NaN/inf and oversized norms in ``x[rows]``, reported with global row numbers."""
    for s in range(rows.start, rows.stop, block):
        xb = x[s : min(s + block, rows.stop)]
        _check_finite(xb, name, block, first=s)
        xf = xb.to(torch.float32)
        _check_norms((xf * xf).sum(dim=1), name, s)


def _inputs(
    candidates: Any, pool: Any, world: World, split: Split | Literal["auto"], planned: int
) -> tuple[torch.Tensor, torch.Tensor | None, Split]:
    """Candidates, pool (None if empty) and the split, validated on every rank's slices."""
    x = _as_tensor(candidates, "candidates")
    p = None if pool is None else _as_tensor(pool, "pool")
    if p is not None and p.shape[0] == 0:
        p = None
    n, d = x.shape
    m = 0 if p is None else p.shape[0]
    error = None
    if p is not None and p.shape[1] != d:
        error = f"pool has dimension {p.shape[1]} but candidates have {d}"
    elif d > _MAX_DIM:
        error = f"candidates have dimension {d}; at most {_MAX_DIM} is supported"
    chosen: Split = choose_split(n, m, planned) if split == "auto" else split
    if split not in ("auto", "candidates", "pool"):
        raise InputError(f"split must be 'auto', 'candidates' or 'pool', got {split!r}")
    block = max(1, _MIN_BUDGET // max(1, 8 * d))
    if error is None:
        try:  # each rank checks its share of both arrays
            _check_slice(x, "candidates", shard_range(n, world), block)
            if p is not None:
                _check_slice(p, "pool", shard_range(m, world), block)
        except InputError as e:
            error = str(e)
    facts = agree(world, error, (n, m, d, chosen))
    if any(f != facts[0] for f in facts):
        raise InputError(
            f"ranks were given different inputs: (rows, pool rows, dim, split) {facts}"
        )
    return x, p, chosen


def _pool_split_pass(
    st: _State, x: torch.Tensor, pool: torch.Tensor, world: World, prior: torch.Tensor | None
) -> None:
    """Fill ``st`` (this rank's candidate slice) from a pass of every candidate over a pool slice.

    Approximate and textbook minima are all-reduced with MIN across ranks;
    the largest pool norm with MAX (the error bound needs the global one).
    """
    slice_ = shard_range(pool.shape[0], world)
    part = pool[slice_.start : slice_.stop]
    full = _State(x, _Centres(part, x.shape[1], st.dev), st.budget, st.pass_threads)
    full.track = True
    full.lowp, full.lowp_probe = st.lowp, st.lowp_probe
    full.prior = prior  # every candidate's, once: the MIN below keeps it exact
    full.first_pass(x.shape[0])  # keep every row: no pruning (it would need a global level)
    both = torch.stack([full.a, full.tpool]).to(world.device)
    cmax = torch.tensor([full.pool_cmax], dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(both, op=dist.ReduceOp.MIN)
        dist.all_reduce(cmax, op=dist.ReduceOp.MAX)
    mine = shard_range(x.shape[0], world)
    st.a = both[0, mine.start : mine.stop].to(st.dev).clone()
    st.tpool = both[1, mine.start : mine.stop].to(st.dev).clone()
    st.xn = full.xn[mine.start : mine.stop].clone()
    st.pool_cmax = float(cmax)
    st.cmax = max(st.cmax, st.pool_cmax)


def _gather_top(st: _State, t: int, offset: int, world: World) -> _Union:
    """This rank's top ``t`` rows and bound, gathered with every other rank's."""
    idx, bound = _Top.rows_of(st, t)
    meta = torch.stack([st.a[idx], st.xn[idx], st.tpool[idx]], dim=1).double()
    payload = torch.cat([(idx + offset).double().unsqueeze(1), meta, st.rows(idx).double()], 1)
    union = torch.cat(all_gather_rows(payload, world))  # rank order = global index order
    b = torch.tensor([bound], dtype=torch.float64, device=world.device)
    if world.distributed:
        dist.all_reduce(b, op=dist.ReduceOp.MAX)
    f32 = union[:, 1:].float()  # float32 values travelled exactly as float64
    return _Union(union[:, 0].long(), f32[:, 3:], f32[:, 1], f32[:, 0], f32[:, 2], float(b))


def _decide(
    st: _State, u: _Union, limit: int, min_distance: float | None, out: list[Any]
) -> torch.Tensor:
    """Rank 0's pick phase on the union; the message every rank applies.

    float64 ``[2 + 2 u]``: the number of new picks (-1: this rank failed), the
    exact squared distance of the next pick if selection is finished (else
    NaN), then the new picks' global indices and distances. ``out`` gets the
    new picks and ``st`` their centres, as :func:`datapool.selection._pick_phase`.
    """

    def exact(pos: torch.Tensor) -> torch.Tensor:
        t = u.tpool[pos].clone()  # textbook pool minimum, from the row's owner
        xr, xnr, k = u.rows[pos], u.xn[pos], st.centres.k
        for s in range(0, k, _CHUNK):
            t = exact_min(xr, xnr, t, st.centres.picked[s : min(s + _CHUNK, k)], st.kappa)
        return t

    before = len(out)
    top = _Top(st, u.idx, u.rows, u.xn, u.a.clone(), u.bound, exact)
    nxt = _pick_phase(top, st, limit, min_distance, out)
    new = out[before:]
    msg = torch.full((2 + 2 * u.idx.numel(),), math.nan, dtype=torch.float64)
    msg[0] = len(new)
    msg[1] = math.nan if nxt is None else nxt
    msg[2 : 2 + len(new)] = torch.tensor([i for i, _ in new], dtype=torch.float64)
    msg[2 + len(new) : 2 + 2 * len(new)] = torch.tensor([d for _, d in new], dtype=torch.float64)
    return msg


def _phase(
    st: _State, u: _Union, limit: int, min_distance: float | None, out: list[Any], world: World
) -> float | None:
    """One pick phase on the union: rank 0 decides (:func:`_decide`), every rank applies.

    Returns the exact squared distance of the next pick when selection is
    finished, else None. Raises on every rank if rank 0's phase raised.
    """
    msg = torch.full((2 + 2 * u.idx.numel(),), -1.0, dtype=torch.float64)
    if world.rank == 0:
        try:
            msg = _decide(st, u, limit, min_distance, out)
        except Exception:
            if world.distributed:  # the others wait in the broadcast below: tell them
                dist.broadcast(msg.to(world.device), src=0)
            raise
    if not world.distributed:
        return None if math.isnan(float(msg[1])) else float(msg[1])
    sent = msg.to(world.device)
    dist.broadcast(sent, src=0)
    msg = sent.cpu()
    if float(msg[0]) < 0:
        raise RuntimeError("rank 0 failed in the sharded pick phase; see its error")
    if world.rank != 0:
        st.cmax = max(st.cmax, float(u.xn.max()))  # as _Top does on rank 0
        count = int(msg[0])
        picks = msg[2 : 2 + count].long()
        pos = torch.searchsorted(u.idx, picks.to(u.idx.device))
        dists = msg[2 + count : 2 + 2 * count].tolist()
        for p, i, s in zip(pos.tolist(), picks.tolist(), dists, strict=True):
            out.append((i, s))
            st.centres.add(u.rows[p].clone())
    return None if math.isnan(float(msg[1])) else float(msg[1])


def _top_size(n_local: int, d: int, budget: int, pool: bool, limit: int) -> int:
    """What the one-process engine would keep as top set for ``n_local`` rows.

    :func:`_select` keeps ``1 / size`` of it per rank (rounded up), so the
    union (the serial pick work per pick) shrinks with the share of a rank,
    as the flushes do, and small slices give the engine's 256-row minimum in
    all (not 256 per rank: 10k picks into a 1M pool spent 4.9 s instead of
    2.7 s in the serial phases with 512):
    at 1M x 128, 1000 picks on 2 ranks, a union of n/50 rows (the engine's
    top set) left rank 0 4.1 CPU s, 2.6 s of them in the serial pick phases;
    a union of n/100 2.5 s and 0.9 s; n/200 3.3 s (more flushes).
    """
    t = min(max(64, budget // (8 * d)), _TOP_BYTES // (4 * d), max(256, n_local // _TOP_DIV))
    return min(t, max(256, _POOL_TOP * limit)) if pool else t


def _select(
    x: torch.Tensor,
    pool: torch.Tensor | None,
    split: Split,
    world: World,
    dev: torch.device,
    limits: tuple[int, int, float | None],
    budget: int | None,
    threads: int,
    lowp: bool = False,
    prior: torch.Tensor | None = None,
    probe: bool = False,
) -> tuple[list[Any], float]:
    """Sharded selection: ``[(global index, distance), ...]`` and the next distance
    (``lowp``: the bfloat16 pool pass, :func:`datapool.selection.lowp_pool_pass`; with
    ``probe``, only where it pays)."""
    limit, planned, min_distance = limits
    n, d = x.shape
    out: list[Any] = []
    if n == 0:
        return out, 0.0
    mine = shard_range(n, world)
    local = x[mine.start : mine.stop]
    held = (local.shape[0] + (n if split == "pool" else 0)) * d * 4
    budget = budget or max(_MIN_BUDGET, held // 10)
    t_base = -(-_top_size(local.shape[0], d, budget, pool is not None, limit) // world.size)
    whole_pool = pool if split == "candidates" else None
    st = _State(local, _Centres(whole_pool, d, dev), budget, threads)
    # every union row's pool minimum (and prior) must be known (docstring)
    st.track = pool is not None or prior is not None
    st.lowp = st.track and lowp  # exact results: ranks may differ in it and still agree
    st.lowp_probe = probe
    if pool is not None and split == "pool":
        _pool_split_pass(st, x, pool, world, prior)
    else:
        st.prior = None if prior is None else prior[mine.start : mine.stop]
        st.first_pass(max(2 * t_base, 2 * planned))
    if (
        pool is None and prior is None and not _start_at_row_0(st, x, out, limit)
    ):  # global row 0, as one process
        return out, math.inf
    grow = 1
    while True:
        st.flush()
        u = _gather_top(st, t_base * grow, mine.start, world)
        before = len(out)
        nxt = _phase(st, u, limit, min_distance, out, world)
        if nxt is not None:
            return out, math.sqrt(nxt)
        if len(out) == before and u.bound == -math.inf:  # every row in the union
            raise _stuck("a sharded pick phase over every row")
        grow = grow * 4 if len(out) == before else 1


def k_center_greedy_sharded(
    candidates: Any,
    *,
    world: World,
    pool: Any = None,
    n_samples: int | None = None,
    min_distance: float | None = None,
    split: Split | Literal["auto"] = "auto",
    device: str | None = None,
    memory_budget: int | None = None,
    threads: int | None = 1,
    pool_precision: PoolPrecision = "auto",
    prior: Any = None,
) -> Selection:
    """:func:`datapool.selection.k_center_greedy`, computed by every rank of ``world`` together.

    Call it on every rank with the same arguments (collective). Returns the
    same :class:`Selection` on every rank, identical to the single-process
    engine's (indices are global row numbers of ``candidates``).

    Args:
        candidates: ``[n, d]`` float array or tensor, the *whole* candidate
            set on every rank; a numpy memory map is read only where needed.
        world: the process group (:func:`datapool.distributed.init_from_env`);
            a one-process World runs the same algorithm without collectives.
        pool: ``[m, d]`` rows already in the dataset (whole, on every rank),
            or None / empty.
        n_samples, min_distance: stopping rules, as in ``k_center_greedy``.
        split: ``"auto"`` (:func:`choose_split`), ``"candidates"`` or ``"pool"``:
            what the ranks divide in the initial pool pass.
        device: compute device; default ``world.device``.
        memory_budget: bytes for this rank's working blocks; default a tenth
            of the candidate rows this rank holds (at least 64 MiB).
        threads: torch CPU threads per rank for the blocked passes (default 1).
        pool_precision: the pool pass's products, as in ``k_center_greedy``.
        prior: ``[n]`` squared distances to centres outside ``pool``, the whole
            array on every rank, as in ``k_center_greedy``.

    Raises:
        InputError: as ``k_center_greedy`` (reported with global row numbers,
            on every rank, whichever rank found it), an unknown ``split``, or
            ranks given inputs of different shapes.
        RuntimeError: an internal loop could not make progress (a bug).
    """
    _check_limits(n_samples, min_distance)
    planned = 0 if n_samples is None else n_samples
    x, p, chosen = _inputs(candidates, pool, world, split, planned)
    dev = torch.device(device) if device is not None else world.device
    limit = x.shape[0] if n_samples is None else min(n_samples, x.shape[0])
    limits = (limit, 0 if n_samples is None else limit, min_distance)
    passes = threads or torch.get_num_threads()
    lowp = lowp_pool_pass(dev, pool_precision)
    start = _checked_prior(prior, x.shape[0], dev)
    with pinned_numerics(dev.type, 1):
        out, nxt = _select(
            x,
            p,
            chosen,
            world,
            dev,
            limits,
            memory_budget,
            passes,
            lowp,
            start,
            probe=pool_precision == "auto",
        )
    idx = np.fromiter((i for i, _ in out), dtype=np.int64, count=len(out))
    dist_ = np.fromiter((s for _, s in out), dtype=np.float64, count=len(out))
    return Selection(idx, dist_, nxt)


def pool_minima_sharded(
    candidates: Any, pool: Any, *, world: World, threads: int | None = 1
) -> npt.NDArray[np.float32]:
    """:func:`datapool.selection.pool_minima` shared by the ranks of ``world`` (collective).

    Each rank measures every candidate against its slice of the pool; the exact
    minima are all-reduced with MIN, so every rank returns the one-process values.
    """
    from datapool.selection import pool_minima

    p = _as_tensor(pool, "pool") if pool is not None else None
    m = 0 if p is None else p.shape[0]
    mine = shard_range(m, world)
    part = None if p is None or mine.stop <= mine.start else p[mine.start : mine.stop]
    local = torch.from_numpy(pool_minima(candidates, part, threads=threads)).to(world.device)
    if world.distributed:
        dist.all_reduce(local, op=dist.ReduceOp.MIN)
    out: npt.NDArray[np.float32] = local.cpu().numpy()
    return out
