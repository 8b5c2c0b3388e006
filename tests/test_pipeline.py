"""The whole pipeline through real DVC in real git repositories.

A module-scoped workspace grows a pool from the bundled digits in two
increments; the tests then probe it. Each `dvc repro` really runs the stages
(three Python processes importing torch), so the workspace is built once.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from dvc.repo import Repo

from datapool.embedding.model import build_model, load_checkpoint, model_id
from datapool.pool import POOL_CSV, read_pool, write_table
from datapool.sharing import fetch_all_versions, push_all_versions
from datapool.store import MANIFEST
from datapool.workspace import (
    create_workspace,
    git_commit,
    run_increment,
    run_tool,
    set_params,
    tool_env,
)

# Real `dvc repro` runs with model training: ~90 s in all, so the whole module is in the
# slow suite (run by .ci/run). The workspace and CLI logic has fast tests on small
# hand-made workspaces (tests/test_version.py, test_workspace.py, test_revisions.py).
pytestmark = pytest.mark.slow

POOL = Path("pools/my_datapool")
# Small and quick, but with the default SimCLR bootstrap of the new pool's model.
FAST = {
    "embed.image_size": 32,
    "embed.num_workers": 0,
    "embed.bootstrap_epochs": 2,
    "stopping_condition.n_samples": 12,
}


def reproduce(workspace: Path, **kwargs: object) -> list[str]:
    """Names of the stages `dvc repro` actually ran."""
    # DVC resolves targets and stage paths from the cwd, as its CLI would.
    with contextlib.chdir(workspace), Repo(".") as repo:
        ran = repo.reproduce(**kwargs)
    return sorted(stage.name for stage in ran)


def rev(workspace: Path, ref: str = "HEAD") -> str:
    return run_tool(["git", "rev-parse", ref], cwd=workspace, quiet=True).strip()


@dataclass(frozen=True)
class Grown:
    """The shared workspace after two increments, and its first pool version."""

    ws: Path
    first_rev: str
    first_csv: bytes

    def copy(self, tmp_path: Path) -> Path:
        """A private copy of the workspace, so a test may change it."""
        clone = tmp_path / "copy"
        shutil.copytree(self.ws, clone, symlinks=True)
        return clone


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Iterator[Grown]:
    """A workspace after two increments: batch_1 then batch_2 of the digits."""
    monkey = pytest.MonkeyPatch()
    monkey.setenv("PATH", tool_env()["PATH"])  # stages run `python` from this venv
    monkey.setenv("DVC_NO_ANALYTICS", "1")
    ws = tmp_path_factory.mktemp("grown") / "ws"
    create_workspace(ws)
    set_params(ws / "params.yaml", {**FAST, "input_dir": str(digits / "batch_1")})
    run_increment(ws, name="my_datapool", input_dir="batch_1")
    first_rev, first_csv = rev(ws), (ws / POOL / POOL_CSV).read_bytes()
    set_params(ws / "params.yaml", {"input_dir": str(digits / "batch_2")})
    run_increment(ws, name="my_datapool", input_dir="batch_2")
    yield Grown(ws=ws, first_rev=first_rev, first_csv=first_csv)
    monkey.undo()


def test_two_increments_hold_rows_of_both_batches(grown: Grown) -> None:
    ws = grown.ws
    pool = read_pool(ws / POOL)
    assert pool is not None and len(pool) == 24
    assert pool["source"].str.endswith("batch_1").sum() == 12
    assert pool["source"].str.endswith("batch_2").sum() == 12
    assert pool["content_hash"].is_unique
    assert set(pool["labels"]) <= {str(d) for d in range(10)}
    model, model_id_ = load_checkpoint(ws / POOL / "checkpoint_latest.ckpt")
    # The new pool's random model was bootstrapped by SimCLR on batch_1 before embedding.
    assert model_id_ != model_id(build_model(model.config, seed=0))
    assert set(pool["model_id"]) == {model_id_}
    # The pool holds its own copy of every pooled image, named by content, one pack a batch.
    packs = sorted((ws / POOL / "images").iterdir())
    assert [p.suffix for p in packs] == [".zip", ".zip"]
    stored = sorted(name for p in packs for name in zipfile.ZipFile(p).namelist())
    assert stored == sorted(f"{h}.png" for h in pool["content_hash"])
    log = run_tool(["git", "log", "--format=%s"], cwd=ws, quiet=True).splitlines()
    assert log[:2] == [
        "pool my_datapool: 24 rows (+12) after adding from batch_2",
        "pool my_datapool: 12 rows (+12) after adding from batch_1",
    ]


def test_second_increment_is_conditioned_on_the_first(grown: Grown) -> None:
    ws = grown.ws
    pool = read_pool(ws / POOL)
    assert pool is not None
    second = pool[pool["source"].str.endswith("batch_2")]
    # Against a non-empty pool no pick is infinitely far: distances were measured to batch_1 rows.
    assert second["pick_distance"].max() < float("inf")
    # The default (herding) may pick near images before far ones; every pick is a new image.
    d = second["pick_distance"].tolist()
    assert all(0 < x < float("inf") for x in d), d
    assert second["content_hash"].is_unique


def test_noop_repro_runs_nothing(grown: Grown) -> None:
    ws = grown.ws
    # Only the listings of the inbox and of the selection inputs, which run every time
    # (DVC hashes neither the inbox nor the optional selection inputs itself).
    assert reproduce(ws) == ["inbox", "select_inputs"]


def test_dvc_metrics_and_plots_show_each_version(grown: Grown) -> None:
    ws = grown.ws

    def dvc_json(*args: str) -> dict[str, Any]:
        return dict(json.loads(run_tool(["dvc", *args, "--json"], cwd=ws, quiet=True)))

    shown = dvc_json("metrics", "show")
    (numbers,) = [f["data"] for rev in shown.values() for f in rev["data"].values()]
    assert numbers["pool"] == {"rows_before": 12, "rows_after": 24, "added": 12}
    assert numbers["selection"]["picked"] == 12
    assert set(numbers["seconds"]) == {"inbox", "select_inputs", "embed", "sample", "merge"}
    # The first version's metrics come from the DVC cache (work/ is not in git).
    diff = dvc_json("metrics", "diff", grown.first_rev)["work/my_datapool/metrics.json"]
    assert diff["pool.rows_after"] == {"old": 12, "new": 24, "diff": 12}
    assert diff["selection.coverage_radius_before"]["old"] is None  # first batch: empty pool
    plots = dvc_json("plots", "show")
    assert not plots.get("errors"), plots["errors"]
    assert len(plots["data"]) == 4  # the four top-level definitions, each file once
    for name, drawn in plots["data"].items():
        assert drawn and drawn[0]["content"]["data"]["values"], name
    report = (ws / "work/my_datapool/report/report.html").read_text(encoding="utf-8")
    assert "grew by 12 images" in report
    assert "embed.bootstrap_epochs" in report and "stopping_condition.n_samples" in report


def test_checkout_restores_first_pool_byte_for_byte(grown: Grown, tmp_path: Path) -> None:
    clone = grown.copy(tmp_path)
    run_tool(["git", "checkout", "-q", grown.first_rev], cwd=clone, quiet=True)
    run_tool(["dvc", "checkout", "--force"], cwd=clone, quiet=True)
    assert (clone / POOL / POOL_CSV).read_bytes() == grown.first_csv


def test_changed_stopping_condition_reruns_sample_and_merge_only(
    grown: Grown, tmp_path: Path
) -> None:
    clone = grown.copy(tmp_path)
    set_params(clone / "params.yaml", {"stopping_condition.n_samples": 5})
    assert reproduce(clone) == ["inbox", "merge", "sample", "select_inputs"]
    pool = read_pool(clone / POOL)
    assert pool is not None
    # The increment was redone, not stacked: batch_1's 12 rows plus batch_2's new 5.
    assert pool["source"].str.endswith("batch_2").sum() == 5
    assert len(pool) == 17


def test_forced_repro_redoes_the_increment_without_stacking(grown: Grown, tmp_path: Path) -> None:
    clone = grown.copy(tmp_path)
    before = pd.read_csv(clone / POOL / POOL_CSV)
    assert reproduce(clone, force=True) == ["embed", "inbox", "merge", "sample", "select_inputs"]
    after = pd.read_csv(clone / POOL / POOL_CSV)
    pd.testing.assert_frame_equal(before, after)


def test_fresh_clone_without_pull_refuses(grown: Grown, tmp_path: Path) -> None:
    ws = grown.ws
    clone = tmp_path / "clone"
    run_tool(["git", "clone", "-q", str(ws), str(clone)], cwd=tmp_path, quiet=True)
    assert not (clone / POOL).exists()
    result = subprocess.run(
        ["dvc", "repro"], cwd=clone, env=tool_env(), capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "missing from the workspace" in output and "dvc pull" in output
    assert not (clone / POOL / POOL_CSV).exists()


def test_training_replaces_the_model_and_reembeds_the_whole_pool(
    grown: Grown, tmp_path: Path
) -> None:
    clone = grown.copy(tmp_path)
    before = read_pool(clone / POOL)
    assert before is not None
    set_params(clone / "params.yaml", {"embed.train_epochs": 1})
    assert reproduce(clone) == ["embed", "inbox", "merge", "sample", "select_inputs"]
    after = read_pool(clone / POOL)
    assert after is not None and len(after) == 24
    _, checkpoint_id = load_checkpoint(clone / POOL / "checkpoint_latest.ckpt")
    # One model for every row: batch_1's rows were re-embedded, not left from the old model.
    assert set(after["model_id"]) == {checkpoint_id} != set(before["model_id"])
    old_rows = after["source"].str.endswith("batch_1")
    assert set(after.loc[old_rows, "content_hash"]) == set(
        before.loc[before["source"].str.endswith("batch_1"), "content_hash"]
    )


def test_every_version_travels_through_a_remote(grown: Grown, tmp_path: Path) -> None:
    origin = grown.copy(tmp_path)
    run_tool(
        ["dvc", "remote", "add", "-d", "store", str(tmp_path / "store")], cwd=origin, quiet=True
    )
    git_commit(origin, "remote", paths=[".dvc/config"])
    sent, failed = push_all_versions(origin)
    assert sent > 0 and failed == 0
    clone = tmp_path / "clone"
    run_tool(["git", "clone", "-q", str(origin), str(clone)], cwd=tmp_path, quiet=True)
    received, failed = fetch_all_versions(clone)
    assert received == sent and failed == 0
    run_tool(["git", "checkout", "-q", grown.first_rev], cwd=clone, quiet=True)
    run_tool(["dvc", "checkout"], cwd=clone, quiet=True)
    assert (clone / POOL / POOL_CSV).read_bytes() == grown.first_csv


def _pool_files(workspace: Path, rev: str) -> dict[str, tuple[str, int]]:
    """``{path in the pool: (md5, size in bytes)}`` of the pool version commit ``rev``
    records, read through DVC's public filesystem API (a folder's listing has no sizes,
    so each file is read)."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(str(workspace), rev=rev)
    found = fs.find(POOL.as_posix(), detail=True)
    return {
        path.removeprefix(f"{POOL.as_posix()}/"): (str(info["md5"]), len(fs.read_bytes(path)))
        for path, info in found.items()
    }


