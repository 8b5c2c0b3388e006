"""The `datapool` command end to end: real git, real DVC, the real CLI in a subprocess.

One module-scoped story drives init -> run (batch 1) -> run (batch 2) -> run of a
second pool -> history -> restore -> combine -> export -> import; the tests check
what each step printed and every pool version by content. Tests that change
the workspace work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from datapool.images import content_hash
from datapool.layout import PoolPaths, pool_dir
from datapool.packs import Member, PoolImages
from datapool.pool import POOL_CSV, embeddings_of, read_pool, read_table
from datapool.revisions import cache_dir, current_record, missing_objects, record_at
from datapool.tools import head, run_tool, tool_env

pytestmark = pytest.mark.slow  # four `dvc repro` runs: about two minutes

# No SimCLR bootstrap here: tests/test_pipeline.py covers it; these tests are about revisions.
FAST = [
    "embed.image_size=32",
    "embed.num_workers=0",
    "embed.bootstrap_epochs=0",
    "stopping_condition.n_samples=12",
]


def cli(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `python -m datapool ARGS` in ``cwd``; assert its exit status."""
    result = subprocess.run(
        [sys.executable, "-m", "datapool", *args],
        cwd=cwd,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode == 0) == ok, result.stdout + result.stderr
    return result


def pool_rows(ws: Path, name: str) -> int:
    table = read_pool(pool_dir(ws, name))
    assert table is not None, f"no pool {name} in {ws}"
    return len(table)


def pool_bytes(ws: Path, name: str) -> bytes:
    return (pool_dir(ws, name) / POOL_CSV).read_bytes()


def version(ws: Path, rev: str, name: str) -> pd.DataFrame:
    """The pool ``name`` as revision ``rev`` recorded it, read through DVC's API (its
    table files fetched into a temporary folder, then read by the pool's own reader)."""
    from dvc.api import DVCFileSystem

    assert record_at(ws, rev, name) is not None, f"{rev} records no {name}"
    fs = DVCFileSystem(str(ws), rev=rev)
    folder = PoolPaths(name).folder
    with tempfile.TemporaryDirectory() as tmp:
        for entry in ("manifest.json", "shards", POOL_CSV):
            if fs.exists(f"{folder}/{entry}"):
                target = Path(tmp) / entry
                fs.get(f"{folder}/{entry}", str(target), recursive=fs.isdir(f"{folder}/{entry}"))
        table = read_pool(Path(tmp))
    assert table is not None
    return table


def cached(ws: Path, digest: str) -> bool:
    """True when every object of version ``digest`` is in the workspace's DVC cache."""
    return missing_objects(cache_dir(ws), digest) == []


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory, digits: Path) -> Iterator[dict[str, Any]]:
    monkey = pytest.MonkeyPatch()
    monkey.setenv("PATH", tool_env()["PATH"])
    monkey.setenv("DVC_NO_ANALYTICS", "1")
    root = tmp_path_factory.mktemp("story")
    ws = root / "ws"
    s: dict[str, Any] = {"ws": ws, "root": root}
    s["init"] = cli(root, "init", str(ws))
    s["init_rev"] = head(ws)
    leave_user_changes(ws)
    b1, b2 = str(digits / "batch_1"), str(digits / "batch_2")
    s["run1"] = cli(ws, "run", "--input-dir", b1, "datapool.name=A", *FAST)
    s["v1"], s["v1_csv"] = head(ws), pool_bytes(ws, "A")
    s["run2"] = cli(ws, "run", "--input-dir", b2)
    s["v2"], s["v2_csv"] = head(ws), pool_bytes(ws, "A")
    s["run_b"] = cli(ws, "run", "--input-dir", b2, "datapool.name=B", "embed.seed=1")
    s["vb"], s["vb_csv"] = head(ws), pool_bytes(ws, "B")
    s["history"] = cli(ws, "history", "A")
    s["restore"] = cli(ws, "restore", "A", s["v1"][:7])
    s["restored"] = head(ws)
    s["combine_refused"] = cli(ws, "combine", "A", "B", "--into", "C", ok=False)
    s["combine"] = cli(ws, "combine", "A", "B", "--into", "C", "--reembed", "--device", "cpu")
    s["vc"] = head(ws)
    s["export"] = cli(ws, "export", "C", "--out", str(root / "exported"))
    s["import"] = cli(ws, "import", str(root / "exported" / "embeddings.csv"), "--name", "C2")
    s["history_after"] = cli(ws, "history", "A")
    s["status_after"] = run_tool(["git", "status", "--porcelain"], cwd=ws, quiet=True)
    yield s
    monkey.undo()


