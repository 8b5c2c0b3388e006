"""Tests of datapool.strategies and datapool.strategy_inputs on small arrays with known answers."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datapool.errors import InputError
from datapool.selection import k_center_greedy
from datapool.strategies import (
    Balance,
    Objective,
    StrategyConfig,
    balance_targets,
    combine,
    describe,
    is_plain_diversity,
    parse_strategies,
    select,
    similarity,
    typicality,
    weights,
)
from datapool.strategy_inputs import flags_for, read_flags, read_names, read_scores


def gaussian(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return rng.standard_normal((n, d)).astype(np.float32)


def names(n: int) -> list[str]:
    return [f"img/{i:04d}.png" for i in range(n)]


def strategies(*entries: dict[str, Any]) -> tuple[StrategyConfig, ...]:
    return parse_strategies(list(entries))


def score_file(tmp_path: Path, columns: dict[str, Any], n: int) -> Path:
    path = tmp_path / "scores.csv"
    rows = ["filenames," + ",".join(columns)]
    for i, name in enumerate(names(n)):
        rows.append(name + "," + ",".join(str(v[i]) for v in columns.values()))
    path.write_text("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------- the two paths agree


@pytest.mark.parametrize(
    ("n", "d", "m", "dups"), [(2000, 16, 0, 0), (3000, 32, 400, 50), (5000, 8, 2500, 0)]
)
def test_diversity_alone_gives_k_center_picks(n: int, d: int, m: int, dups: int) -> None:
    rng = np.random.default_rng(n)
    x = gaussian(rng, n, d)
    pool = gaussian(rng, m, d) if m else None
    if dups:  # duplicates of the pool and of other candidates are never picked
        assert pool is not None
        x[:dups] = pool[:dups]
        x[dups : 2 * dups] = x[-dups:]
    want = k_center_greedy(x, pool=pool, n_samples=300)
    got = combine(x, pool=pool, n_samples=300)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.distances, want.min_distances)
    assert got.next_distance == want.next_distance
    assert got.reason == "n_samples"


def textbook_combination(
    x: np.ndarray,
    pool: np.ndarray,
    fixed: list[tuple[np.ndarray, float]],
    codes: np.ndarray,
    div: float,
    n_samples: int,
    min_distance: float,
) -> list[int]:
    """The module docstring's rule, written out: products in float64, uniform balance."""
    d2 = np.full(len(x), np.inf, dtype=np.float32)
    for row in pool:
        np.minimum(d2, ((x - row) ** 2).sum(axis=1), out=d2)
    labels = np.unique(codes)
    counts = dict.fromkeys(labels, 0)
    picks: list[int] = []
    while len(picks) < n_samples:
        d = np.sqrt(d2.astype(np.float64))
        ok = (d2 > 0) & (d >= min_distance)
        score = (d / d.max()) ** div
        for values, strength in fixed:
            score = score * values**strength
        live = [lab for lab in labels if (ok & (score > 0) & (codes == lab)).any()]
        want = {lab: max((len(picks) + 1) / len(live) - counts[lab], 0) for lab in live}
        top = max(want.values(), default=0)
        score = score * np.array([want.get(c, 0) / top if top else 0 for c in codes])
        score[~ok] = 0
        if not (score > 0).any():
            break
        i = int(np.argmax(score))
        picks.append(i)
        counts[codes[i]] += 1
        np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1), out=d2)
    return picks


@pytest.mark.parametrize(("n_samples", "min_distance"), [(40, 2.0), (200, 2.4)])
def test_combination_matches_the_written_rule(n_samples: int, min_distance: float) -> None:
    rng = np.random.default_rng(11)
    x = gaussian(rng, 400, 6)
    pool = gaussian(rng, 30, 6)
    typ = typicality(x, k=7)
    w = rng.uniform(0.1, 1.0, 400)
    codes = rng.integers(0, 3, 400)
    fixed = [(typ, 1.0), (w / w.max(), -0.5)]
    want = textbook_combination(x, pool, fixed, codes, 1.5, n_samples, min_distance)
    got = combine(
        x,
        pool=pool,
        objectives=[Objective("t", 1.0, typ), Objective("w", -0.5, w / w.max())],
        balance=Balance("b", 1.0, codes, np.full(3, 1 / 3), np.zeros(3, np.int64)),
        diversity=1.5,
        n_samples=n_samples,
        min_distance=min_distance,
    )
    assert list(got.indices) == want  # 40 picks (13/14/13), or 22 when min_distance stops it
    assert got.reason == ("n_samples" if n_samples == 40 else "min_distance")


