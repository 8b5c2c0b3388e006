"""Tests of datapool.herding (the HERDING strategy, issue 12's default) on small real data."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from datapool.errors import InputError
from datapool.herding import herd_and_cover
from datapool.selection import k_center_greedy
from datapool.strategies import describe, parse_strategies, select

HERDING = parse_strategies([{"strategy": "herding"}])


def digits(n: int = 600) -> np.ndarray:
    """The first ``n`` of scikit-learn's digits as float32 [n, 64] in [0, 1]."""
    from sklearn.datasets import load_digits

    out: np.ndarray = (load_digits().data[:n] / 16).astype(np.float32)
    return out


def names(n: int) -> list[str]:
    return [f"img/{i:04d}.png" for i in range(n)]


def radius_after(x: np.ndarray, picks: np.ndarray, pool: np.ndarray | None = None) -> float:
    centres = x[picks] if pool is None else np.concatenate([pool, x[picks]])
    d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(centres).double())
    return float(d.min(dim=1).values.max())


def herding_gains(x: np.ndarray, centres: np.ndarray, sigma: float) -> torch.Tensor:
    """float64 gain of every row of ``x`` once ``centres`` are picked (all rows as reference)."""
    xt = torch.from_numpy(x).double()
    kern = torch.exp(-(torch.cdist(xt, xt) ** 2) / (2 * sigma**2))
    cov = torch.zeros(len(x), dtype=torch.float64)
    if len(centres):
        c = torch.from_numpy(centres).double()
        cov = torch.exp(-(torch.cdist(c, xt) ** 2) / (2 * sigma**2)).amax(dim=0)
    return (kern - cov).clamp(min=0).sum(dim=1)


def written_rule(
    x: np.ndarray, k: int, radius: float, bandwidth: float, pool: np.ndarray | None
) -> tuple[list[int], float]:
    """The module docstring's rule, written out: float64, one full pass per pick.

    Returns the picks and sigma."""
    xt = torch.from_numpy(x).double()
    cen = None if pool is None else torch.from_numpy(pool).double()

    def farthest_first(start: list[int], budget: int, stop: float) -> tuple[list[int], float]:
        parts = [c for c in (cen, xt[start] if start else None) if c is not None]
        d = torch.cdist(xt, torch.cat(parts)).min(dim=1).values if parts else None
        out: list[int] = []
        while True:
            if d is None:  # no centre: k-center's first pick is row 0
                j = 0
            else:
                j = int(d.argmax())
                if float(d[j]) < stop or len(out) == budget:
                    return out, float(d.max())
            out.append(j)
            dj = torch.cdist(xt, xt[j : j + 1]).squeeze(1)
            d = dj if d is None else torch.minimum(d, dj)

    _, r = farthest_first([], k, 0.0)
    sigma = bandwidth * r
    kern = torch.exp(-(torch.cdist(xt, xt) ** 2) / (2 * sigma**2))
    cov = torch.zeros(len(x), dtype=torch.float64)
    if cen is not None:
        cov = torch.exp(-(torch.cdist(cen, xt) ** 2) / (2 * sigma**2)).amax(dim=0)
    herd: list[int] = []
    for _ in range(k):
        gain = (kern - cov).clamp(min=0).sum(dim=1)
        gain[herd] = -math.inf
        j = int(gain.argmax())
        herd.append(j)
        cov = torch.maximum(cov, kern[j])
    best: list[int] = []
    for h in range(k + 1):  # the largest h that fits (a scan, not a search)
        picks, left = farthest_first(herd[:h], k - h, radius * r)
        if left < radius * r or len(picks) < k - h:
            best = herd[:h] + picks
    return best, sigma


@pytest.mark.parametrize("pool_rows", [0, 30])
@pytest.mark.parametrize("k", [5, 20, 60])
def test_herding_matches_the_written_rule(pool_rows: int, k: int) -> None:
    x = digits(300)
    pool = digits(300 + pool_rows)[300:] if pool_rows else None
    got = select(x, names(len(x)), strategies=HERDING, pool=pool, n_samples=k)
    want, sigma = written_rule(x, k, 1.065, 0.3, pool)
    assert len(want) == k and got.reason == "n_samples"
    mine = got.indices.tolist()
    if mine != want:
        # digits (integer pixels) hold exact ties, e.g. two rows that are each other's
        # only neighbour; float32 kernels break them either way: the first difference
        # must be a tie of the float64 gains, after which the picks may differ
        i = next(i for i, (a, b) in enumerate(zip(mine, want, strict=True)) if a != b)
        before = x[mine[:i]] if pool is None else np.concatenate([pool, x[mine[:i]]])
        g = herding_gains(x, before, sigma)
        assert float(g[mine[i]]) == pytest.approx(float(g[want[i]]), rel=1e-6)


