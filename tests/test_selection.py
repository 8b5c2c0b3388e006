"""Tests of datapool.selection against a straightforward textbook reference."""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from datapool import selection
from datapool.errors import InputError
from datapool.selection import Selection, k_center_greedy, nearest


def reference(
    x: np.ndarray,
    pool: np.ndarray | None = None,
    n_samples: int | None = None,
    min_distance: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Textbook greedy k-center: one float32 pass per pick, first pick index 0.

    Returns the picks, their distances and the distance the next pick would have.
    """
    x = np.asarray(x, dtype=np.float32)
    d2 = pool_minimum(x, pool)
    limit = len(x) if n_samples is None else min(n_samples, len(x))
    picks: list[int] = []
    dists: list[float] = []
    while len(picks) < limit:
        i = int(np.argmax(d2))
        dist = math.sqrt(float(d2[i]))
        if dist == 0.0 or (min_distance is not None and dist < min_distance):
            break
        picks.append(i)
        dists.append(dist)
        np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1), out=d2)
    after = math.sqrt(float(d2.max())) if len(x) else 0.0
    return np.array(picks, dtype=np.int64), np.array(dists), after


def pool_minimum(x: np.ndarray, pool: np.ndarray | None) -> np.ndarray:
    """``[len(x)]`` float32: each row's squared distance to its nearest pool row (inf
    without a pool), one pool row at a time: the textbook's first pass, and memory
    ``O(len(x))`` where a ``[len(x), len(pool), d]`` broadcast would take hundreds of MB."""
    d2 = np.full(len(x), np.inf, dtype=np.float32)
    for row in [] if pool is None else np.asarray(pool, dtype=np.float32):
        np.minimum(d2, ((x - row) ** 2).sum(axis=1), out=d2)
    return d2


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def clustered(rng: np.random.Generator, n: int, d: int, k: int = 20) -> np.ndarray:
    centres = unit(rng, k, d)
    x = centres[rng.integers(0, k, n)] + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    out: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def assert_same(sel: Selection, ref: tuple[np.ndarray, np.ndarray, float]) -> None:
    assert sel.indices.dtype == np.int64 and sel.min_distances.dtype == np.float64
    np.testing.assert_array_equal(sel.indices, ref[0])
    np.testing.assert_allclose(sel.min_distances, ref[1], rtol=1e-6)
    np.testing.assert_allclose(sel.next_distance, ref[2], rtol=1e-6)


DATA = {"random": unit, "clustered": clustered}


@pytest.mark.parametrize("kind", sorted(DATA))
@pytest.mark.parametrize("with_pool", [False, True])
@pytest.mark.parametrize(
    "rule", [{"n_samples": 150}, {"min_distance": 0.25}, {"n_samples": 60, "min_distance": 0.2}]
)
def test_matches_reference(kind: str, with_pool: bool, rule: dict[str, float]) -> None:
    rng = np.random.default_rng(7)
    x = DATA[kind](rng, 1500, 16)
    pool = x[:100] if with_pool else None
    cand = x[100:] if with_pool else x
    sel = k_center_greedy(cand, pool=pool, **rule)  # type: ignore[arg-type]
    ref = reference(cand, pool, **rule)  # type: ignore[arg-type]
    assert len(ref[0]) > 5
    assert_same(sel, ref)


def test_small_blocks_many_chunks_and_large_pool() -> None:
    """Tiny memory budget: many row blocks, pool spans several centre chunks."""
    rng = np.random.default_rng(3)
    x = clustered(rng, 2600, 8, k=40)
    sel = k_center_greedy(x[1200:], pool=x[:1200], n_samples=200, memory_budget=1)
    assert_same(sel, reference(x[1200:], x[:1200], n_samples=200))


@pytest.mark.parametrize("budget", [None, 1])
def test_pool_pass_stops_rows_early_and_completes_them_on_demand(
    budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows far below the estimated top level skip most of the pool; picks still exact."""
    calls: list[int] = []
    complete = selection._State.complete

    def counted(self: selection._State, idx: torch.Tensor) -> None:
        calls.append(idx.numel())
        complete(self, idx)

    monkeypatch.setattr(selection, "_CHUNK", 64)
    monkeypatch.setattr(selection._State, "complete", counted)
    rng = np.random.default_rng(11)
    x = clustered(rng, 2600, 8, k=60)
    pool, cand = x[:600], x[600:]
    for rule in ({"n_samples": 250}, {"min_distance": 0.17}):
        sel = k_center_greedy(cand, pool=pool, memory_budget=budget, **rule)
        ref = reference(cand, pool, **rule)
        assert len(ref[0]) > 20
        assert_same(sel, ref)
    assert calls  # some rows that stopped early were needed later


