"""Load: a 100k-row pool and 100k candidates through `sample` and `merge`, memory bounded.

Each stage runs as its own process; its peak resident memory is read from
``getrusage`` when it exits and printed (run with ``-s`` to see it). The bound
asserted is generous: what matters is that nothing scales with pool x candidates.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from datapool.pool import column_order, read_pool, write_table
from datapool.transaction import save_pool

from ..synthetic import candidate_rows

ROOT = Path(__file__).resolve().parents[2]
N = 100_000
DIM = 64
PEAK_LIMIT_MB = 3000  # a 100k x 100k float32 matrix alone would be 40 000 MB

# Runs a stage script and prints its peak RSS (Linux reports ru_maxrss in KiB) on exit.
WRAPPER = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print('PEAK_RSS_MB', "
    "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, file=sys.stderr))\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def _stage(name: str, *args: str) -> int:
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(ROOT / "stages" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout.strip())
    peak = int(result.stderr.split("PEAK_RSS_MB")[-1].split()[0])
    print(f"{name}: peak RSS {peak} MB")
    return peak


@pytest.mark.slow
def test_100k_pool_and_100k_candidates(tmp_path: Path) -> None:
    old, sources = candidate_rows(tmp_path / "old", N, dim=DIM, seed=0, batch="b1")
    (tmp_path / "model.ckpt").write_bytes(b"model")
    pool = tmp_path / "pool"
    save_pool(
        pool,
        old.assign(pick_rank=1, pick_distance=1.0)[column_order(DIM)],
        checkpoint=tmp_path / "model.ckpt",
        sources=sources,
    )
    new, _ = candidate_rows(tmp_path / "new", N, dim=DIM, seed=1, batch="b2")
    write_table(new, tmp_path / "candidates.csv")
    common = [
        "--pool-dir",
        str(pool),
        "--lock-file",
        str(tmp_path / "dvc.lock"),
        "--reembedded-pool",
        str(tmp_path / "no_reembedding.csv"),
    ]
    peaks = [
        _stage(
            "sample",
            "--candidates",
            str(tmp_path / "candidates.csv"),
            "--out",
            str(tmp_path / "picks.csv"),
            "--n-samples",
            "1000",
            *common,
        ),
        _stage(
            "merge",
            "--candidates",
            str(tmp_path / "candidates.csv"),
            "--picks",
            str(tmp_path / "picks.csv"),
            "--checkpoint",
            str(tmp_path / "model.ckpt"),
            "--append-weak-labels",
            "false",
            *common,
        ),
    ]
    grown = read_pool(pool)
    assert grown is not None and len(grown) == N + 1000
    assert max(peaks) < PEAK_LIMIT_MB, peaks
