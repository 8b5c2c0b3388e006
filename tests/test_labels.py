"""`datapool label`: editing labels and columns of one's own, recorded as a pool version.

Pure tests of :func:`datapool.labels.apply_edits` / :func:`~datapool.labels.read_edits`
on small tables, then the command on tiny real workspaces (real git, real DVC; the
one-stage fake pipeline of tests/test_version.py).
"""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datapool.errors import InputError
from datapool.increment import merge_increment
from datapool.labels import apply_edits, choose_key, read_edits
from datapool.layout import pool_dir
from datapool.pool import POOL_CSV, read_pool
from datapool.revisions import history, park, parked_paths
from datapool.store import read_rows, write_lightly_csv, write_rows
from datapool.tools import git_commit, head, run_tool
from datapool.version import JOURNAL
from tests.test_combine import make_pool
from tests.test_pool import stored_table
from tests.test_version import (
    cli,
    committed,
    killed,
    run_args,
    state,
    status,
    subject,
    tiny_workspace,
)


def pool(n: int = 4, dim: int = 3) -> pd.DataFrame:
    """A pool table as the store reads it back (its dtypes), with a column of the user's."""
    table = stored_table(n, dim)
    table["reviewed"] = ["yes"] + [""] * (n - 1)
    return table


def edits(**columns: list[str]) -> pd.DataFrame:
    """An EDITS table as read_edits makes it: text cells, rows numbered from 1."""
    table = pd.DataFrame(columns)
    table.index = pd.RangeIndex(1, len(table) + 1)
    return table


def refused(table: pd.DataFrame, change: pd.DataFrame, key: str) -> str:
    with pytest.raises(InputError) as err:
        apply_edits(table, change, key, source="e.csv")
    return str(err.value)


# --- apply_edits ------------------------------------------------------------------------------


def test_labels_set_by_content_hash_and_only_those_rows_change() -> None:
    table = pool()
    hashes = list(table["content_hash"])
    new, done = apply_edits(
        table, edits(content_hash=[hashes[2], hashes[0]], labels=["dog", "cat"]), "content_hash"
    )
    assert list(new["labels"]) == ["cat", "cat", "dog", "cat"]
    assert done.rows_changed == 1 and done.columns_added == [] and done.changes
    pd.testing.assert_frame_equal(new.drop(columns="labels"), table.drop(columns="labels"))
    assert list(table["labels"]) == ["cat"] * 4  # the input is not changed


def test_labels_set_by_filenames_and_an_empty_cell_sets_empty() -> None:
    table = pool()
    names = list(table["filenames"])
    new, done = apply_edits(
        table, edits(filenames=[names[1], names[3]], labels=["", "owl"]), "filenames"
    )
    assert list(new["labels"]) == ["cat", "", "cat", "owl"]
    assert done.rows_changed == 2


def test_a_new_column_reaches_every_row_and_an_existing_one_keeps_unnamed_rows() -> None:
    table = pool()
    names = list(table["filenames"])
    change = edits(filenames=[names[1]], reviewed=["no"], quality=["good"])
    new, done = apply_edits(table, change, "filenames")
    assert list(new["quality"]) == ["", "good", "", ""]
    assert list(new["reviewed"]) == ["yes", "no", "", ""]
    assert list(new.columns) == [*table.columns, "quality"]
    assert done.columns_added == ["quality"] and done.rows_changed == 1
    assert done.describe() == "1 row changed, 1 column added (quality)"


def test_datapool_columns_are_refused_naming_them_when_a_value_differs() -> None:
    table = pool()
    hashes = list(table["content_hash"])
    for column, value in (("batch_id", "other"), ("pick_rank", "9"), ("embedding_1", "0.5")):
        message = refused(
            table, edits(content_hash=[hashes[1]], **{column: [value]}), "content_hash"
        )
        assert f"column {column} is datapool's own and cannot be edited: row 1" in message
        assert repr(value) in message
    names = edits(content_hash=[hashes[0]], filenames=["renamed.png"])
    assert "column filenames is datapool's own" in refused(table, names, "content_hash")
    for name in ("embedding", "embedding_7"):
        assert f"column {name} is not one of the pool's" in refused(
            table, edits(content_hash=[hashes[0]], **{name: ["1"]}), "content_hash"
        )


