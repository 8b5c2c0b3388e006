"""Sharded greedy k-center (datapool.selection_sharded) against the single-process engine.

Two real gloo ranks run every case once per module (forked, see tests.ranks);
each rank's picks must equal ``k_center_greedy``'s exactly: same indices in
the same order, same distances, same ``next_distance``. Cases cover both
splits of the pool pass, no pool, ``min_distance``, duplicates and exact
ties, more picks than a rank's slice, uneven slices, a rank with no rows,
slices far larger than a top set (many phases), a pruned pool pass, and the
bfloat16 pool pass (compared with one process's float32 pass).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datapool import selection_sharded
from datapool.distributed import World, single
from datapool.errors import InputError
from datapool.selection import Selection, k_center_greedy
from datapool.selection_sharded import choose_split, k_center_greedy_sharded
from tests.ranks import run_ranks


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _clustered(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    centres = rng.normal(size=(12, d)) * 3
    return (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, d)) * 0.1).astype(np.float32)


def _grid(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Small integers: many exactly tied distances and duplicate rows."""
    return rng.integers(0, 3, size=(n, d)).astype(np.float32)


def case(
    name: str, table: dict[str, tuple[str, int, int, int, dict[str, Any], str]] | None = None
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Candidates, pool and keyword arguments of case ``name`` of ``table`` (default
    :data:`CASES`), the same on every rank."""
    kind, seed, n, m, rule, split = (table or CASES)[name]
    rng = np.random.default_rng(seed)
    make = {"unit": _unit, "clustered": _clustered, "grid": _grid}[kind]
    d = 6 if kind == "grid" else 16
    x = make(rng, n, d)
    if kind == "grid":  # duplicates across the slice boundary too
        x[n // 2 :: 7] = x[: len(x[n // 2 :: 7])]
    pool = make(rng, m, d) if m else None
    return x, pool, {**rule, "split": split}


_BF16 = {"pool_precision": "bfloat16"}

# name: (kind, seed, candidates, pool rows, stopping rule, split)
CASES: dict[str, tuple[str, int, int, int, dict[str, Any], str]] = {
    **{
        f"unit-{s}-{split}": ("unit", s, 601, 900, {"n_samples": 150}, split)
        for s in range(3)
        for split in ("candidates", "pool")
    },
    **{f"nopool-{s}": ("unit", s, 777, 0, {"n_samples": 120}, "auto") for s in range(3)},
    "auto-pool-split": ("clustered", 3, 400, 2000, {"n_samples": 400}, "auto"),
    "min-distance": ("clustered", 4, 501, 300, {"min_distance": 0.5}, "candidates"),
    "min-distance-pool-split": ("clustered", 4, 501, 300, {"min_distance": 0.5}, "pool"),
    "both-rules": ("unit", 5, 300, 100, {"n_samples": 50, "min_distance": 1.2}, "auto"),
    "ties-duplicates": ("grid", 6, 333, 40, {"n_samples": 333}, "candidates"),
    "ties-no-pool": ("grid", 7, 250, 0, {"n_samples": 250}, "auto"),
    "ties-pool-split": ("grid", 8, 120, 200, {"n_samples": 120}, "pool"),
    "more-than-a-slice": ("unit", 9, 41, 10, {"n_samples": 35}, "candidates"),
    # slices far larger than a top set: many phases, the global bound decides
    "many-phases": ("unit", 16, 5001, 0, {"n_samples": 400}, "auto"),
    # few picks against a pool: the pool pass stops rows early and completes them later
    "pruned-pool-pass": ("clustered", 17, 6001, 2500, {"n_samples": 60}, "candidates"),
    # the bfloat16 pool pass on every rank (auto picks it only on CPUs with native bf16)
    **{
        f"bf16-{split}": ("clustered", 18, 900, 1500, {"n_samples": 300, **_BF16}, split)
        for split in ("candidates", "pool")
    },
    "bf16-pruned": ("unit", 19, 3000, 1200, {"n_samples": 350, **_BF16}, "candidates"),
    "one-row": ("unit", 10, 1, 5, {"n_samples": 3}, "auto"),  # rank 1 holds no candidate
    "one-row-no-pool": ("unit", 11, 1, 0, {"n_samples": 3}, "auto"),
    "pool-of-one": ("unit", 12, 30, 1, {"n_samples": 40}, "pool"),  # rank 1: no pool row
    "no-candidates": ("unit", 13, 0, 5, {"n_samples": 3}, "auto"),
    "zero-picks": ("unit", 14, 50, 20, {"n_samples": 0}, "auto"),
    "zero-picks-no-pool": ("unit", 15, 50, 0, {"n_samples": 0}, "auto"),
}


def _save(path: Path, sel: Selection) -> None:
    np.savez(path, indices=sel.indices, dists=sel.min_distances, nxt=np.array(sel.next_distance))


def _all_cases(world: World, out: Path) -> None:
    for name in CASES:
        x, pool, kw = case(name)
        _save(
            out / f"{name}.{world.rank}.npz",
            k_center_greedy_sharded(x, pool=pool, world=world, **kw),
        )
    x, pool, _ = case("unit-0-candidates")
    x[500, 3] = np.nan  # row 500 lies in rank 1's slice: rank 0 must raise too
    try:
        k_center_greedy_sharded(x, pool=pool, world=world, n_samples=5)
    except InputError as e:
        (out / f"nan.{world.rank}.txt").write_text(str(e))
    x, pool, kw = case("unit-0-candidates")
    if world.rank == 0:  # an internal error on the deciding rank reaches the other
        selection_sharded._pick_phase = _failing  # type: ignore[attr-defined,assignment]
    try:
        k_center_greedy_sharded(x, pool=pool, world=world, **kw)
    except RuntimeError as e:
        (out / f"failed.{world.rank}.txt").write_text(str(e))


def _failing(*args: Any) -> None:
    raise RuntimeError("internal error in k_center_greedy: simulated")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    run_ranks(_all_cases, 2, out, out)
    return out


def _expected(name: str) -> Selection:
    x, pool, kw = case(name)
    kw.pop("split")
    kw["pool_precision"] = "float32"  # the picks do not depend on the pool pass's products
    return k_center_greedy(x, pool=pool, **kw)


def _assert_same(got: Any, want: Selection) -> None:
    np.testing.assert_array_equal(got["indices"], want.indices)
    np.testing.assert_array_equal(got["dists"], want.min_distances)
    assert float(got["nxt"]) == want.next_distance


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_pick_exactly_what_one_process_picks(two_ranks: Path, name: str) -> None:
    want = _expected(name)
    for rank in (0, 1):
        _assert_same(np.load(two_ranks / f"{name}.{rank}.npz"), want)


def test_bad_row_in_one_rank_slice_raises_on_every_rank(two_ranks: Path) -> None:
    for rank in (0, 1):
        message = (two_ranks / f"nan.{rank}.txt").read_text()
        assert "candidates row 500 contains NaN" in message


def test_an_internal_error_on_rank_0_raises_on_every_rank(two_ranks: Path) -> None:
    assert "simulated" in (two_ranks / "failed.0.txt").read_text()
    assert "rank 0 failed" in (two_ranks / "failed.1.txt").read_text()


@pytest.mark.parametrize("name", ["unit-1-pool", "ties-duplicates", "nopool-2", "min-distance"])
def test_one_process_world_runs_the_same_algorithm(name: str) -> None:
    x, pool, kw = case(name)
    got = k_center_greedy_sharded(torch.from_numpy(x), pool=pool, world=single(), **kw)
    want = _expected(name)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.min_distances, want.min_distances)
    assert got.next_distance == want.next_distance


def test_split_follows_the_shape() -> None:
    assert choose_split(10_000, 1_000_000, 10_000) == "pool"  # issue 10: one increment
    assert choose_split(10_000, 1_000_000, 100) == "candidates"  # few picks: keep pruning
    assert choose_split(1_000_000, 10_000, 10_000) == "candidates"
    assert choose_split(100, 0, 100) == "candidates"


def test_bad_arguments_are_refused() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(InputError, match="split must be"):
        k_center_greedy_sharded(x, world=single(), n_samples=1, split="rows")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="needs n_samples or min_distance"):
        k_center_greedy_sharded(x, world=single())
    with pytest.raises(InputError, match="pool has dimension 2"):
        k_center_greedy_sharded(x, pool=np.zeros((2, 2), np.float32), world=single(), n_samples=1)


def _larger(world: World, out: Path) -> None:
    for name in LARGER:
        x, pool, kw = case(name, LARGER)
        sel = k_center_greedy_sharded(x, pool=pool, world=world, **kw)
        _save(out / f"{name}.{world.rank}.npz", sel)


LARGER: dict[str, tuple[str, int, int, int, dict[str, Any], str]] = {
    "big-candidates": ("clustered", 20, 40_001, 3000, {"n_samples": 500}, "candidates"),
    "big-pool": ("unit", 21, 3001, 30_000, {"n_samples": 3001}, "pool"),
    "big-no-pool": ("unit", 22, 50_000, 0, {"n_samples": 800, "min_distance": 1.0}, "auto"),
}


@pytest.mark.slow
def test_three_ranks_on_larger_slices_pick_what_one_process_picks(tmp_path: Path) -> None:
    run_ranks(_larger, 3, tmp_path, tmp_path)
    for name in LARGER:
        x, pool, kw = case(name, LARGER)
        kw.pop("split")
        want = k_center_greedy(x, pool=pool, **kw)
        for rank in range(3):
            _assert_same(np.load(tmp_path / f"{name}.{rank}.npz"), want)


TORCHRUN_SCRIPT = """
import sys
import numpy as np
from datapool.distributed import init_from_env, shutdown
from datapool.selection_sharded import k_center_greedy_sharded
from tests.test_selection_sharded import case

world = init_from_env(device="cpu")
x, pool, kw = case("unit-2-pool")
sel = k_center_greedy_sharded(x, pool=pool, world=world, **kw)
if world.is_main:  # the pipeline's rule: rank 0 writes outputs
    np.savez(sys.argv[1], indices=sel.indices, dists=sel.min_distances,
             nxt=np.array(sel.next_distance), size=np.array(world.size))
shutdown(world)
"""


@pytest.mark.slow
def test_under_torchrun_init_from_env_joins_and_rank_0_writes_the_picks(tmp_path: Path) -> None:
    script = tmp_path / "sharded_picks.py"  # not select.py: it would shadow the stdlib module
    script.write_text(TORCHRUN_SCRIPT)
    out = tmp_path / "picks.npz"
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # --standalone: a local rendezvous on a free port, so parallel tests never collide
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), str(out)]
    subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True)
    got = np.load(out)
    assert int(got["size"]) == 2
    _assert_same(got, _expected("unit-2-pool"))


def _prior_cases(world: World, out: Path) -> None:
    """A big pool given once as ``prior`` (its pool_minima), a small one as ``pool``."""
    from datapool.selection import pool_minima

    rng = np.random.default_rng(21)
    x, big, small = _unit(rng, 700, 12), _unit(rng, 3000, 12), _unit(rng, 40, 12)
    prior = pool_minima(x, big)
    for split in ("candidates", "pool"):
        for pool in (small, None):
            sel = k_center_greedy_sharded(
                x, world=world, pool=pool, prior=prior, n_samples=200, split=split
            )
            _save(out / f"prior-{split}-{pool is None}.{world.rank}.npz", sel)


def test_two_ranks_with_a_prior_pick_what_one_process_picks_with_the_whole_pool(
    tmp_path: Path,
) -> None:
    run_ranks(_prior_cases, 2, tmp_path, tmp_path)
    rng = np.random.default_rng(21)
    x, big, small = _unit(rng, 700, 12), _unit(rng, 3000, 12), _unit(rng, 40, 12)
    for pool in (small, None):
        union = big if pool is None else np.concatenate([big, pool])
        want = k_center_greedy(x, pool=union, n_samples=200, pool_precision="float32")
        for split in ("candidates", "pool"):
            for rank in (0, 1):
                got = np.load(tmp_path / f"prior-{split}-{pool is None}.{rank}.npz")
                _assert_same(got, want)
