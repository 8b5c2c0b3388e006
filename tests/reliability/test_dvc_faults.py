"""Faults around DVC itself: a killed `dvc repro`, two runs started at once, a failed switch."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from datapool.errors import InputError
from datapool.layout import pool_dir
from datapool.packs import PoolImages
from datapool.pool import read_pool
from datapool.revisions import current_record, record_at
from datapool.workspace import create_workspace, run_increment, set_params, tool_env

POOL = pool_dir(Path(), "my_datapool")
FAST = {
    "embed.image_size": 32,
    "embed.num_workers": 0,
    "embed.bootstrap_epochs": 0,
    "stopping_condition.n_samples": 12,
}


@pytest.fixture
def workspace(tmp_path: Path, digits: Path) -> Path:
    ws = tmp_path / "ws"
    create_workspace(ws)
    set_params(ws / "params.yaml", {**FAST, "input_dir": str(digits / "batch_1")})
    return ws


def _repro(ws: Path) -> subprocess.Popen[str]:
    # A session of its own, so the kill reaches DVC's stage processes too.
    return subprocess.Popen(
        ["dvc", "repro"],
        cwd=ws,
        env=tool_env(),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _check_pool(ws: Path) -> None:
    pool = read_pool(ws / POOL)
    assert pool is not None and len(pool) == 12
    assert pool["content_hash"].is_unique
    packs = list((ws / POOL / "images").iterdir())
    assert packs and all(p.suffix == ".zip" for p in packs)
    with PoolImages(ws / POOL) as images:
        assert all(images.read(row) for _, row in pool.iterrows())  # each checked by hash


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [4.0, 9.0, 14.0])
def test_killed_repro_then_new_repro_completes(workspace: Path, kill_after: float) -> None:
    proc = _repro(workspace)
    time.sleep(kill_after)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    again = _repro(workspace)
    output, _ = again.communicate(timeout=300)
    assert again.returncode == 0, output
    _check_pool(workspace)
    quiet = _repro(workspace)
    output, _ = quiet.communicate(timeout=120)
    # only the inbox listing runs (always_changed); nothing downstream is redone
    assert quiet.returncode == 0, output
    for stage in ("embed", "sample", "merge"):
        assert f"Stage '{stage}' didn't change, skipping" in output, output


@pytest.mark.slow
def test_two_runs_at_once_one_fails_cleanly(workspace: Path) -> None:
    first, second = _repro(workspace), _repro(workspace)
    out_first, _ = first.communicate(timeout=300)
    out_second, _ = second.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    assert codes[0] == 0, out_first + out_second
    if codes[1] != 0:  # DVC's repository lock turned the loser away with a message
        loser = out_second if second.returncode else out_first
        assert "lock" in loser.lower(), loser
    _check_pool(workspace)


@pytest.mark.slow
def test_a_failed_switch_does_not_cost_the_next_commit_a_pool(
    workspace: Path, digits: Path, tmp_path: Path
) -> None:
    # Pool my_datapool is grown, then parked when the pipeline switches to "other".
    first = str(digits / "batch_1")
    run_increment(workspace, name="my_datapool", input_dir=first)
    set_params(workspace / "params.yaml", {"datapool.name": "other", "input_dir": first})
    run_increment(workspace, name="other", input_dir=first)
    parked = record_at(workspace, "HEAD", "my_datapool")
    assert parked is not None and parked.parked
    # Switching back fails for real: the run's input folder does not exist.
    missing = str(tmp_path / "no_such_inbox")
    set_params(workspace / "params.yaml", {"datapool.name": "my_datapool", "input_dir": missing})
    with pytest.raises(InputError, match="dvc"):
        run_increment(workspace, name="my_datapool", input_dir=missing)
    # The next run stays on "other"; its commit must still record my_datapool.
    set_params(workspace / "params.yaml", {"datapool.name": "other", "input_dir": first})
    run_increment(workspace, name="other", input_dir=first)
    assert record_at(workspace, "HEAD", "my_datapool") == parked
    assert current_record(workspace, "my_datapool") == parked
