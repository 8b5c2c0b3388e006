"""Exact pool minima that skip whole chunks of a clustered pool (datapool.pool_index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datapool import pool_index
from datapool.selection import k_center_greedy, pool_minima


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thresholds scaled down so that a few thousand rows take the pruned path."""
    monkeypatch.setattr(pool_index, "MIN_POOL", 2000)
    monkeypatch.setattr(pool_index, "_MIN_ROWS", 200)
    monkeypatch.setattr(pool_index, "CHUNK", 64)
    monkeypatch.setattr(pool_index, "_BLOCK", 128)


def rows(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    """Unit rows: 8 tight clusters (fewer than the pivots), or random directions."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.standard_normal((n, d))
    else:
        centres = rng.standard_normal((8, d))
        x = centres[rng.integers(0, 8, n)] + 0.25 * rng.standard_normal((n, d))
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def plain_minima(x: np.ndarray, pool: np.ndarray, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """pool_minima without the pruned path (the engine's tracked pass)."""
    with monkeypatch.context() as patch:
        patch.setattr(pool_index, "pruned_minima", lambda *args: None)
        out: np.ndarray = pool_minima(x, pool)
        return out


@pytest.mark.parametrize("d", [2, 16, 64])
@pytest.mark.parametrize("kind", ["clustered", "repeats", "random"])
def test_pruned_minima_are_the_textbook_minima(
    small: None, monkeypatch: pytest.MonkeyPatch, kind: str, d: int
) -> None:
    """Bit for bit the plain pass's minima (and the textbook's), chunks skipped or not;
    candidates that repeat pool rows get exactly 0."""
    every = rows("random" if kind == "random" else "clustered", 3200, d, seed=d)
    pool, x = every[:2600], every[2600:].copy()
    if kind == "repeats":
        x[:50] = pool[np.arange(50) * 7]
    got = pool_index.pruned_minima(
        torch.from_numpy(x), torch.from_numpy(pool), torch.full((600,), float("inf"))
    )
    want = plain_minima(x, pool, monkeypatch)
    np.testing.assert_array_equal(pool_minima(x, pool), want)
    some = x[::6]  # the textbook's broadcast is rows x pool x d
    textbook = ((some[:, None, :] - pool[None, :, :]) ** 2).sum(axis=2).min(axis=1)
    np.testing.assert_allclose(want[::6], textbook, rtol=1e-5, atol=1e-7)
    if kind == "repeats":
        assert (want[:50] == 0).all()
    if kind != "random" or d == 2:  # low-dimensional random rows group too
        assert got is not None and bool(got[1].all())  # every row done by skipping chunks
    if got is not None:
        done = got[1].numpy()
        np.testing.assert_array_equal(got[0].numpy()[done], want[done])


def test_random_directions_and_rows_far_from_the_origin_take_the_plain_pass(small: None) -> None:
    """Nothing to skip (random directions in 64 dimensions), or float32's bound too wide
    for the direct re-checks (rows 1e4 from the origin): the plain pass does all."""
    x = torch.from_numpy(rows("random", 3200, 64, seed=1))
    start = torch.full((600,), float("inf"))
    assert pool_index.pruned_minima(x[600:], x[:600], start) is None  # too few pool rows
    assert pool_index.pruned_minima(x[2600:], x[:2600], start) is None  # not grouped
    far = torch.from_numpy(rows("clustered", 3200, 16, seed=2)) + 1e4
    assert pool_index.pruned_minima(far[2600:], far[:2600], start) is None


def test_plain_k_center_with_a_big_pool_picks_the_same_through_the_minima(
    small: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain diversity in the strategies takes the pool minima first when a tenth of the
    rows or more are to be picked (pre-selected rows joining the pool): the picks and
    distances are the engine's with the pool."""
    from datapool import strategies

    calls: list[int] = []
    minima = strategies._minima

    def spy(x: torch.Tensor, pool: torch.Tensor, *args: object) -> np.ndarray:
        calls.append(pool.shape[0])
        return minima(x, pool, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(strategies, "_minima", spy)
    every = rows("clustered", 3200, 16, seed=3)
    pool, x = every[:2600], every[2600:]
    names = [f"img_{i}.png" for i in range(600)]
    pre = np.zeros(600, dtype=bool)
    pre[:5] = True
    got = strategies.select(x, names, pool=pool, n_samples=105, preselected=pre)
    assert calls == [2605]  # the pool and the 5 pre-selected rows
    centres = np.concatenate([pool, x[:5]])
    direct = k_center_greedy(x[5:], pool=centres, n_samples=100, pool_precision="float32")
    assert got.preselected == 5 and list(got.indices[:5]) == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(got.indices[5:], direct.indices + 5)
    np.testing.assert_array_equal(got.distances[5:], direct.min_distances)


def test_a_chunk_is_not_skipped_on_a_bound_that_underflow_breaks(
    small: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Subnormal rows (found by review): ``b``'s textbook value is 0 (every term
    underflows) though its true squared distance to the origin is ~13 * 2**-150, below
    ``a``'s 2**-149. The skip rule needs the absolute term of the error bound, or the
    chunk holding ``b`` is skipped and the minimum is 2**-149, not 0."""
    d = 16
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((8, d))
    e = centres[np.sort(rng.integers(0, 8, 6400))] + 0.25 * rng.standard_normal((6400, d))
    e = (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float32)
    pool, x = e[::2][:2600].copy(), e[1::2][:600].copy()
    pivot = int(pool_index._pivots(2600, 20)[3])
    tiny = np.float32(2.0**-75)
    pool[pivot - 63 : pivot + 1] = 0.0
    pool[pivot - 63 : pivot + 1, 0] = np.float32(1.1) * tiny  # |a|^2 = 2**-149 (64 copies)
    pool[pivot + 500] = np.float32(0.9) * tiny  # |b|^2 rounds to 0
    x[0] = 0.0
    got = pool_minima(x, pool)
    assert got[0] == 0.0
    np.testing.assert_array_equal(got, plain_minima(x, pool, monkeypatch))