def test_a_version_stores_only_the_shard_it_added(grown: Grown) -> None:
    first = _pool_files(grown.ws, grown.first_rev)
    second = _pool_files(grown.ws, "HEAD")
    shards = lambda files: {p: v for p, v in files.items() if p.startswith("shards/")}  # noqa: E731
    # batch_1's shard is byte-identical in both versions, so DVC holds it once.
    assert shards(first).items() <= shards(second).items()
    assert len(shards(second)) == len(shards(first)) + 1


def test_cache_grows_with_the_rows_each_version_adds(
    grown: Grown, tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    clone = grown.copy(tmp_path)
    third = make_images("batch_3", {f"shapes/{i}.png": 100 + i for i in range(30)})
    set_params(clone / "params.yaml", {"input_dir": str(third)})
    run_increment(clone, name="my_datapool", input_dir="batch_3")
    revs = [grown.first_rev, rev(clone, "HEAD~1"), rev(clone)]
    seen: set[str] = set()
    per_row = []
    for version in revs:  # each added 12 rows (FAST's n_samples)
        files = _pool_files(clone, version)
        new = {md5: size for md5, size in files.values() if md5 not in seen}
        seen |= set(new)
        added = {p: size for p, (md5, size) in files.items() if md5 in new}
        shards = [p for p in added if p.startswith("shards/")]
        assert len(shards) == 1, (version, shards)  # one new shard, the others reused
        assert sum(p.startswith("images/") for p in added) == 1  # one new pack: its images
        # Beside those, the small manifest and the derived CSV (a whole-table copy
        # while the pool is under csv_max_rows), nothing: the model is stored once.
        assert set(added) - {*shards, *(p for p in added if p.startswith("images/"))} <= {
            MANIFEST,
            POOL_CSV,
            "checkpoint_latest.ckpt" if version == revs[0] else MANIFEST,
        }
        per_row.append(added[shards[0]] / 12)
    assert max(per_row) / min(per_row) < 1.1, per_row  # the same bytes per row added


def test_a_pool_of_the_csv_layout_is_migrated_by_its_next_run_and_stays_restorable(
    grown: Grown,
    tmp_path: Path,
    make_images: Callable[..., Path],
    capfd: pytest.CaptureFixture[str],
) -> None:
    clone = grown.copy(tmp_path)
    table = read_pool(clone / POOL)
    assert table is not None
    # The pool as datapool wrote it before the shards: the CSV alone, recorded by a commit.
    shutil.rmtree(clone / POOL / "shards")
    (clone / POOL / MANIFEST).unlink()
    write_table(table, clone / POOL / POOL_CSV)
    run_tool(["dvc", "commit", "-f", "merge"], cwd=clone, quiet=True)
    git_commit(clone, "a pool of the older layout", paths=["dvc.lock"])
    old_rev, old_csv = rev(clone), (clone / POOL / POOL_CSV).read_bytes()
    third = make_images("batch_3", {f"shapes/{i}.png": 100 + i for i in range(30)})
    set_params(clone / "params.yaml", {"input_dir": str(third)})
    capfd.readouterr()
    run_increment(clone, name="my_datapool", input_dir="batch_3")
    assert "migrated from datapool_latest.csv alone to Arrow shards" in capfd.readouterr().out
    grown_pool = read_pool(clone / POOL)
    assert grown_pool is not None and len(grown_pool) == 36
    pd.testing.assert_frame_equal(grown_pool.iloc[:24].reset_index(drop=True), table)
    # The older version comes back as it was, and is still read.
    run_tool(["git", "checkout", "-q", old_rev], cwd=clone, quiet=True)
    run_tool(["dvc", "checkout", "--force"], cwd=clone, quiet=True)
    assert not (clone / POOL / MANIFEST).exists()
    assert (clone / POOL / POOL_CSV).read_bytes() == old_csv
    back = read_pool(clone / POOL)
    assert back is not None and len(back) == 24