def test_offset_and_scaled_data_where_products_cancel() -> None:
    """Far from the origin |x|^2 + |c|^2 - 2x.c loses digits: exact re-checks keep the picks."""
    rng = np.random.default_rng(12)
    x = (clustered(rng, 3000, 16, k=30) * 20 + 3).astype(np.float32)
    x = np.concatenate([x, x[:200]])  # duplicates as well
    pool, cand = x[:500], x[500:]
    sel = k_center_greedy(cand, pool=pool, n_samples=300, memory_budget=1)
    assert_same(sel, reference(cand, pool, n_samples=300))


def test_picks_every_distinct_row_and_skips_duplicates() -> None:
    rng = np.random.default_rng(5)
    base = unit(rng, 50, 6)
    x = np.concatenate([base, base[::2], base[:5]])  # 30 duplicates
    rng.shuffle(x)
    sel = k_center_greedy(x, n_samples=500)
    assert_same(sel, reference(x, n_samples=500))
    assert len(sel.indices) == 50
    assert len({tuple(r) for r in x[sel.indices]}) == 50
    assert np.all(sel.min_distances > 0)


def test_pool_duplicates_never_picked_even_with_zero_min_distance() -> None:
    rng = np.random.default_rng(2)
    pool = unit(rng, 20, 5)
    cand = np.concatenate([pool[:10], unit(rng, 3, 5)])
    sel = k_center_greedy(cand, pool=pool, n_samples=13, min_distance=0.0)
    assert sorted(sel.indices.tolist()) == [10, 11, 12]


def test_exact_ties_go_to_lowest_index() -> None:
    # integer grid: every distance exact in float32, many exact ties
    g = np.stack(np.meshgrid(np.arange(6), np.arange(6), np.arange(3)), -1).reshape(-1, 3)
    x = np.random.default_rng(0).permutation(g).astype(np.float32)
    sel = k_center_greedy(x, n_samples=len(x))
    assert_same(sel, reference(x, n_samples=len(x)))
    pool = x[:7]
    sel = k_center_greedy(x, pool=pool, min_distance=1.5)
    assert_same(sel, reference(x, pool, min_distance=1.5))


def test_first_pick_is_row_zero_with_infinite_distance() -> None:
    x = unit(np.random.default_rng(1), 30, 4)
    sel = k_center_greedy(x, n_samples=3, min_distance=100.0)
    assert sel.indices.tolist() == [0] and sel.min_distances.tolist() == [math.inf]
    sel = k_center_greedy(x, pool=np.empty((0, 4), np.float32), n_samples=1)
    assert sel.indices.tolist() == [0]


def test_min_distance_stops_before_the_first_closer_pick() -> None:
    x = np.array([[0.0], [10.0], [3.0], [7.0], [5.0]], dtype=np.float32)
    # picks 0 (inf), 1 (10), 4 (5), then 2 and 3 tie at 2: lowest index first
    sel = k_center_greedy(x, min_distance=2.0)
    assert sel.indices.tolist() == [0, 1, 4, 2, 3]
    assert sel.min_distances.tolist() == [math.inf, 10, 5, 2, 2]
    assert k_center_greedy(x, min_distance=2.5).indices.tolist() == [0, 1, 4]
    assert k_center_greedy(x, n_samples=4, min_distance=0.0).indices.tolist() == [0, 1, 4, 2]


def test_empty_inputs() -> None:
    empty = k_center_greedy(np.empty((0, 8), np.float32), n_samples=5)
    assert empty.indices.shape == (0,) and empty.min_distances.shape == (0,)
    x = unit(np.random.default_rng(0), 10, 8)
    assert len(k_center_greedy(x, n_samples=0).indices) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_and_half_precision_input(dtype: torch.dtype) -> None:
    x = torch.from_numpy(clustered(np.random.default_rng(4), 900, 12)).to(dtype)
    pool = x[:50]
    sel = k_center_greedy(x[50:], pool=pool, n_samples=80, device="cpu")
    as32 = x.float().numpy()
    assert_same(sel, reference(as32[50:], as32[:50], n_samples=80))