def leave_user_changes(ws: Path) -> None:
    """What a person may leave in a workspace between commands, none of it datapool's:
    an untracked note, an edited tracked file, a new file staged for their own commit."""
    (ws / "notes.txt").write_text("ideas for the next batch\n")
    with (ws / ".dvcignore").open("a") as ignore:
        ignore.write("# my own comment\n")
    (ws / "todo.txt").write_text("label the new images\n")
    run_tool(["git", "add", "todo.txt"], cwd=ws, quiet=True)


def changed_by(ws: Path, rev: str) -> list[str]:
    """``STATUS<tab>PATH`` for each file commit ``rev`` changed."""
    show = ["git", "show", "--format=", "--name-status", "--no-renames", rev]
    text = run_tool(show, cwd=ws, quiet=True)
    return [line for line in text.splitlines() if line]


def test_commands_commit_only_the_pools_records(story: dict[str, Any]) -> None:
    # run, restore, combine and import each commit dvc.lock, params.yaml, pools/.gitignore
    # and pools/*.dvc; the user's own changes stay as they were, uncommitted.
    ws = story["ws"]
    status = sorted(story["status_after"].splitlines())
    assert status == [" M .dvcignore", "?? notes.txt", "A  todo.txt"]
    revs = run_tool(
        ["git", "rev-list", "--reverse", f"{story['init_rev']}..HEAD"], cwd=ws, quiet=True
    ).split()
    assert len(revs) == 6  # three runs, restore, combine, import
    for rev in revs:
        for change in changed_by(ws, rev):
            path = change.split("\t")[-1]
            assert path in ("dvc.lock", "params.yaml", "pools/.gitignore") or (
                path.startswith("pools/") and path.endswith(".dvc")
            ), f"{rev[:7]} committed {change}"
    # B's run parked A; restoring A's pipeline version took it back from the parked record.
    assert "A\tpools/A.dvc" in changed_by(ws, story["vb"])
    restored = changed_by(ws, story["restored"])
    assert "D\tpools/A.dvc" in restored and "A\tpools/B.dvc" in restored


def test_init_makes_a_committed_git_and_dvc_workspace(story: dict[str, Any]) -> None:
    ws = story["ws"]
    assert (ws / ".dvc").is_dir() and (ws / "dvc.yaml").is_file() and (ws / "params.yaml").is_file()
    first = run_tool(["git", "log", "--reverse", "--format=%s"], cwd=ws, quiet=True).splitlines()
    assert first[0] == "datapool workspace"


def test_each_run_is_a_revision_holding_its_pool(story: dict[str, Any]) -> None:
    ws = story["ws"]
    subjects = run_tool(["git", "log", "--format=%s"], cwd=ws, quiet=True).splitlines()
    assert "pool A: 12 rows (+12) after adding from" in subjects[-2]
    assert "pool A: 24 rows (+12) after adding from" in subjects[-3]
    assert subjects[-4].startswith("pool B: 12 rows (+12)")
    v1, v2, vb = (version(ws, story[k], n) for k, n in (("v1", "A"), ("v2", "A"), ("vb", "B")))
    assert (len(v1), len(v2), len(vb)) == (12, 24, 12)
    # Every version in the cache is byte for byte the pool the run left behind.
    for key, name in (("v1", "A"), ("v2", "A"), ("vb", "B")):
        record = record_at(ws, story[key], name)
        assert record is not None
        assert cached(ws, record.digest)
    pd.testing.assert_frame_equal(v2.iloc[:12], v1)  # batch 2 appended, batch 1 kept
    assert v2["source"].str.endswith("batch_2").sum() == 12
    assert set(vb["model_id"]).isdisjoint(set(v1["model_id"]))  # seed=1: another model
    # Overrides went to params.yaml, so `dvc params diff` shows them.
    diff = run_tool(["dvc", "params", "diff", story["v1"], story["vb"]], cwd=ws, quiet=True)
    assert "embed.seed" in diff and "datapool.name" in diff