def test_unknown_repeated_and_ambiguous_keys_are_refused_naming_them() -> None:
    table = pool()
    hashes = list(table["content_hash"])
    unknown = edits(content_hash=[hashes[0], "f" * 64, "e" * 64], labels=["a", "b", "c"])
    assert "2 content_hash value(s) match no row of the pool; the first is 'fff" in refused(
        table, unknown, "content_hash"
    )
    twice = edits(content_hash=[hashes[1], hashes[0], hashes[1]], labels=["a", "b", "c"])
    assert f"content_hash {hashes[1]!r} appears in rows 1 and 3" in refused(
        table, twice, "content_hash"
    )
    names = [str(n) for n in table["filenames"]]
    table["filenames"] = [names[0], names[1], names[0], names[3]]  # same name, another inbox
    same = edits(filenames=[names[0]], labels=["x"])
    message = refused(table, same, "filenames")
    assert f"filenames {names[0]!r} (row 1) matches 2 rows" in message
    assert "--key content_hash" in message
    assert "has no filenames column" in refused(table, edits(labels=["x"]), "filenames")
    assert "--key must be one of" in refused(table, same, "labels")


@pytest.mark.parametrize("digits", [None, 15], ids=["as-written", "spreadsheet-15-digits"])
def test_the_derived_csv_edited_in_one_cell_changes_that_label_only(
    tmp_path: Path, digits: int | None
) -> None:
    write_rows(pool(5, 8), tmp_path / "shard.arrow")
    table = read_rows(tmp_path / "shard.arrow")  # the dtypes the store gives back
    write_lightly_csv(table, tmp_path / POOL_CSV)
    rows = list(csv.reader(io.StringIO((tmp_path / POOL_CSV).read_text())))
    header = rows[0]
    rows[3][header.index("labels")] = "dog"  # the third pool row, in a spreadsheet
    if digits:  # a spreadsheet re-prints every number it saves
        for row in rows[1:]:
            for i, name in enumerate(header):
                if name.startswith(("embedding_", "pick_")):
                    row[i] = f"{float(row[i]):.{digits}g}"
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows([*rows, [""] * len(header)])
    change = read_edits(b"\xef\xbb\xbf" + out.getvalue().encode(), source="e.csv")  # Excel's BOM
    assert choose_key(change) == "content_hash"
    new, done = apply_edits(table, change, choose_key(change))
    assert done.rows_changed == 1 and done.columns_added == []
    assert {"filenames", "embedding_0", "pick_distance", "batch_id"} <= set(done.ignored)
    expected = table.copy()
    expected.loc[2, "labels"] = "dog"
    pd.testing.assert_frame_equal(new, expected)


def test_read_edits_keeps_text_as_text_and_drops_empty_trailing_parts() -> None:
    data = b"filenames,labels,,\na.png,NA,,\nb.png,007,,\n,,,\n"
    table = read_edits(data, source="e.csv")
    assert list(table.columns) == ["filenames", "labels"]
    assert table.to_dict("list") == {"filenames": ["a.png", "b.png"], "labels": ["NA", "007"]}
    with pytest.raises(InputError, match="column 'labels' appears twice"):
        read_edits(b"filenames,labels,labels\na,b,c\n", source="e.csv")
    with pytest.raises(InputError, match="column 3 has no name in the header but holds values"):
        read_edits(b"filenames,labels,\na,b,c\n", source="e.csv")
    with pytest.raises(InputError, match=r"e\.csv is empty"):
        read_edits(b"", source="e.csv")


