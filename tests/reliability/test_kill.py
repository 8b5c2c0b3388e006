"""SIGKILL the merge stage at many instants: the pool is always exactly the old or the new version.

The merge runs as a real subprocess (`python stages/merge.py`) on a pool large
enough that writing it takes a noticeable time; it is killed at evenly spread
moments of its lifetime, then the next stage's first step (`open_pool`)
recovers the folder, which must then equal one of the two versions byte for byte.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from datapool.pool import column_order
from datapool.transaction import open_pool, save_pool

from ..synthetic import candidate_rows, snapshot

ROOT = Path(__file__).resolve().parents[2]
KILLS = 10
N = 3000  # rows per version: writing them takes long enough to be hit


@pytest.mark.slow
def test_killed_merge_leaves_old_or_new_pool(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old_rows, old_sources = candidate_rows(inbox, N, dim=64, seed=0, batch="b1")
    old_rows = old_rows.assign(pick_rank=1, pick_distance=1.0)[column_order(64)]
    (tmp_path / "old.ckpt").write_bytes(b"old model")
    template = tmp_path / "template"
    save_pool(template, old_rows, checkpoint=tmp_path / "old.ckpt", sources=old_sources)
    old = snapshot(template)

    candidates, _ = candidate_rows(inbox, N, dim=64, seed=1, batch="b2")
    candidates.to_csv(tmp_path / "candidates.csv", index=False)
    picks = candidates[["filenames", "content_hash"]].assign(
        pick_rank=np.arange(1, N + 1), pick_distance=0.5
    )
    picks.to_csv(tmp_path / "picks.csv", index=False)
    (tmp_path / "new.ckpt").write_bytes(b"new model, different bytes")
    command = [
        sys.executable,
        str(ROOT / "stages" / "merge.py"),
        "--candidates",
        str(tmp_path / "candidates.csv"),
        "--picks",
        str(tmp_path / "picks.csv"),
        "--checkpoint",
        str(tmp_path / "new.ckpt"),
        "--pool-dir",
        "POOL",
        "--lock-file",
        str(tmp_path / "dvc.lock"),
        "--reembedded-pool",
        str(tmp_path / "no_reembedding.csv"),
        "--append-weak-labels",
        "true",
    ]

    def run(pool: Path, kill_after: float | None) -> None:
        proc = subprocess.Popen(
            [pool.as_posix() if a == "POOL" else a for a in command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if kill_after is None:
            assert proc.wait(timeout=300) == 0, proc.stderr.read() if proc.stderr else ""
            return
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)

    reference = tmp_path / "reference"
    shutil.copytree(template, reference)
    started = time.monotonic()
    run(reference, None)
    lifetime = time.monotonic() - started
    new = snapshot(reference)
    assert new != old

    outcomes = []
    for i in range(KILLS):
        pool = tmp_path / f"killed_{i}"
        shutil.copytree(template, pool)
        run(pool, lifetime * (i + 0.5) / KILLS)
        open_pool(pool, lock_file=tmp_path / "dvc.lock")  # what the next run does first
        after = snapshot(pool)
        assert after in (old, new), f"torn pool after a kill at {i + 0.5}/{KILLS} of the run"
        outcomes.append("new" if after == new else "old")
    # The kills must have landed on both sides of the commit point to prove anything.
    assert "old" in outcomes, outcomes