@pytest.mark.parametrize("top_min", [4, 256])
@pytest.mark.parametrize(
    ("div", "w_strength", "min_distance", "pool_rows", "n_samples"),
    [
        (1.0, 1.0, None, 0, 150),
        (2.0, -1.0, 0.8, 50, 150),
        (0.0, 1.0, 0.5, 0, 150),
        (0.5, -0.5, None, 500, 150),
        (1.0, 0.0, 1.5, 0, 1200),  # stops at min_distance
        (1.0, 1.0, None, 0, 1200),  # stops when only zero weights are left
    ],
)
def test_lazy_loop_gives_the_full_loops_picks(
    monkeypatch: pytest.MonkeyPatch,
    top_min: int,
    div: float,
    w_strength: float,
    min_distance: float | None,
    pool_rows: int,
    n_samples: int,
) -> None:
    from datapool import strategies as module

    monkeypatch.setattr(module, "_TOP_MIN", top_min)  # 4: many phases, top sets that grow
    rng = np.random.default_rng(12)
    x = gaussian(rng, 1200, 5)
    x[1100:] = x[:100]  # duplicates
    pool = gaussian(rng, pool_rows, 5) if pool_rows else None
    w = np.round(rng.uniform(0, 1, 1200), 1)  # ties, and zeros (never / first picked)
    objectives = [Objective("t", 1.0, typicality(x, k=5)), Objective("w", w_strength, w)]
    runs = [
        combine(
            x,
            pool=pool,
            objectives=objectives,
            diversity=div,
            n_samples=n_samples,
            min_distance=min_distance,
            lazy=lazy,
        )
        for lazy in (True, False)
    ]
    lazy, full = runs
    np.testing.assert_array_equal(lazy.indices, full.indices)
    np.testing.assert_array_equal(lazy.distances, full.distances)
    for name in full.objectives:
        np.testing.assert_array_equal(lazy.objectives[name], full.objectives[name])
    assert (lazy.next_distance, lazy.reason) == (full.next_distance, full.reason)
    if n_samples == 1200:
        assert full.reason == ("min_distance" if min_distance else "zero score")


def test_min_distance_stops_both_paths_alike() -> None:
    rng = np.random.default_rng(1)
    x = gaussian(rng, 1500, 4)
    want = k_center_greedy(x, min_distance=1.0)
    got = combine(x, min_distance=1.0)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert got.reason == "min_distance"
    assert got.next_distance == want.next_distance < 1.0


def test_min_distance_makes_candidates_ineligible_in_a_combination() -> None:
    rng = np.random.default_rng(2)
    x = gaussian(rng, 1500, 4)
    got = select(
        x,
        names(1500),
        strategies=strategies({"strategy": "diversity"}, {"strategy": "typicality"}),
        min_distance=1.0,
    )
    assert (got.distances[1:] >= 1.0).all()
    assert got.reason == "min_distance" and got.next_distance < 1.0


# --------------------------------------------------------------------------- each strategy


def outlier_data() -> np.ndarray:
    """Two tight clusters of 60 and a planted outlier (row 120) far from both."""
    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 0.1, (60, 2))
    b = rng.normal(0.0, 0.1, (60, 2)) + np.array([5.0, 0.0])
    return np.vstack([a, b, [[2.5, 20.0]]]).astype(np.float32)