@pytest.mark.parametrize("k", [6, 15, 30, 60, 120])
def test_radius_stays_within_the_bound_and_picks_are_denser_than_k_centers(k: int) -> None:
    x = digits()
    got = select(x, names(len(x)), strategies=HERDING, n_samples=k)
    plain = k_center_greedy(x, n_samples=k)
    assert len(set(got.indices.tolist())) == k
    assert radius_after(x, got.indices) <= 1.065 * plain.next_distance * (1 + 1e-5)
    assert got.next_distance == pytest.approx(radius_after(x, got.indices), rel=1e-5)
    # herding spends picks where the digits are dense: nearer neighbours than k-center's
    nn = torch.cdist(torch.from_numpy(x), torch.from_numpy(x)).topk(11, largest=False)
    spread = nn.values[:, 1:].mean(dim=1).numpy()
    assert spread[got.indices].mean() < spread[plain.indices].mean()
    again = select(x, names(len(x)), strategies=HERDING, n_samples=k)
    assert again.indices.tolist() == got.indices.tolist()


def test_sampled_reference_keeps_the_bound_and_is_seeded() -> None:
    x = torch.from_numpy(digits(500))
    plain = k_center_greedy(x, n_samples=25)
    a = herd_and_cover(x, n_samples=25, sample=100, seed=1)
    b = herd_and_cover(x, n_samples=25, sample=100, seed=1)
    assert a.indices.tolist() == b.indices.tolist()
    assert 0 < a.herded <= 25
    assert a.radius == pytest.approx(plain.next_distance)
    assert radius_after(x.numpy(), a.indices) <= 1.065 * a.radius * (1 + 1e-5)


def test_min_distance_keeps_its_meaning() -> None:
    x = digits(400)
    pool = digits(450)[400:]
    plain = k_center_greedy(x, pool=pool, min_distance=1.6)
    got = select(x, names(len(x)), strategies=HERDING, pool=pool, min_distance=1.6)
    # only min_distance: picks until every candidate is closer than it, like k-center,
    # never more picks than k-center makes
    assert 0 < len(got.indices) <= len(plain.indices)
    assert radius_after(x, got.indices, pool) < 1.6 and got.reason == "min_distance"
    assert (got.distances >= 1.6).all()  # every pick that far from the pool and earlier picks
    capped = select(x, names(len(x)), strategies=HERDING, pool=pool, n_samples=10, min_distance=1.6)
    assert len(capped.indices) == 10 and (capped.distances >= 1.6).all()


def test_masked_preselected_and_duplicates() -> None:
    x = digits(200)
    x[50] = x[51]  # an exact duplicate is picked at most once
    masked = np.zeros(len(x), dtype=bool)
    masked[:20] = True
    pre = np.zeros(len(x), dtype=bool)
    pre[[30, 40]] = True
    got = select(x, names(len(x)), strategies=HERDING, n_samples=12, masked=masked, preselected=pre)
    assert got.indices[:2].tolist() == [30, 40] and got.preselected == 2
    assert len(got.indices) == 12 and not masked[got.indices].any()
    assert not {50, 51} <= set(got.indices.tolist())
    assert set(got.objectives) == {"diversity"}


def test_herding_settings_are_checked() -> None:
    cfg = parse_strategies([{"strategy": "herding", "radius": 1.1, "bandwidth": 0.5}])[0]
    assert (cfg.radius, cfg.bandwidth) == (1.1, 0.5)
    assert describe(HERDING) == {
        "herding": {"strategy": "herding", "radius": 1.065, "bandwidth": 0.3}
    }
    bad: dict[str, list[dict[str, Any]]] = {
        "radius must be >= 1": [{"strategy": "herding", "radius": 0.9}],
        "bandwidth must be > 0": [{"strategy": "herding", "bandwidth": 0}],
        "radius must be a finite number": [{"strategy": "herding", "radius": "x"}],
        "herding takes no strength": [{"strategy": "herding", "strength": 2}],
        "herding combines only with threshold, not with typicality": [
            {"strategy": "herding"},
            {"strategy": "typicality"},
        ],
    }
    for message, raw in bad.items():
        with pytest.raises(InputError, match=message):
            parse_strategies(raw)
    both = parse_strategies(
        [
            {"strategy": "threshold", "column": "s", "operation": ">", "value": 0},
            {"strategy": "herding"},
        ]
    )
    assert [c.strategy for c in both] == ["threshold", "herding"]