def test_switching_pools_parks_the_other_one(story: dict[str, Any]) -> None:
    ws, vb = story["ws"], story["vb"]
    parked = record_at(ws, vb, "A")
    live = record_at(ws, story["v2"], "A")
    assert parked is not None and live is not None
    assert parked.parked and not live.parked and parked.digest == live.digest
    tracked = run_tool(["git", "ls-files", "pools"], cwd=ws, quiet=True).split()
    assert not any(p.endswith(".csv") or p.endswith(".png") for p in tracked)


def test_pools_hold_their_images_by_content(story: dict[str, Any]) -> None:
    ws = story["ws"]
    for name in ("A", "B", "C", "C2"):
        table = read_pool(pool_dir(ws, name))
        assert table is not None
        with PoolImages(pool_dir(ws, name)) as images:
            for _, row in table.iterrows():
                assert isinstance(images.locate(row), Member)  # the pool's own packed copy
                data = images.read(row)
                assert hashlib.sha256(data).hexdigest() == row["content_hash"]


def test_history_lists_revisions_rows_and_changed_params(story: dict[str, Any]) -> None:
    lines = story["history"].stdout.splitlines()
    assert lines[0].split()[:5] == ["revision", "date", "rows", "added", "removed"]
    first, second = lines[1].split(), lines[2].split()
    assert first[0] == story["v1"][:7] and first[2:5] == ["12", "+12", "-0"]
    assert second[0] == story["v2"][:7] and second[2:5] == ["24", "+12", "-0"]
    assert "datapool.name: my_datapool -> A" in lines[1]
    assert "input_dir:" in lines[2] and "batch_2" in lines[2]
    assert len(lines) == 3  # B's run parked A unchanged: not a revision of A


def test_restore_brings_back_a_version_as_a_new_revision(story: dict[str, Any]) -> None:
    ws = story["ws"]
    assert "12 rows" in story["restore"].stdout
    assert story["restored"] != story["v1"]
    restored = record_at(ws, story["restored"], "A")
    original = record_at(ws, story["v1"], "A")
    assert restored is not None and original is not None
    assert restored.digest == original.digest
    # Nothing is lost: the later version is still a revision with its data in the cache.
    pd.testing.assert_frame_equal(version(ws, story["v2"], "A"), read_table_bytes(story["v2_csv"]))
    lines = story["history_after"].stdout.splitlines()
    assert [ln.split()[0] for ln in lines[1:]] == [
        story["v1"][:7],
        story["v2"][:7],
        story["restored"][:7],
    ]
    assert lines[3].split()[2:5] == ["12", "+0", "-12"]