def test_numpy_float16_and_float64_input() -> None:
    x = clustered(np.random.default_rng(6), 700, 10)
    for dtype in (np.float16, np.float64):
        xc = x.astype(dtype)
        sel = k_center_greedy(xc, n_samples=50)
        assert_same(sel, reference(xc.astype(np.float32), n_samples=50))


def test_deterministic() -> None:
    x = clustered(np.random.default_rng(8), 2000, 16)
    a = k_center_greedy(x, n_samples=100)
    b = k_center_greedy(x, n_samples=100)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.min_distances, b.min_distances)


ERRORS = [
    ({}, "n_samples or min_distance"),
    ({"n_samples": -1}, "n_samples"),
    ({"min_distance": -0.5}, "min_distance"),
    ({"min_distance": float("nan")}, "min_distance"),
]


@pytest.mark.parametrize(("kwargs", "message"), ERRORS)
def test_bad_limits(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(InputError, match=message):
        k_center_greedy(np.zeros((3, 2), np.float32), **kwargs)  # type: ignore[arg-type]


def test_bad_arrays() -> None:
    good = np.ones((4, 3), np.float32)
    cases = [
        (dict(candidates=np.ones(4, np.float32)), "2-D"),
        (dict(candidates=np.ones((2, 2, 2), np.float32)), "2-D"),
        (dict(candidates=np.ones((4, 3), np.int64)), "floating"),
        (dict(candidates=good, pool=np.ones((2, 4), np.float32)), "dimension"),
        (dict(candidates=np.where(np.eye(4, 3) > 0, np.nan, 1.0)), "row 0"),
        (dict(candidates=good, pool=np.array([[1, 2, np.inf]])), "pool row 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            k_center_greedy(n_samples=2, **kwargs)  # type: ignore[arg-type]


grid = st.integers(min_value=0, max_value=3).map(float)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.lists(grid, min_size=3, max_size=3), min_size=1, max_size=30),
    n_pool=st.integers(min_value=0, max_value=5),
    n_samples=st.one_of(st.none(), st.integers(min_value=0, max_value=40)),
    min_distance=st.one_of(st.none(), st.floats(min_value=0.0, max_value=3.0)),
)
def test_properties(
    rows: list[list[float]], n_pool: int, n_samples: int | None, min_distance: float | None
) -> None:
    if n_samples is None and min_distance is None:
        n_samples = 10
    x = np.array(rows, dtype=np.float32)
    pool, cand = x[:n_pool], x[n_pool:]
    sel = k_center_greedy(cand, pool=pool, n_samples=n_samples, min_distance=min_distance)
    idx, dist = sel.indices, sel.min_distances
    assert_same(sel, reference(cand, pool, n_samples, min_distance))  # exact integer data
    assert len(set(idx.tolist())) == len(idx)
    assert np.all(np.diff(dist) <= 0)
    assert np.all(dist > 0)
    if min_distance is not None:
        assert np.all(dist >= min_distance)
    if n_samples is not None:
        assert len(idx) <= n_samples
    seen = {tuple(r) for r in pool}
    for i in idx:  # duplicates of the pool or of earlier picks are never picked
        assert tuple(cand[i]) not in seen
        seen.add(tuple(cand[i]))


# --- Exact ties at the top-set boundary, caller's torch settings, the error bound (issue 9) ---


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging (the engine's loops are Python-level)."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"k_center_greedy did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def tie_at_the_boundary() -> tuple[np.ndarray, np.ndarray]:
    """The reported hang: late rows whose bound equals the level at the top-set boundary.

    1-D candidates alternating +5 / -5, with 150 zeros exactly where the pool
    pass samples rows to estimate its level; pool: 1,024 rows at +10, then
    1,024 at -10 (two chunks), so rows stop early with bounds tied to that level.
    """
    n = 4000
    x = np.where(np.arange(n) % 2 == 0, 5.0, -5.0).astype(np.float32)
    sampled = torch.linspace(0, n - 1, min(4096, n // 4)).long().numpy()
    x[sampled[:150]] = 0.0
    pool = np.concatenate([np.full(1024, 10.0), np.full(1024, -10.0)]).astype(np.float32)
    return x[:, None], pool[:, None]


def test_tie_at_the_top_set_boundary_returns_the_textbook_picks() -> None:
    x, pool = tie_at_the_boundary()
    with deadline(60):
        sel = k_center_greedy(x, pool=pool, n_samples=3)
    assert_same(sel, reference(x, pool, n_samples=3))
    assert sel.min_distances.tolist() == [10.0, 5.0, 5.0]


def integer_grid(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points of {0..3}^2 (thousands of exact duplicates and tied distances), pool beside."""
    cand = rng.integers(0, 4, (6000, 2)).astype(np.float32)
    pool = rng.integers(3, 8, (1500, 2)).astype(np.float32)
    return cand, pool


def duplicated_rows(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """20 distinct integer rows, each repeated 300 times; a 1,100-row pool of others."""
    base = rng.integers(-6, 7, (20, 8)).astype(np.float32)
    cand = rng.permutation(np.repeat(base, 300, axis=0))
    pool = rng.integers(-2, 3, (1100, 8)).astype(np.float32)
    return cand, pool


def symmetric(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """+-e_i and +-2 e_i in 16-d: every candidate equally far from a pool at the origin."""
    eye = np.eye(16, dtype=np.float32)
    cand = np.concatenate([np.tile(np.concatenate([eye, -eye, 2 * eye, -2 * eye]), (80, 1))])
    pool = np.zeros((1300, 16), np.float32)
    pool[::2] = 3 * eye[rng.integers(0, 16, 650)]
    return cand, pool


TIES = {"integer grid": integer_grid, "duplicates": duplicated_rows, "symmetric": symmetric}


@pytest.mark.parametrize("kind", sorted(TIES))
@pytest.mark.parametrize("rule", [{"n_samples": 40}, {"min_distance": 1.0}])
def test_exact_ties_beyond_the_top_set_with_a_multi_chunk_pool(
    kind: str, rule: dict[str, float]
) -> None:
    """More tied rows than the top set holds (>= 256), pool over one chunk (1,024 rows)."""
    cand, pool = TIES[kind](np.random.default_rng(21))
    assert len(pool) > selection._CHUNK
    ref = reference(cand, pool, **rule)  # type: ignore[arg-type]
    assert len(ref[0]) > 1
    d2 = pool_minimum(cand, pool)  # integer coordinates: every sum is exact
    assert int((d2 == d2.max()).sum()) > 256  # the first pick alone ties beyond the top set
    with deadline(120):
        sel = k_center_greedy(cand, pool=pool, **rule)  # type: ignore[arg-type]
    assert_same(sel, ref)


def numerics() -> tuple[str, str, bool, int, bool]:
    """The process-wide settings a selection must leave as it found them."""
    mkldnn: Any = torch.backends.mkldnn
    return (
        torch.backends.cuda.matmul.fp32_precision,
        mkldnn.matmul.fp32_precision,
        torch.is_autocast_enabled("cpu"),
        torch.get_num_threads(),
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
    )


@pytest.fixture
def medium_precision() -> Iterator[None]:
    """The caller asked for fast, reduced-precision float32 products (bf16 / TF32)."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


class RecordPrecision(TorchFunctionMode):
    """Records the matmul precision in force at every product the engine runs."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__()
        self.seen: list[tuple[str, str, bool]] = []
        self.fail_after = fail_after

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.addmm, torch.addmv, torch.mm, torch.matmul, torch.Tensor.__matmul__):
            self.seen.append(numerics()[:3])
            if self.fail_after is not None and len(self.seen) > self.fail_after:
                raise KeyboardInterrupt("interrupted inside the engine")
        return func(*args, **(kwargs or {}))


def test_products_run_in_full_float32_whatever_the_caller_set(medium_precision: None) -> None:
    x = clustered(np.random.default_rng(9), 3000, 32)
    with RecordPrecision() as mode:
        sel = k_center_greedy(x[1200:], pool=x[:1200], n_samples=50)
    assert mode.seen and set(mode.seen) == {("ieee", "ieee", False)}
    assert_same(sel, reference(x[1200:], x[:1200], n_samples=50))


@pytest.mark.slow  # 3 s, the textbook's; test_products_run_in_full_float32_... checks the same
def test_medium_matmul_precision_gives_the_textbook_picks(medium_precision: None) -> None:
    x = clustered(np.random.default_rng(0), 20_000, 64)
    pool, cand = x[:2000], x[2000:]
    sel = k_center_greedy(cand, pool=pool, n_samples=60)
    assert_same(sel, reference(cand, pool, n_samples=60))


def test_autocast_region_gives_the_textbook_picks() -> None:
    x = clustered(np.random.default_rng(0), 6000, 32)
    pool, cand = x[:1500], x[1500:]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sel = k_center_greedy(cand, pool=pool, n_samples=60)
        assert torch.is_autocast_enabled("cpu")  # still the caller's region afterwards
    assert_same(sel, reference(cand, pool, n_samples=60))


def test_caller_settings_come_back_even_after_an_interruption(medium_precision: None) -> None:
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(3)
    mkldnn: Any = torch.backends.mkldnn
    mkldnn.matmul.fp32_precision = "bf16"
    try:
        before = numerics()
        assert before[:2] == ("tf32", "bf16") and before[3] == 3
        x = clustered(np.random.default_rng(1), 2000, 16)
        k_center_greedy(x, n_samples=20)
        assert numerics() == before
        with pytest.raises(KeyboardInterrupt), RecordPrecision(fail_after=2):
            k_center_greedy(x[500:], pool=x[:500], n_samples=20)
        assert numerics() == before
        assert torch.get_float32_matmul_precision() == "medium"  # legacy view still readable
    finally:
        torch.set_num_threads(saved_threads)


@pytest.mark.parametrize("d", [1, 2, 3, 4, 8, 64, 512])
def test_error_bound_holds_with_margin_on_cancelling_data(d: int) -> None:
    """|GEMM form - direct form| <= kappa(d) * (|x|^2 + |c|^2) on rows far from the origin."""
    rng = np.random.default_rng(d)
    offset = rng.standard_normal(d).astype(np.float32) * 100  # big norms, small distances
    x = torch.from_numpy(offset + rng.standard_normal((4000, d)).astype(np.float32) * 1e-2)
    c = torch.from_numpy(offset + rng.standard_normal((64, d)).astype(np.float32) * 1e-2)
    xn, cn = (x * x).sum(1), (c * c).sum(1)
    gemm = torch.addmm(cn.unsqueeze(0), x, c.T, alpha=-2.0).add_(xn.unsqueeze(1))
    direct = ((x[:, None, :] - c[None]) ** 2).sum(-1)
    worst = float(((gemm - direct).abs() / (xn[:, None] + cn[None])).max())
    kappa = selection.error_bound(d)
    assert 0 < worst <= kappa
    u = 2.0**-24
    assert kappa >= (4.618 * d + 7.618) * u  # at least the first-order worst case


def test_too_large_values_and_dimensions_are_refused() -> None:
    big = np.ones((5, 2), np.float32)
    big[3] = 3e18  # squared norm ~2e37: sums of two would overflow float32
    with pytest.raises(InputError, match="candidates row 3 has a squared norm"):
        k_center_greedy(big, n_samples=2)
    with pytest.raises(InputError, match="pool row 1 has a squared norm"):
        k_center_greedy(np.ones((5, 2), np.float32), pool=big[2:], n_samples=2)


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_each_row_receives_each_pool_row_once(
    monkeypatch: pytest.MonkeyPatch, precision: selection.PoolPrecision
) -> None:
    """The pool pass keeps exact minima, so making rows exact never re-reads the pool."""
    applied: list[int] = []
    rechecked: list[int] = []  # addresses of the centres made exact against
    chunk, exact = selection._State._pool_chunk, selection.exact_min

    def counted(self: selection._State, rows: Any, ab: Any, tb: Any, j: int, *rest: Any) -> None:
        if self.track:  # not the sampled estimate of the level (_drop_level)
            applied.append(rows.x.shape[0] * self._pool()[j][0].shape[0])
        chunk(self, rows, ab, tb, j, *rest)

    def recorded(*args: Any) -> torch.Tensor:
        c = args[3]
        rechecked.append(c.data_ptr())
        return exact(*args)

    monkeypatch.setattr(selection, "_CHUNK", 64)
    monkeypatch.setattr(selection._State, "_pool_chunk", counted)
    monkeypatch.setattr(selection, "exact_min", recorded)
    x = clustered(np.random.default_rng(5), 3000, 16)
    pool, cand = np.ascontiguousarray(x[:640]), x[640:]
    sel = k_center_greedy(cand, pool=pool, n_samples=400, pool_precision=precision)
    assert_same(sel, reference(cand, pool, n_samples=400))
    assert 0 < sum(applied) <= len(cand) * len(pool)
    start, end = pool.ctypes.data, pool.ctypes.data + pool.nbytes
    assert rechecked and not [a for a in rechecked if start <= a < end]  # picks only


@pytest.mark.parametrize("with_pool", [False, True])
def test_next_distance_without_picks_and_with_every_row_picked(with_pool: bool) -> None:
    x = unit(np.random.default_rng(2), 300, 8)
    pool, cand = (x[:100], x[100:]) if with_pool else (None, x)
    ref = reference(cand, pool, n_samples=0)
    sel = k_center_greedy(cand, pool=pool, n_samples=0)
    assert len(sel.indices) == 0
    if with_pool:  # the coverage radius of the candidates by the pool
        assert math.isclose(sel.next_distance, ref[2], rel_tol=1e-6)
    else:
        assert sel.next_distance == ref[2] == math.inf
    assert k_center_greedy(cand, pool=pool, n_samples=len(cand)).next_distance == 0.0
    assert k_center_greedy(cand[:0], pool=pool, n_samples=5).next_distance == 0.0


def test_nearest_matches_brute_force() -> None:
    rng = np.random.default_rng(4)
    centres = clustered(rng, 2500, 24)
    queries = np.concatenate([clustered(rng, 700, 24), centres[:5]])
    got = nearest(queries, centres)
    d = np.sqrt(((queries[:, None, :] - centres[None, :, :]) ** 2).sum(axis=2, dtype=np.float64))
    np.testing.assert_allclose(got.distances, d.min(axis=1), atol=2e-3)
    assert (d[np.arange(len(queries)), got.indices] <= d.min(axis=1) + 2e-3).all()
    np.testing.assert_array_equal(got.indices[-5:], np.arange(5))
    empty = nearest(queries, None)
    assert np.isinf(empty.distances).all() and (empty.indices == -1).all()
    with pytest.raises(InputError, match="dimension"):
        nearest(queries, centres[:, :3])


def _offset(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Clusters far from the origin: the bfloat16 pass's error scales with the norms
    unless it centres the rows."""
    out: np.ndarray = clustered(rng, n, d) * 3 + 50
    return out


def _grid(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Small integers: duplicate rows and exactly tied distances."""
    return rng.integers(0, 3, size=(n, d)).astype(np.float32)


LOWP = {"random": unit, "clustered": clustered, "offset": _offset, "grid": _grid}


# 350: the pool pass stops rows early. 3000 (late picks meet float32 ties) takes ~1 s a
# kind except grid; the default suite keeps offset (far from the origin: what centring
# the rows is for) and grid (ties everywhere), the other two run with -m slow.
LOWP_CASES = [(kind, 350) for kind in sorted(LOWP)] + [
    pytest.param(kind, 3000, marks=[pytest.mark.slow] if kind in ("clustered", "random") else [])
    for kind in sorted(LOWP)
]


@pytest.mark.parametrize(("kind", "picks"), LOWP_CASES)
def test_bfloat16_pool_pass_picks_what_the_float32_pass_picks(kind: str, picks: int) -> None:
    """Bit for bit, and the textbook's picks where numpy's and torch's sums do not tie
    (late picks of 3000 meet float32 ties between them, for both passes alike)."""
    rng = np.random.default_rng(41)
    x = LOWP[kind](rng, 4500, 6 if kind == "grid" else 24)
    pool, cand = x[:1500], x[1500:]
    low = k_center_greedy(cand, pool=pool, n_samples=picks, pool_precision="bfloat16")
    full = k_center_greedy(cand, pool=pool, n_samples=picks, pool_precision="float32")
    np.testing.assert_array_equal(low.indices, full.indices)
    np.testing.assert_array_equal(low.min_distances, full.min_distances)
    assert low.next_distance == full.next_distance
    if picks == 350:
        assert_same(low, reference(cand, pool, n_samples=picks))


@pytest.mark.parametrize("d", [3, 64, 128, 700])
def test_bfloat16_products_stay_within_their_bound(d: int) -> None:
    """The bound assumes this machine's bf16 GEMM accumulates in float32 and rounds once."""
    rng = np.random.default_rng(d)
    scales = np.exp(rng.uniform(-3, 3, size=(1, d))).astype(np.float32)  # mixed magnitudes
    c = (rng.standard_normal((1024, d)) * scales + 7).astype(np.float32)
    half = 300 if d <= 128 else 40  # the textbook check below is rows x 1024 x d
    x = np.concatenate([c[:half] + 1e-3 * rng.standard_normal((half, d)), c[300 : 300 + half] * -1])
    xt, ct = torch.from_numpy(x.astype(np.float32)), torch.from_numpy(c)
    st = selection._State(xt, selection._Centres(ct, d, torch.device("cpu")), 64 << 20)
    st.lowp = True
    rows = st._rows_of(xt, (xt * xt).sum(dim=1))
    g = st._lowp_products(rows, 0).double()
    t = ((xt.unsqueeze(1) - ct.unsqueeze(0)) ** 2).sum(dim=2).double()  # the textbook form
    cnc = st._pool_lowp()[0][1]
    bound = (rows.xnc.unsqueeze(1) + cnc.unsqueeze(0)).double() * st.kappa_lowp
    assert bool(((g - t).abs() <= bound).all())
    assert float(((g - t).abs() / bound).max()) > 1e-4  # the products really were bf16


def test_pool_precision_is_checked_and_auto_stays_off_gpus() -> None:
    cpu = torch.device("cpu")
    assert selection.lowp_pool_pass(cpu, "bfloat16") is True
    assert selection.lowp_pool_pass(cpu, "float32") is False
    assert selection.lowp_pool_pass(torch.device("cuda"), "auto") is False
    with pytest.raises(InputError, match="pool_precision must be one of auto, float32"):
        k_center_greedy(np.zeros((3, 2), np.float32), n_samples=1, pool_precision="fp16")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("data", "rows", "picks", "taken"),
    [  # 300 of 3000: exact pool minima are kept (>= a tenth) and rows may stop early
        ("spread", 600, 600, True),
        ("tight clusters", 600, 600, False),
        ("spread", 3000, 300, False),
        ("far from the origin", 3000, 300, True),
    ],
)
def test_auto_takes_the_bfloat16_pass_only_where_it_pays(
    monkeypatch: pytest.MonkeyPatch, data: str, rows: int, picks: int, taken: bool
) -> None:
    """``auto`` probes the share of pairs in the bfloat16 window: spread rows without
    pruning take it; tight clusters (a wide window) or a pass that prunes (few picks)
    stay float32, unless float32's own window is far wider (rows far from the origin:
    its bound grows with the uncentred norms). The picks are the float32 pass's."""
    from datapool.hardware import cpu_has_native_bf16

    if not cpu_has_native_bf16():
        pytest.skip("auto keeps float32 on CPUs without native bfloat16")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3000 + rows, 128))
    if data == "tight clusters":
        x = rng.standard_normal((20, 128))[rng.integers(0, 20, 3000 + rows)] + 0.2 * x
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    if data == "far from the origin":
        x += np.float32(50)
    pool, cand = x[:3000], x[3000:]
    used: list[bool] = []
    lowp_chunk = selection._State._lowp_chunk

    def spy(self: Any, *args: Any) -> None:
        used.append(True)
        lowp_chunk(self, *args)

    monkeypatch.setattr(selection._State, "_lowp_chunk", spy)
    auto = k_center_greedy(cand, pool=pool, n_samples=picks, pool_precision="auto")
    assert bool(used) is taken
    # far from the origin the float32 pass is the slow one (seconds): the bfloat16 pass's
    # picks are checked against it on such data in test_bfloat16_pool_pass_picks_...
    peer: selection.PoolPrecision = "bfloat16" if data == "far from the origin" else "float32"
    full = k_center_greedy(cand, pool=pool, n_samples=picks, pool_precision=peer)
    np.testing.assert_array_equal(auto.indices, full.indices)
    np.testing.assert_array_equal(auto.min_distances, full.min_distances)


def test_bfloat16_pass_settles_early_when_its_pending_pairs_fill_the_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Duplicate-heavy rows put many pairs in every window; a small budget settles them
    early (bounded memory) with the same result."""
    settled: list[int] = []
    settle = selection._Pending.settle

    def counted(self: selection._Pending, *args: Any) -> None:
        settled.append(self.count)
        settle(self, *args)

    monkeypatch.setattr(selection._Pending, "settle", counted)
    x = _grid(np.random.default_rng(3), 3000, 4)  # 81 distinct rows: ties everywhere
    pool, cand = x[:2000], x[2000:]
    kw: dict[str, Any] = {"pool": pool, "n_samples": 400, "memory_budget": 1 << 16}
    low = k_center_greedy(cand, pool_precision="bfloat16", **kw)
    full = k_center_greedy(cand, pool_precision="float32", **kw)
    np.testing.assert_array_equal(low.indices, full.indices)
    np.testing.assert_array_equal(low.min_distances, full.min_distances)
    assert max(settled) > (1 << 16) // 24  # settled because the entries passed the cap


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
@pytest.mark.parametrize("picks", [60, 400, 1200])  # few (pruned, untracked), many, all
def test_a_prior_stands_for_a_pool_given_once(picks: int, precision: str) -> None:
    """pool_minima of a big pool, passed as prior, picks what the big pool itself does."""
    rng = np.random.default_rng(picks)
    x = clustered(rng, 5200, 16)
    cand, big, small = x[:1200], x[1200:5150], x[5150:]
    prior = selection.pool_minima(cand, big, pool_precision=precision)  # type: ignore[arg-type]
    for pool in (small, None):
        union = big if pool is None else np.concatenate([big, pool])
        want = k_center_greedy(cand, pool=union, n_samples=picks, pool_precision="float32")
        got = k_center_greedy(cand, pool=pool, n_samples=picks, prior=prior)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.min_distances, want.min_distances)
        assert got.next_distance == want.next_distance


def test_pool_minima_are_the_textbook_values_and_a_bad_prior_is_refused() -> None:
    rng = np.random.default_rng(8)
    cand, pool = unit(rng, 300, 8), unit(rng, 900, 8)
    got = selection.pool_minima(cand, pool)
    want = ((torch.from_numpy(cand)[:, None] - torch.from_numpy(pool)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(got, want.amin(dim=1).numpy())
    assert np.isinf(selection.pool_minima(cand, None)).all()
    with pytest.raises(InputError, match=r"prior must have shape \[300\]"):
        k_center_greedy(cand, n_samples=3, prior=np.zeros(5))
    with pytest.raises(InputError, match="prior must hold squared distances >= 0"):
        k_center_greedy(cand, n_samples=3, prior=np.full(300, -1.0))


# float32: no row stops early on this data (the case is the bf16 pass's), and the float32
# first pass takes ~2 s on rows this far from the origin; its exact tracked minima are
# checked in the default suite through pool_minima (test_a_prior_stands_..., float32). Slow.
@pytest.mark.parametrize("lowp", [pytest.param(False, marks=pytest.mark.slow), True])
def test_rows_completed_after_a_flush_keep_their_textbook_pool_minimum(lowp: bool) -> None:
    """A late row is completed after picks were applied to it: the window of its pool pass
    must start from its pool minimum, not from a pick's distance, whose error bound (far
    from the origin: large norms) is not the pool pass's (found by review)."""
    rng = np.random.default_rng(0)
    d = 8
    p = (1e5 + rng.standard_normal((3000, d))).astype(np.float32)
    near = p[2500:2600][rng.integers(0, 100, 2000)] + 1e-2 * rng.standard_normal((2000, d))
    far = 1e5 + 30 * rng.standard_normal((2000, d))
    x = torch.from_numpy(np.concatenate([far, near]).astype(np.float32))
    pool = torch.from_numpy(p)
    st = selection._State(x, selection._Centres(pool, d, torch.device("cpu")), 64 << 20)
    st.track, st.lowp = True, lowp
    st.first_pass(800)
    late = st.late(torch.arange(len(x)))
    assert late.numel() > 300 or not lowp  # the bf16 pass stopped many rows early
    st.centres.add(x[0].clone())
    st.flush()
    st.complete(late)
    rows = late[:300] if late.numel() else torch.arange(300)  # float32: nothing stopped early
    want = torch.stack([((x[i] - pool) ** 2).sum(dim=1).min() for i in rows])
    assert torch.equal(st.tpool[rows], want)
    to_pick = ((x[rows] - x[0]) ** 2).sum(dim=1)
    assert torch.equal(st.exact(rows, x[rows], st.xn[rows]), torch.minimum(want, to_pick))