def test_typicality_skips_the_outlier_diversity_takes_first() -> None:
    x = outlier_data()
    plain = select(x, names(len(x)), n_samples=3)
    assert plain.indices[1] == 120  # k-center: the farthest row right after row 0
    both = select(
        x,
        names(len(x)),
        strategies=strategies({"strategy": "diversity"}, {"strategy": "typicality"}),
        n_samples=10,
    )
    assert 120 not in both.indices
    assert {int(i) // 60 for i in both.indices[:2]} == {0, 1}  # one pick in each cluster


def test_typicality_by_hand_and_with_a_sample() -> None:
    x = np.array([[0.0], [1.0], [3.0]], dtype=np.float32)
    np.testing.assert_allclose(typicality(x, k=1), [1.0, 1.0, 0.5], rtol=1e-6)
    # k=5 > 2 others: mean over both, m = [2, 1.5, 2.5]
    np.testing.assert_allclose(typicality(x, k=5), [0.75, 1.0, 0.6], rtol=1e-6)
    x = outlier_data()  # a 40-row sample still ranks the outlier last
    t = typicality(x, k=5, sample=40, seed=1)
    assert int(np.argmin(t)) == 120 and t.max() == 1.0
    dup = np.zeros((5, 2), dtype=np.float32)  # all at distance 0: no division by zero
    np.testing.assert_array_equal(typicality(dup, k=2), np.ones(5))


@pytest.mark.parametrize(
    ("target", "n", "want"),
    [
        ("uniform", 9, {"a": 3, "b": 3, "c": 3}),
        ("input", 8, {"a": 4, "b": 2, "c": 2}),
        ({"a": 0.5, "b": 0.3, "c": 0.2}, 10, {"a": 5, "b": 3, "c": 2}),
    ],
)
def test_balance_hits_target_counts(target: Any, n: int, want: dict[str, int]) -> None:
    rng = np.random.default_rng(4)
    x = gaussian(rng, 120, 8)
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 30
    for extra in ({"strategy": "diversity"}, {"strategy": "typicality"}):
        cfg = strategies(extra, {"strategy": "balance", "target": target})
        got = select(x, names(120), strategies=cfg, labels=labels, n_samples=n)
        assert Counter(labels[i] for i in got.indices) == want


def test_balance_counts_the_preselected() -> None:
    rng = np.random.default_rng(5)
    x = gaussian(rng, 40, 4)
    labels = ["a"] * 20 + ["b"] * 20
    pre = np.zeros(40, dtype=bool)
    pre[:3] = True  # three "a" already picked
    cfg = strategies({"strategy": "diversity"}, {"strategy": "balance"})
    got = select(x, names(40), strategies=cfg, labels=labels, preselected=pre, n_samples=6)
    assert Counter(labels[i] for i in got.indices) == {"a": 3, "b": 3}
    assert list(got.indices[:3]) == [0, 1, 2] and got.preselected == 3


def test_threshold_filters_before_diversity(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = gaussian(rng, 500, 8)
    sharp = rng.uniform(0, 1, 500).round(3)
    table = read_scores(score_file(tmp_path, {"sharp": sharp}, 500))
    cfg = strategies({"strategy": "threshold", "column": "sharp", "operation": ">=", "value": 0.5})
    assert is_plain_diversity(cfg)
    got = select(x, names(500), strategies=cfg, scores=table, n_samples=50)
    kept = np.flatnonzero(sharp >= 0.5)
    want = k_center_greedy(x[kept], n_samples=50)
    np.testing.assert_array_equal(got.indices, kept[want.indices])
    # the combination loop filters the same way
    weighted = (
        *cfg,
        *strategies(
            {"strategy": "diversity"}, {"strategy": "weights", "column": "sharp", "strength": 0}
        ),
    )
    again = select(x, names(500), strategies=weighted, scores=table, n_samples=50)
    np.testing.assert_array_equal(again.indices, got.indices)


def test_weights_with_strength_zero_are_pure_diversity(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    x = gaussian(rng, 800, 16)
    table = read_scores(score_file(tmp_path, {"u": rng.uniform(0, 1, 800).round(4)}, 800))
    cfg = strategies(
        {"strategy": "diversity"}, {"strategy": "weights", "column": "u", "strength": 0}
    )
    assert not is_plain_diversity(cfg)
    got = select(x, names(800), strategies=cfg, scores=table, n_samples=100)
    plain = select(x, names(800), n_samples=100)
    np.testing.assert_array_equal(got.indices, plain.indices)
    np.testing.assert_array_equal(got.distances, plain.distances)


def test_negative_strength_inverts(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    x = gaussian(rng, 50, 4)
    u = rng.permutation(50) / 10
    table = read_scores(score_file(tmp_path, {"u": u}, 50))
    up = select(
        x,
        names(50),
        strategies=strategies({"strategy": "weights", "column": "u"}),
        scores=table,
        n_samples=5,
    )
    down = select(
        x,
        names(50),
        strategies=strategies({"strategy": "weights", "column": "u", "strength": -1}),
        scores=table,
        n_samples=5,
    )
    np.testing.assert_array_equal(up.indices, np.argsort(-u)[:5])
    np.testing.assert_array_equal(down.indices, np.argsort(u)[:5])
    # a zero weight under a positive strength is never picked; under a negative one, first
    assert 0.0 not in u[up.indices] and u[down.indices[0]] == 0.0


def test_similarity_prefers_the_query_neighbourhood() -> None:
    x = outlier_data()
    queries = np.array([[5.0, 0.2]], dtype=np.float32)
    s = similarity(x, queries)
    assert s[60:120].min() > s[:60].max()
    cfg = strategies({"strategy": "diversity"}, {"strategy": "similarity", "strength": 3})
    got = select(x, names(len(x)), strategies=cfg, queries=queries, n_samples=5)
    assert 60 <= got.indices[0] < 120  # without a centre, the query's cluster first
    alone = strategies({"strategy": "similarity"})
    got = select(x, names(len(x)), strategies=alone, queries=queries, n_samples=5)
    assert all(60 <= i < 120 for i in got.indices)


def test_masked_rows_are_never_picked_and_never_count() -> None:
    x = outlier_data()
    masked = np.zeros(len(x), dtype=bool)
    masked[60:90] = True  # half of one cluster: typicality and diversity must not see it
    cfg = strategies({"strategy": "diversity"}, {"strategy": "typicality", "k": 5})
    got = select(x, names(len(x)), strategies=cfg, masked=masked, n_samples=20)
    keep = np.flatnonzero(~masked)
    alone = select(x[keep], names(len(keep)), strategies=cfg, n_samples=20)
    np.testing.assert_array_equal(got.indices, keep[alone.indices])
    assert not masked[got.indices].any()


@pytest.mark.parametrize("combined", [False, True])
def test_preselected_count_as_pool_and_come_first(combined: bool) -> None:
    rng = np.random.default_rng(9)
    x = gaussian(rng, 600, 8)
    pool = gaussian(rng, 100, 8)
    pre = np.zeros(600, dtype=bool)
    pre[[5, 17, 300]] = True
    cfg: tuple[StrategyConfig, ...] = ()
    if combined:
        cfg = strategies({"strategy": "diversity"}, {"strategy": "similarity", "strength": 0})
    got = select(
        x,
        names(600),
        strategies=cfg,
        pool=pool,
        preselected=pre,
        n_samples=40,
        queries=x[:1],
    )
    rest = np.flatnonzero(~pre)
    want = k_center_greedy(x[rest], pool=np.vstack([pool, x[pre]]), n_samples=37)
    np.testing.assert_array_equal(got.indices, [5, 17, 300, *rest[want.indices]])
    assert np.isnan(got.objectives["diversity"][:3]).all()
    d0 = np.sqrt(((pool - x[5]) ** 2).sum(axis=1)).min()
    assert got.distances[0] == pytest.approx(d0, rel=1e-6)


def test_result_records_objectives_and_strategies() -> None:
    x = outlier_data()
    cfg = strategies({"strategy": "diversity", "strength": 2}, {"strategy": "typicality"})
    got = select(x, names(len(x)), strategies=cfg, n_samples=4)
    assert set(got.objectives) == {"diversity", "typicality"}
    assert got.objectives["diversity"][0] == 1.0  # no centre yet
    assert ((got.objectives["typicality"] > 0) & (got.objectives["typicality"] <= 1)).all()
    assert describe(cfg) == {
        "diversity": {"strategy": "diversity", "strength": 2.0},
        "typicality": {"strategy": "typicality", "strength": 1.0, "k": 20},
    }
    assert describe(()) == {"diversity": {"strategy": "diversity", "strength": 1.0}}


# --------------------------------------------------------------------------- readers and errors


def test_readers(tmp_path: Path) -> None:
    listed = tmp_path / "relevant.txt"
    listed.write_text("./img/0001.png\n\n  img\\0003.png \nother/x.png\n")
    assert read_names(listed) == ["img/0001.png", "img/0003.png", "other/x.png"]
    flags = read_flags(listed, "masked", names(5))
    assert list(flags.mask) == [False, True, False, True, False]
    assert flags.unmatched == ("other/x.png",)
    csv = tmp_path / "tags.csv"
    csv.write_text("filenames,masked,selected\nimg/0000.png,True,0\nimg/0002.png,no,yes\n")
    assert list(read_flags(csv, "masked", names(3)).mask) == [True, False, False]
    assert list(read_flags(csv, "selected", names(3)).mask) == [False, False, True]
    assert flags_for(["b"], ["a", "b"]).mask.tolist() == [False, True]


def errors_of(call: Any) -> str:
    with pytest.raises(InputError) as err:
        call()
    return str(err.value)


def test_reader_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert "does not exist" in errors_of(lambda: read_scores(missing))
    assert "does not exist" in errors_of(lambda: read_flags(tmp_path / "n.txt", "masked", []))
    bad = tmp_path / "bad.csv"
    bad.write_text("filenames,masked\na.png,maybe\n")
    assert "line 2" in errors_of(lambda: read_flags(bad, "masked", ["a.png"]))
    assert "no 'selected' column" in errors_of(lambda: read_flags(bad, "selected", ["a.png"]))
    twice = tmp_path / "twice.csv"
    twice.write_text("filenames,u\na.png,1\nb.png,2\na.png,3\n")
    assert "line 4" in errors_of(lambda: read_scores(twice))
    nokey = tmp_path / "nokey.csv"
    nokey.write_text("name,u\na.png,1\n")
    assert "no 'filenames' column" in errors_of(lambda: read_scores(nokey))
    absolute = tmp_path / "abs.txt"
    absolute.write_text("/etc/passwd\n")
    assert "line 1" in errors_of(lambda: read_names(absolute))


def test_strategy_errors(tmp_path: Path) -> None:
    x = outlier_data()
    n = len(x)
    u = np.ones(n)
    u[7] = np.nan
    table = read_scores(score_file(tmp_path, {"u": u, "v": -u, "cam": ["x"] * n}, n))
    path = str(table.path)

    def run(cfg: dict[str, Any], **kw: Any) -> str:
        return errors_of(lambda: select(x, names(n), strategies=strategies(cfg), n_samples=3, **kw))

    msg = run({"strategy": "weights", "column": "nope"}, scores=table)
    assert "no column 'nope'" in msg and path in msg
    msg = run({"strategy": "weights", "column": "u"}, scores=table)
    assert f"{path} line 9 (filenames='img/0007.png')" in msg and "nan" in msg
    table2 = read_scores(score_file(tmp_path, {"v": -np.arange(n)}, n))
    msg = run({"strategy": "weights", "column": "v"}, scores=table2)
    assert "line 3 (filenames='img/0001.png')" in msg and ">= 0" in msg
    assert "every weight is 0" in errors_of(lambda: weights(np.zeros(3)))
    assert "no score file" in run({"strategy": "weights", "column": "u"})
    cfg = {"strategy": "threshold", "column": "v", "operation": ">", "value": 0}
    assert "leaves none of the" in run(
        cfg, scores=read_scores(score_file(tmp_path, {"v": -np.ones(n)}, n))
    )
    cfg = {"strategy": "balance", "column": "cam", "target": {"x": 0.5, "y": 0.5}}
    assert "label 'y', which no candidate has" in run(cfg, scores=table)
    assert "sum to 1" in errors_of(
        lambda: parse_strategies([{"strategy": "balance", "target": {"a": 0.5, "b": 0.4}}])
    )
    assert "no query" in run({"strategy": "similarity"})
    assert "no query" in run({"strategy": "similarity"}, queries=np.zeros((0, 2), np.float32))
    assert "strategy must be one of" in errors_of(lambda: parse_strategies([{"strategy": "x"}]))
    assert "takes no column" in errors_of(
        lambda: parse_strategies([{"strategy": "typicality", "column": "u"}])
    )
    flags = np.zeros(n, dtype=bool)
    flags[4] = True
    assert "both masked and pre-selected" in errors_of(
        lambda: select(x, names(n), masked=flags, preselected=flags, n_samples=3)
    )
    assert "balance target names" in errors_of(lambda: balance_targets(["a"], {"b": 1.0}))


def test_missing_score_row_and_nothing_left(tmp_path: Path) -> None:
    x = outlier_data()
    n = len(x)
    table = read_scores(score_file(tmp_path, {"u": np.ones(n - 1)}, n - 1))
    cfg = strategies({"strategy": "diversity"}, {"strategy": "weights", "column": "u"})
    msg = errors_of(lambda: select(x, names(n), strategies=cfg, scores=table, n_samples=3))
    assert "no row for 'img/0120.png'" in msg and str(table.path) in msg
    everything = np.ones(n, dtype=bool)
    cfg = strategies({"strategy": "typicality"}, {"strategy": "balance", "target": {"a": 1}})
    got = select(x, names(n), strategies=cfg, masked=everything, labels=["a"] * n, n_samples=3)
    assert len(got.indices) == 0 and got.reason == "no candidates left"


def test_plain_diversity_detection() -> None:
    assert is_plain_diversity(())
    assert is_plain_diversity(strategies({"strategy": "diversity", "strength": 3}))
    assert not is_plain_diversity(strategies({"strategy": "diversity", "strength": -1}))
    assert not is_plain_diversity(strategies({"strategy": "typicality"}))


# --------------------------------------------------------------------------- the radius guard


def textbook_guarded(
    x: np.ndarray,
    pool: np.ndarray | None,
    fixed: list[tuple[np.ndarray, float]],
    div: float,
    guard: float,
    n_samples: int,
    min_distance: float = 0.0,
) -> list[int]:
    """The radius guard's rule written out, one full pass per pick: among the rows
    that could be picked (score > 0), only those with ``d^2 >= guard^2 * max d^2``."""
    d2 = np.full(len(x), np.inf, dtype=np.float32)
    for row in [] if pool is None else pool:
        np.minimum(d2, ((x - row) ** 2).sum(axis=1), out=d2)
    picks: list[int] = []
    while len(picks) < n_samples:
        d = np.sqrt(d2.astype(np.float64))
        score = (d / d.max()) ** div if np.isfinite(d.max()) else np.ones(len(x))
        for values, strength in fixed:
            score = score * values**strength
        score[(d2 == 0) | (d < min_distance)] = 0
        if not (score > 0).any():
            break
        far = float(d2[score > 0].max())
        score[d2.astype(np.float64) < guard * guard * far] = 0
        i = int(np.argmax(score))
        picks.append(i)
        np.minimum(d2, ((x - x[i]) ** 2).sum(axis=1), out=d2)
    return picks


def _guard_cases() -> list[Any]:
    """(guard, min_distance, div, pool_rows, seed): every combination of the first four
    with each of 3 seeds. The default suite takes one seed per combination, in turn (so
    all three seeds and every setting run); the other two (24 cases, ~8 s) run with -m slow.
    div 0: the most typical of the far rows (the default)."""
    settings = [
        (guard, min_distance, div, pool_rows)
        for guard, min_distance in [(0.9, 0.0), (0.5, 0.0), (0.8, 1.2)]
        for div in (1.0, 0.0)
        for pool_rows in (0, 40)
    ]
    return [
        pytest.param(*setting, seed, marks=[] if seed == i % 3 else [pytest.mark.slow])
        for i, setting in enumerate(settings)
        for seed in (0, 1, 2)
    ]


@pytest.mark.parametrize(("guard", "min_distance", "div", "pool_rows", "seed"), _guard_cases())
def test_guard_matches_the_written_rule(
    monkeypatch: pytest.MonkeyPatch,
    seed: int,
    pool_rows: int,
    div: float,
    guard: float,
    min_distance: float,
) -> None:
    from datapool import strategies as module

    monkeypatch.setattr(module, "_TOP_MIN", 8)  # small top sets: many phases in the lazy loop
    rng = np.random.default_rng(seed)
    x = gaussian(rng, 500, 6)
    x[480:] = x[:20]  # duplicates: never picked twice
    pool = gaussian(rng, pool_rows, 6) if pool_rows else None
    typ = typicality(x, k=7)
    want = textbook_guarded(x, pool, [(typ, 1.0)], div, guard, 150, min_distance)
    for lazy in (True, False):
        got = combine(
            x,
            pool=pool,
            objectives=[Objective("typicality", 1.0, typ)],
            diversity=div,
            n_samples=150,
            min_distance=min_distance or None,
            guard=guard,
            lazy=lazy,
        )
        assert list(got.indices) == want
        assert got.reason == ("min_distance" if len(want) < 150 else "n_samples")


def test_guard_with_zero_weights_and_balance_matches_the_written_rule() -> None:
    """Rows that can't be picked (weight 0) never set the guard's maximum; with
    balance (the full loop) the guard applies among rows whose label may still be picked."""
    rng = np.random.default_rng(5)
    x = gaussian(rng, 400, 5)
    w = rng.uniform(0, 1, 400)
    w[np.argsort(-np.linalg.norm(x, axis=1))[:30]] = 0  # the outermost rows weigh nothing
    want = textbook_guarded(x, None, [(w / w.max(), 1.0)], 2.0, 0.85, 120)
    got = combine(x, objectives=[Objective("w", 1.0, w / w.max())], diversity=2.0, n_samples=120,
                  guard=0.85)  # fmt: skip
    assert list(got.indices) == want
    assert not (w[got.indices] == 0).any()
    codes = np.zeros(400, np.int64)  # one label: balance never vetoes, the full loop runs
    balanced = combine(
        x,
        objectives=[Objective("w", 1.0, w / w.max())],
        balance=Balance("b", 1.0, codes, np.ones(1), np.zeros(1, np.int64)),
        diversity=2.0,
        n_samples=120,
        guard=0.85,
    )
    assert list(balanced.indices) == want


@pytest.mark.parametrize("seed", [0, 1])
def test_guard_through_select_respects_pool_masked_and_preselected(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = gaussian(rng, 600, 6)
    pool = gaussian(rng, 60, 6)
    masked = np.zeros(600, dtype=bool)
    masked[rng.choice(600, 50, replace=False)] = True
    pre = np.zeros(600, dtype=bool)
    pre[np.flatnonzero(~masked)[:3]] = True
    cfg = strategies({"strategy": "diversity", "guard": 0.9}, {"strategy": "typicality", "k": 10})
    got = select(x, names(600), strategies=cfg, pool=pool, masked=masked, preselected=pre,
                 n_samples=80)  # fmt: skip
    cand = np.flatnonzero(~masked & ~pre)
    typ = typicality(x[cand], k=10)
    want = textbook_guarded(x[cand], np.vstack([pool, x[pre]]), [(typ, 1.0)], 1.0, 0.9, 77)
    np.testing.assert_array_equal(got.indices, [*np.flatnonzero(pre), *cand[want]])
    assert got.strategies["diversity"] == {"strategy": "diversity", "strength": 1.0, "guard": 0.9}
    # each pick is at least 0.9 times as far as the farthest candidate then
    picked = got.objectives["diversity"][3:]
    assert (picked >= 0.9 - 1e-9).all() and (picked < 1).any()


def test_guard_changes_nothing_for_plain_diversity_and_guard_one_is_k_center() -> None:
    rng = np.random.default_rng(3)
    x = gaussian(rng, 800, 6)
    want = k_center_greedy(x, n_samples=100).indices
    alone = strategies({"strategy": "diversity", "guard": 0.5})
    assert is_plain_diversity(alone)
    np.testing.assert_array_equal(select(x, names(800), strategies=alone, n_samples=100).indices,
                                  want)  # fmt: skip
    # guard 1: only the farthest competes (random data has no ties); a pool, so that the
    # first pick has a distance too (without centres every row is equally far)
    pool = gaussian(rng, 10, 6)
    typ = typicality(x, k=5)
    got = combine(x, pool=pool, objectives=[Objective("t", 3.0, typ)], n_samples=100, guard=1.0)
    np.testing.assert_array_equal(got.indices, k_center_greedy(x, pool=pool, n_samples=100).indices)


def test_guard_settings_are_checked() -> None:
    assert parse_strategies([{"strategy": "diversity", "guard": 0.8}])[0].guard == 0.8
    assert describe(strategies({"strategy": "diversity"})) == {
        "diversity": {"strategy": "diversity", "strength": 1.0}
    }
    for bad in (1.5, -0.1, "high", True, float("nan")):
        msg = errors_of(lambda b=bad: parse_strategies([{"strategy": "diversity", "guard": b}]))
        assert "selection.strategies[0].guard" in msg
    assert "typicality takes no guard" in errors_of(
        lambda: parse_strategies([{"strategy": "typicality", "guard": 0.9}])
    )
    assert "guard must be in [0, 1]" in errors_of(lambda: combine(np.ones((3, 2)), guard=2.0))


def _on_ranks(world: Any, out: Path) -> None:
    """Typicality (exact and sampled), the guarded selection and herding, by every rank."""
    import pickle

    from datapool.strategy_config import parse_strategies

    rng = np.random.default_rng(7)
    x = rng.normal(size=(301, 8)).astype(np.float32)
    pool = rng.normal(size=(40, 8)).astype(np.float32)
    default = parse_strategies(
        [
            {"strategy": "diversity", "strength": 0.0, "guard": 0.9},
            {"strategy": "typicality", "strength": 1.0, "k": 20},
        ]
    )
    herding = parse_strategies([{"strategy": "herding"}])  # its k-center runs are sharded
    names = [f"f{i}" for i in range(len(x))]
    result = {
        "exact": typicality(x, k=5, world=world),
        "sampled": typicality(x, k=5, sample=100, seed=3, world=world),
        "picks": select(x, names, strategies=default, pool=pool, n_samples=25, world=world),
        "herding": select(x, names, strategies=herding, pool=pool, n_samples=25, world=world),
    }
    (out / f"rank{world.rank}.pkl").write_bytes(pickle.dumps(result))


def test_typicality_guard_and_herding_on_two_ranks_equal_one_process(
    tmp_path: Path,
) -> None:
    import pickle

    from datapool.distributed import single
    from tests.ranks import run_ranks

    run_ranks(_on_ranks, 2, tmp_path, tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    _on_ranks(single(), one)
    want = pickle.loads((one / "rank0.pkl").read_bytes())
    for rank in (0, 1):
        got = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        np.testing.assert_allclose(got["exact"], want["exact"], rtol=1e-6)
        np.testing.assert_allclose(got["sampled"], want["sampled"], rtol=1e-6)
        assert got["picks"].indices.tolist() == want["picks"].indices.tolist()
        assert got["herding"].indices.tolist() == want["herding"].indices.tolist()
        assert 0 < len(set(want["herding"].indices.tolist())) == 25


def test_chain_distances_in_blocks_are_each_rows_textbook_distance_to_the_ones_before() -> None:
    from datapool.strategies import _chain_distances

    rng = np.random.default_rng(4)
    rows = torch.from_numpy(rng.standard_normal((600, 8)).astype(np.float32))  # 3 blocks
    rows[300] = rows[20]  # a duplicate across blocks: distance 0
    pool = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    got = _chain_distances(rows, pool)
    d2 = ((rows[:, None] - torch.cat([pool, rows])[None]) ** 2).sum(dim=2)
    d2 = torch.where(torch.arange(650)[None] < 50 + torch.arange(600)[:, None], d2, math.inf)
    np.testing.assert_array_equal(got, np.sqrt(d2.amin(dim=1).double().numpy()))
    assert got[300] == 0.0
    prior = d2[:, :50].amin(dim=1)
    np.testing.assert_array_equal(_chain_distances(rows, None, prior), got)