def read_table_bytes(data: bytes) -> pd.DataFrame:
    """Parse pool CSV bytes with the pool's own reader."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / POOL_CSV
        target.write_bytes(data)
        return read_table(target)


def test_combine_refuses_to_mix_models_then_reembeds(story: dict[str, Any]) -> None:
    ws = story["ws"]
    assert "never mixed" in story["combine_refused"].stderr
    assert "--reembed" in story["combine_refused"].stderr
    a, b, c = (read_pool(pool_dir(ws, n)) for n in ("A", "B", "C"))
    assert a is not None and b is not None and c is not None
    assert len(a) == 12  # the restored version
    assert "24 rows combined from A and B" in story["combine"].stdout
    assert list(c["content_hash"]) == [*a["content_hash"], *b["content_hash"]]
    assert set(c["model_id"]) == set(a["model_id"])
    pd.testing.assert_frame_equal(c.iloc[:12], a)
    norms = np.linalg.norm(embeddings_of(c), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    # B's images embedded by A's model: where batch 2's rows of A's version 2 hold the same
    # image, the re-embedding equals the embedding A's model made in the pipeline.
    v2 = version(ws, story["v2"], "A").set_index("content_hash")
    mine = c.iloc[12:].set_index("content_hash")
    shared = sorted(set(v2.index) & set(mine.index))
    if shared:
        np.testing.assert_allclose(
            embeddings_of(mine.loc[shared].reset_index()),
            embeddings_of(v2.loc[shared].reset_index()),
            atol=1e-4,
        )
    record = record_at(ws, story["vc"], "C")
    assert record is not None and record.parked


def test_export_and_import_round_trip_through_lightly_csv(story: dict[str, Any]) -> None:
    ws, exported = story["ws"], story["root"] / "exported"
    c, c2 = read_pool(pool_dir(ws, "C")), read_pool(pool_dir(ws, "C2"))
    assert c is not None and c2 is not None
    csv = pd.read_csv(exported / "embeddings.csv")
    assert list(csv.columns) == ["filenames", *[f"embedding_{i}" for i in range(64)], "labels"]
    names = (exported / "filenames.txt").read_text().splitlines()
    assert names == list(csv["filenames"]) and len(names) == len(c)
    for name, digest in zip(names, c["content_hash"], strict=True):
        assert content_hash(exported / "images" / name) == digest
    assert list(c2["content_hash"]) == list(c["content_hash"])
    np.testing.assert_allclose(embeddings_of(c2), embeddings_of(c), atol=1e-6)
    assert "24 rows imported" in story["import"].stdout


def copy_of(story: dict[str, Any], tmp_path: Path) -> Path:
    clone = tmp_path / "ws"
    shutil.copytree(story["ws"], clone, symlinks=True)
    return clone


def test_keep_history_false_commits_nothing_and_drops_old_versions(
    story: dict[str, Any], tmp_path: Path, digits: Path, make_images: Callable[..., Path]
) -> None:
    ws = copy_of(story, tmp_path)
    before = head(ws)
    # Two runs without history: the first one's version is in no commit, and the
    # second must still drop it (it used to stay in the cache for good).
    drawn = make_images("drawn", {f"{seed}.png": seed for seed in range(3)})
    cli(ws, "run", "--input-dir", str(drawn), "datapool.keep_history=False")
    first, first_rows = current_record(ws, "A"), pool_rows(ws, "A")
    out = cli(ws, "run", "--input-dir", str(digits / "batch_2"), "datapool.keep_history=False")
    assert "keep_history=false: not committed; " in out.stdout
    assert "cache objects of earlier versions dropped" in out.stdout
    assert head(ws) == before  # no revision recorded
    assert "dvc.lock" in run_tool(["git", "status", "--porcelain"], cwd=ws, quiet=True)
    assert first_rows > 12 and pool_rows(ws, "A") == first_rows + 12
    now = current_record(ws, "A")
    assert first is not None and now is not None and first != now
    assert missing_objects(cache_dir(ws), first.digest) == [first.digest]
    assert missing_objects(cache_dir(ws), now.digest) == []
    refused = cli(ws, "restore", "A", story["v1"], ok=False)
    assert "not in the DVC cache" in refused.stderr
    record = record_at(ws, story["v1"], "A")
    assert record is not None and not cached(ws, record.digest)
    # Other pools' history is untouched.
    for rev, name in ((story["vb"], "B"), (story["vc"], "C")):
        kept = record_at(ws, rev, name)
        assert kept is not None and cached(ws, kept.digest)
    assert "?" in cli(ws, "history", "A").stdout


def test_keep_history_true_keeps_every_version_restorable(story: dict[str, Any]) -> None:
    ws = story["ws"]
    for key in ("v1", "v2", "restored"):
        assert len(version(ws, story[key], "A")) in (12, 24)


def test_push_and_pull_share_pools_and_their_history(story: dict[str, Any], tmp_path: Path) -> None:
    ws = copy_of(story, tmp_path)
    remote = tmp_path / "remote"
    run_tool(["dvc", "remote", "add", "-d", "local", str(remote)], cwd=ws, quiet=True)
    run_tool(["git", "commit", "-qam", "remote"], cwd=ws, quiet=True)
    run_tool(["dvc", "push", "--all-commits", "-q"], cwd=ws, quiet=True)
    clone = tmp_path / "clone"
    run_tool(["git", "clone", "-q", str(ws), str(clone)], cwd=tmp_path, quiet=True)
    run_tool(["dvc", "pull", "-q"], cwd=clone, quiet=True)
    for name in ("A", "B", "C", "C2"):
        assert pool_bytes(clone, name) == pool_bytes(ws, name)
    # The clone has the history; `dvc pull` brought the current versions' data.
    lines = cli(clone, "history", "A").stdout.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == [
        story["v1"][:7],
        story["v2"][:7],
        story["restored"][:7],
    ]
    cli(clone, "restore", "A", story["v1"])
    assert pool_bytes(clone, "A") == story["v1_csv"]


def fresh_workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    cli(tmp_path, "init", str(ws))
    return ws


def test_an_inbox_named_like_a_shell_command_is_just_a_folder(tmp_path: Path, digits: Path) -> None:
    # dvc.yaml pastes input_dir into a shell command: it must arrive as one argument, verbatim.
    inbox = tmp_path / "in box x$(touch PWNED)"
    shutil.copytree(digits / "batch_1", inbox)
    ws = fresh_workspace(tmp_path)
    out = cli(ws, "run", "--input-dir", str(inbox), *FAST)
    assert f"pool my_datapool: 12 rows (+12) after adding from {inbox}" in out.stdout
    pool = read_pool(pool_dir(ws, "my_datapool"))
    assert pool is not None and set(pool["source"]) == {str(inbox)}
    assert not list(tmp_path.rglob("PWNED")) and not (Path.cwd() / "PWNED").exists()


def test_a_failing_repro_leaves_params_untouched(tmp_path: Path) -> None:
    ws = fresh_workspace(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    params, rev = (ws / "params.yaml").read_bytes(), head(ws)
    failed = cli(ws, "run", "--input-dir", str(empty), *FAST, ok=False)
    assert "no images found" in failed.stderr
    assert (ws / "params.yaml").read_bytes() == params and head(ws) == rev


def _repro_is_running(ws: Path) -> bool:
    """True once DVC holds a write lock on a stage output (its rwlock lists one)."""
    try:
        locks = json.loads((ws / ".dvc" / "tmp" / "rwlock").read_text())
    except (OSError, ValueError):
        return False
    return bool(locks.get("write"))


def test_a_second_run_never_lands_in_the_first_runs_revision(tmp_path: Path, digits: Path) -> None:
    ws = fresh_workspace(tmp_path)
    b1, b2 = str(digits / "batch_1"), str(digits / "batch_2")
    first = subprocess.Popen(
        [sys.executable, "-m", "datapool", "run", "--input-dir", b1, *FAST],
        cwd=ws,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        while not _repro_is_running(ws) and first.poll() is None:
            time.sleep(0.05)  # waiting for the first run to be inside `dvc repro`
        second = cli(ws, "run", "--input-dir", b2, "stopping_condition.n_samples=3", ok=False)
        output, _ = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, output
    assert "another datapool command is in progress" in second.stderr
    committed = yaml.safe_load(run_tool(["git", "show", "HEAD:params.yaml"], cwd=ws, quiet=True))
    assert committed["input_dir"] == b1
    assert committed["stopping_condition"]["n_samples"] == 12
    assert run_tool(["git", "status", "--porcelain"], cwd=ws, quiet=True) == ""


def test_two_processes_grow_the_same_pool_as_one(tmp_path: Path, digits: Path) -> None:
    """`datapool run --nproc 2` (torchrun, 2 gloo ranks sharing the selection) gives the
    pool one process gives, byte for byte in its table, and records the setting."""
    b1 = str(digits / "batch_1")
    pools = []
    for nproc in ("1", "2"):
        (tmp_path / f"n{nproc}").mkdir()
        ws = fresh_workspace(tmp_path / f"n{nproc}")
        out = cli(ws, "run", "--input-dir", b1, "--nproc", nproc, *FAST)
        assert "run:" in out.stdout
        committed = yaml.safe_load(
            run_tool(["git", "show", "HEAD:params.yaml"], cwd=ws, quiet=True)
        )
        assert committed["distributed"]["nproc"] == int(nproc)
        table = read_pool(pool_dir(ws, "my_datapool"))
        assert table is not None
        pools.append(table)
    assert pools[0].equals(pools[1])