def test_edits_equal_to_the_pool_change_nothing() -> None:
    table = pool()
    same = edits(content_hash=list(table["content_hash"]), labels=list(table["labels"]))
    new, done = apply_edits(table, same, "content_hash")
    assert not done.changes and done.rows_changed == 0
    pd.testing.assert_frame_equal(new, table)


# --- the command on a tiny real workspace -----------------------------------------------------


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the fake pipeline after one run (pool A: 2 rows from in1) and a
    parked pool P (3 rows), all committed; inboxes in1, in2 beside it."""
    root = tmp_path_factory.mktemp("ran")
    ws = tiny_workspace(root)
    cli(ws, *run_args(ws, "in1", "datapool.name=A", "stopping_condition.n_samples=2"))
    shutil.move(make_pool(root / "P", "P", [6, 7, 8]), pool_dir(ws, "P"))
    park(ws, "P")
    git_commit(ws, "pool P", paths=parked_paths("P"))
    return root


@pytest.fixture
def ws(ran: Path, tmp_path: Path) -> Iterator[Path]:
    shutil.copytree(ran, tmp_path / "root", symlinks=True)
    yield tmp_path / "root" / "ws"


def labels_of(ws: Path, name: str) -> list[str]:
    table = read_pool(pool_dir(ws, name))
    assert table is not None
    return list(table["labels"])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_label_a_parked_pool_commits_its_record_only(ws: Path, tmp_path: Path) -> None:
    names = list(pd.read_csv(pool_dir(ws, "P") / POOL_CSV)["filenames"])
    (ws / "notes.txt").write_text("the user's own file\n")
    edit = tmp_path / "review.csv"
    edit.write_text(f"filenames,labels,reviewed\n{names[1]},dog,yes\n")
    out = cli(ws, "label", "P", str(edit))
    assert "label: pool P: 1 row changed, 1 column added (reviewed), revision" in out
    assert head(ws)[:7] in out
    assert committed(ws) == ["M\tpools/P.dvc"]
    assert subject(ws).startswith("pool P: labels edited from review.csv, 1 row changed")
    assert status(ws) == ["?? notes.txt"] and not (ws / JOURNAL).exists()
    assert labels_of(ws, "P") == ["x", "dog", "x"]  # in the shards, the store of record
    derived = pd.read_csv(pool_dir(ws, "P") / POOL_CSV, dtype=str, keep_default_na=False)
    assert list(derived["reviewed"]) == ["", "yes", ""]
    assert [(r.rows, r.added, r.removed) for r in history(ws, "P")][-1] == (3, 0, 0)


def test_a_refused_label_writes_nothing(ws: Path, tmp_path: Path) -> None:
    before, rev = state(ws), head(ws)
    edit = tmp_path / "bad.csv"
    edit.write_text("content_hash,labels\n" + "a" * 64 + ",dog\n")
    assert "1 content_hash value(s) match no row" in cli(ws, "label", "P", str(edit), code=1)
    edit.write_text("filenames,labels\nimg_1.png,dog\n")
    assert "pool Z is not recorded" in cli(ws, "label", "Z", str(edit), code=1)
    assert state(ws) == before and head(ws) == rev and status(ws) == []


def label_first_row(ws: Path, label: str) -> Path:
    """Edit pool A's derived CSV in place as a spreadsheet would: the first row's label."""
    derived = pool_dir(ws, "A") / POOL_CSV
    table = pd.read_csv(derived, dtype=str, keep_default_na=False)
    table.loc[0, "labels"] = label
    table.to_csv(derived, index=False)
    return derived


def test_the_edited_csv_of_the_pipeline_pool_is_recorded_in_dvc_lock(ws: Path) -> None:
    out = cli(ws, "label", "A", str(label_first_row(ws, "cat")))
    assert "pool A: 1 row changed, 0 columns added, revision" in out
    assert committed(ws) == ["M\tdvc.lock"]
    assert status(ws) == [] and labels_of(ws, "A") == ["cat", ""]
    # A later merge (the real one's logic) keeps it: a redo of A's batch that picks
    # both its images again and a third, with weak labels on.
    table = read_pool(pool_dir(ws, "A"))
    assert table is not None
    candidates = pd.concat([table, table.iloc[[1]]], ignore_index=True)
    candidates.loc[2, "content_hash"] = "f" * 64
    candidates["labels"] = "weak"
    picks = candidates[["filenames", "content_hash"]].assign(pick_rank=[1, 2, 3], pick_distance=1.0)
    merged = merge_increment(table, candidates, picks, weak_labels=True)
    assert list(merged["labels"]) == ["cat", "", "weak"]


@pytest.mark.slow  # two real runs around the label: ~5 s
def test_a_later_run_keeps_the_edited_label_and_dvc_lock_is_up_to_date(ws: Path) -> None:
    cli(ws, "label", "A", str(label_first_row(ws, "cat")))
    assert "up to date" in run_tool(["dvc", "status", "merge"], cwd=ws, quiet=True)
    cli(ws, *run_args(ws, "in2", "datapool.name=A", "stopping_condition.n_samples=2"))
    assert labels_of(ws, "A") == ["cat", "", "", ""]
    assert [r.rows for r in history(ws, "A")] == [2, 2, 4]


@pytest.mark.slow  # dvc commit, then dvc checkout: ~4 s
def test_label_rolls_back_when_dvc_lock_would_record_changed_inputs(ws: Path) -> None:
    # n_samples edited by hand in params.yaml: `dvc commit merge` would record it as
    # what made the pool. Refused after writing: records, data and EDITS.csv come back.
    params = (ws / "params.yaml").read_text().replace("n_samples: 2", "n_samples: 3")
    (ws / "params.yaml").write_text(params)
    derived = label_first_row(ws, "cat")
    edited = derived.read_text()
    before, rev, pool_files = state(ws), head(ws), files(pool_dir(ws, "A"))
    out = cli(ws, "label", "A", str(derived), code=1)
    assert "the pipeline's inputs changed since its last run (stopping_condition.n_samples)" in out
    assert state(ws) == before and head(ws) == rev and not (ws / JOURNAL).exists()
    assert derived.read_text() == edited and labels_of(ws, "A") == ["", ""]
    assert files(pool_dir(ws, "A")) == pool_files  # shards as recorded, the user's CSV


def test_label_with_keep_history_false_is_not_committed(ws: Path, tmp_path: Path) -> None:
    params = (ws / "params.yaml").read_text().replace("keep_history: true", "keep_history: false")
    (ws / "params.yaml").write_text(params)
    run_tool(["git", "commit", "-qam", "no history"], cwd=ws, quiet=True)
    rev = head(ws)
    hashes = list(pd.read_csv(pool_dir(ws, "A") / POOL_CSV)["content_hash"])
    edit = tmp_path / "e.csv"
    edit.write_text(f"content_hash,labels\n{hashes[1]},dog\n")
    out = cli(ws, "label", "A", str(edit))
    assert "not committed (keep_history=false;" in out and "cache objects" in out
    assert head(ws) == rev and labels_of(ws, "A") == ["", "dog"]
    assert status(ws) == [" M dvc.lock"]
    assert np.all(np.isfinite(read_pool(pool_dir(ws, "A"))["embedding_0"]))  # type: ignore[index]


@pytest.mark.slow
def test_a_label_killed_before_it_is_recorded_leaves_the_recorded_version(ws: Path) -> None:
    before, rev = state(ws), head(ws)
    killed(ws, "label", "A", str(label_first_row(ws, "cat")), crash_at="done")
    assert "rolled back the interrupted `label` of pool A" in cli(ws, "recover")
    assert state(ws) == before and head(ws) == rev
    assert labels_of(ws, "A") == ["", ""]  # the shards dvc.lock records, not the edit
