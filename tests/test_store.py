"""The pool's storage of record: Arrow shards + manifest, the derived CSV, migration."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest

from datapool.errors import PoolError
from datapool.pool import POOL_CSV, embeddings_of, read_pool, write_table
from datapool.store import (
    MANIFEST,
    SHARDS,
    content_hashes,
    load_pool,
    read_any,
    read_manifest,
    write_any,
    write_lightly_csv,
    write_rows,
)
from datapool.transaction import save_pool

from .test_pool import stored_table


def batches(*sizes: int, dim: int = 4) -> pd.DataFrame:
    """A pool of consecutive batches b0, b1, ... of the given sizes, distinct images."""
    parts = []
    for i, size in enumerate(sizes):
        part = stored_table(size, dim, seed=i)
        part["batch_id"] = f"b{i}"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def image_sources(folder: Path, table: pd.DataFrame) -> dict[str, Path]:
    """Real image files for rows of :func:`stored_table` (``img_S_I.png``'s content is
    ``hS_I``, whose sha256 is its content_hash), in an inbox beside ``folder``."""
    inbox = folder.parent / f"{folder.name}-inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    sources = {}
    for digest, name in zip(table["content_hash"], table["filenames"], strict=True):
        data = f"h{str(name).removeprefix('img_').removesuffix('.png')}".encode()
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} is not a stored_table row"
        (inbox / str(name)).write_bytes(data)
        sources[str(digest)] = inbox / str(name)
    return sources


def save(folder: Path, table: pd.DataFrame, **kwargs: object) -> object:
    """save_pool with every row's image at hand (see :func:`image_sources`)."""
    sources = image_sources(folder, table)
    return save_pool(folder, table, checkpoint=None, sources=sources, **kwargs)  # type: ignore[arg-type]


def shard_files(folder: Path) -> dict[str, tuple[int, bytes]]:
    """``{shard name: (inode, bytes)}``: a rewritten shard gets a new inode (temp + rename)."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in (folder / SHARDS).iterdir()}


def test_a_pool_round_trips_exactly(tmp_path: Path) -> None:
    table = batches(3, 2)
    table.loc[1, "labels"] = 'a, "quoted" label ✓'
    table.loc[2, "pick_distance"] = np.inf
    table.loc[3, "pick_distance"] = np.nan
    table["reviewed"] = ["yes", "", "no", "12345678901", ""]  # a user's column
    save(tmp_path / "pool", table)
    back = load_pool(tmp_path / "pool")
    assert back is not None
    assert list(back.columns) == list(table.columns)
    np.testing.assert_array_equal(embeddings_of(back), embeddings_of(table))
    assert back["embedding_0"].dtype == np.float32
    for column in ("filenames", "labels", "content_hash", "batch_id", "reviewed"):
        assert list(back[column]) == list(table[column])
    assert list(back["pick_rank"]) == list(table["pick_rank"])
    np.testing.assert_array_equal(back["pick_distance"], table["pick_distance"])
    # The block is writable: callers assign into it (a re-embedded pool).
    back.loc[0, "embedding_0"] = 0.5


def test_one_shard_per_batch_and_the_manifest_says_what_is_there(tmp_path: Path) -> None:
    save(tmp_path / "pool", batches(3, 2, 4), latest_batch="b2")
    manifest = read_manifest(tmp_path / "pool")
    assert manifest is not None
    assert [s.batch_id for s in manifest.shards] == ["b0", "b1", "b2"]
    assert [s.rows for s in manifest.shards] == [3, 2, 4]
    assert (manifest.rows, manifest.dim, manifest.model_ids) == (9, 4, ["m1"])
    assert manifest.latest_batch == "b2"
    assert sorted(p.name for p in (tmp_path / "pool" / SHARDS).iterdir()) == sorted(
        Path(s.file).name for s in manifest.shards
    )


def test_a_merge_writes_only_the_shard_that_changed(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    first = batches(3, 2)
    save(pool, first)
    before = shard_files(pool)
    grown = batches(3, 2, 4)
    saved = save(pool, grown)
    after = shard_files(pool)
    assert saved.shards_written == 1  # type: ignore[attr-defined]
    assert {k: v for k, v in after.items() if k in before} == before  # same inode, same bytes
    # A redo of the latest batch with fewer picks rewrites that shard alone.
    redone = grown.iloc[:-1]
    saved = save(pool, redone)
    assert saved.shards_written == 1  # type: ignore[attr-defined]
    assert {k: v for k, v in shard_files(pool).items() if k in before} == before


def test_a_new_model_rewrites_every_shard_and_a_dropped_batch_leaves(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    table = batches(3, 2)
    save(pool, table)
    before = shard_files(pool)
    reembedded = table.copy()
    reembedded["embedding_0"] = reembedded["embedding_0"] * np.float32(0.5)
    reembedded["model_id"] = "m2"
    assert save(pool, reembedded).shards_written == 2  # type: ignore[attr-defined]
    assert all(shard_files(pool)[k][1] != v[1] for k, v in before.items())
    save(pool, reembedded.iloc[:3])  # b1's rows gone: its shard goes too
    assert len(shard_files(pool)) == 1


def test_equal_rows_give_equal_bytes(tmp_path: Path) -> None:
    table = batches(5)
    write_rows(table, tmp_path / "a.arrow")
    write_rows(table.copy(), tmp_path / "b.arrow")
    assert (tmp_path / "a.arrow").read_bytes() == (tmp_path / "b.arrow").read_bytes()


def test_the_derived_csv_is_lightlys_layout_and_reads_back(tmp_path: Path) -> None:
    table = batches(3, 2)
    table.loc[0, "labels"] = 'a, "quoted"\nlabel'
    table.loc[1, "pick_distance"] = np.nan
    save(tmp_path / "pool", table)
    text = (tmp_path / "pool" / POOL_CSV).read_text(encoding="utf-8")
    header = text.partition("\n")[0].replace('"', "").split(",")
    assert header[:6] == ["filenames", *(f"embedding_{i}" for i in range(4)), "labels"]
    back = pd.read_csv(tmp_path / "pool" / POOL_CSV, keep_default_na=False, dtype={"labels": str})
    vectors = back[[f"embedding_{i}" for i in range(4)]].to_numpy(np.float32)
    np.testing.assert_array_equal(vectors, embeddings_of(table))  # shortest round-trip floats
    assert list(back["labels"]) == list(table["labels"])
    assert back.loc[1, "pick_distance"] == ""


def test_the_csv_stops_above_csv_max_rows_and_never_shows_an_older_version(
    tmp_path: Path,
) -> None:
    pool = tmp_path / "pool"
    saved = save(pool, batches(3), csv_max_rows=4)
    assert (pool / POOL_CSV).is_file() and saved.csv  # type: ignore[attr-defined]
    saved = save(pool, batches(3, 2), csv_max_rows=4)
    assert not (pool / POOL_CSV).exists()
    assert "csv_max_rows" in saved.note(pool)  # type: ignore[attr-defined]
    save(pool, batches(3), csv_max_rows=0)
    assert not (pool / POOL_CSV).exists()


def test_a_pool_in_the_layout_before_shards_is_read_then_migrated(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    table = batches(3, 2)
    table["reviewed"] = ["yes", "", "", "no", ""]
    table.loc[4, "labels"] = "edited by hand"
    save(pool, table)
    for path in (pool / MANIFEST, pool / SHARDS):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    write_table(table, pool / POOL_CSV)  # what datapool wrote before the shards
    old = read_pool(pool)
    assert old is not None and list(old["labels"]) == list(table["labels"])
    grown = pd.concat([old, batches(3, 2, 1).iloc[5:]], ignore_index=True)
    saved = save(pool, grown)
    assert saved.migrated and "migrated" in saved.note(pool)  # type: ignore[attr-defined]
    manifest = read_manifest(pool)
    assert manifest is not None and manifest.rows == 6 and manifest.user_columns == ["reviewed"]
    back = read_pool(pool)
    assert back is not None
    assert list(back["labels"][:5]) == list(table["labels"])
    assert list(back["reviewed"]) == ["yes", "", "", "no", "", ""]


def test_rows_of_a_batch_out_of_order_are_gathered_behind_its_first_row(tmp_path: Path) -> None:
    table = batches(2, 2)
    shuffled = table.iloc[[0, 2, 1, 3]].reset_index(drop=True)  # a sorted spreadsheet
    save(tmp_path / "pool", shuffled)
    back = read_pool(tmp_path / "pool")
    assert back is not None
    assert list(back["batch_id"]) == ["b0", "b0", "b1", "b1"]
    assert list(back["filenames"]) == list(shuffled["filenames"].iloc[[0, 2, 1, 3]])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="something-else/9"), "is not a datapool manifest"),
        (lambda m: m["shards"][0].update(file="../../etc/passwd"), "is not a file of"),
        (lambda m: m.update(rows=99), "is not the sum of its shards"),
        (lambda m: m["shards"][0].update(rows=1, fingerprint="x"), "is not the sum"),
    ],
)
def test_a_bad_manifest_is_refused_naming_it(tmp_path: Path, edit: object, message: str) -> None:
    save(tmp_path / "pool", batches(3))
    path = tmp_path / "pool" / MANIFEST
    data = json.loads(path.read_text())
    edit(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    with pytest.raises(PoolError, match=rf"{MANIFEST}.*{message}"):
        read_pool(tmp_path / "pool")


def test_a_shard_that_disagrees_with_the_manifest_is_refused(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    save(pool, batches(3, 2))
    manifest = read_manifest(pool)
    assert manifest is not None
    shard = pool / manifest.shards[1].file
    write_rows(batches(3, 2).iloc[:3], shard)  # b0's rows under b1's name
    with pytest.raises(PoolError, match=rf"{shard.name} has 3 rows, the manifest says 2"):
        read_pool(pool)
    shard.unlink()
    with pytest.raises(PoolError, match=rf"{shard.name} is missing but .*dvc checkout"):
        read_pool(pool)


def test_content_hashes_through_a_filesystem_in_both_layouts(tmp_path: Path) -> None:
    fs = fsspec.filesystem("file")
    table = batches(3, 2)
    save(tmp_path / "new", table)
    assert content_hashes(fs, str(tmp_path / "new")) == list(table["content_hash"])
    (tmp_path / "old").mkdir()
    write_table(table, tmp_path / "old" / POOL_CSV)
    assert content_hashes(fs, str(tmp_path / "old")) == list(table["content_hash"])
    assert content_hashes(fs, str(tmp_path)) is None


@pytest.mark.parametrize("suffix", [".arrow", ".csv"])
def test_candidates_and_picks_in_either_format(tmp_path: Path, suffix: str) -> None:
    table = batches(4)
    write_any(table, tmp_path / f"candidates{suffix}")
    back = read_any(tmp_path / f"candidates{suffix}", required=("content_hash",))
    np.testing.assert_array_equal(embeddings_of(back), embeddings_of(table))
    picks = table[["filenames", "content_hash", "pick_rank", "pick_distance"]]
    write_rows(picks, tmp_path / "picks.arrow")
    assert read_any(tmp_path / "picks.arrow").equals(picks)


def test_a_bad_row_in_a_shard_is_named(tmp_path: Path) -> None:
    table = batches(3)
    table.loc[1, "content_hash"] = "../../etc/passwd"
    write_rows(table, tmp_path / "c.arrow")
    with pytest.raises(PoolError, match=r"c\.arrow: row 2 \(filenames='img_0_1.png'\)"):
        read_any(tmp_path / "c.arrow", required=("content_hash",))
    (tmp_path / "junk.arrow").write_bytes(b"not arrow")
    with pytest.raises(PoolError, match=r"junk\.arrow is not a readable Arrow file"):
        read_any(tmp_path / "junk.arrow")


def test_write_lightly_csv_is_atomic_and_complete(tmp_path: Path) -> None:
    table = batches(2)
    write_lightly_csv(table, tmp_path / POOL_CSV)
    assert [p.name for p in tmp_path.iterdir()] == [POOL_CSV]
    digest = hashlib.sha256((tmp_path / POOL_CSV).read_bytes()).hexdigest()
    write_lightly_csv(table, tmp_path / POOL_CSV)
    assert hashlib.sha256((tmp_path / POOL_CSV).read_bytes()).hexdigest() == digest


def test_a_csv_row_reads_the_same_whatever_the_other_rows_are(tmp_path: Path) -> None:
    """Continuing a CSV is only sound if a row's text never depends on the other rows: a
    later row without a pick rank (float64 column) or with text in a user column leaves
    the earlier rows' text as an int64 / absent column wrote it."""
    from datapool.store import CsvBase

    first = batches(3)
    first["pick_rank"] = np.arange(1, 4, dtype=np.int64)
    first["pick_distance"] = np.float32(0.1)  # float32 here, its float64 value below
    first["note"] = pd.Series([None, None, None], dtype=object)  # all missing: ""
    digest = write_lightly_csv(first, tmp_path / "v1.csv")
    later = batches(3, 2)
    later["pick_rank"] = [1.0, 2.0, 3.0, np.nan, 5.0]
    later["pick_distance"] = [float(np.float32(0.1))] * 3 + [0.5, np.nan]
    later["note"] = ["", "", "", "new", None]
    base = CsvBase(tmp_path / "v1.csv", 3, digest)
    got = write_lightly_csv(later, tmp_path / "v2.csv", base=base)
    whole = write_lightly_csv(later, tmp_path / "whole.csv")
    assert (tmp_path / "v2.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert got == whole == hashlib.sha256((tmp_path / "whole.csv").read_bytes()).hexdigest()
    text = (tmp_path / "whole.csv").read_text().splitlines()
    assert text[1].endswith(',1,0.10000000149011612,""') and text[4].endswith(',,0.5,"new"')


def test_equal_tables_give_equal_shard_bytes_however_their_text_is_chunked(
    tmp_path: Path,
) -> None:
    """A loaded pool's text columns are Arrow arrays in one chunk per shard; a shard
    written from them must not depend on that (DVC stores equal files once)."""
    import pyarrow as pa

    table = batches(4)
    chunked = table.copy()
    for column in ("filenames", "labels", "content_hash"):
        values = [str(v) for v in table[column]]
        parts = pa.chunked_array([pa.array(values[:1]), pa.array(values[1:])])
        chunked[column] = pd.Series(pd.arrays.ArrowStringArray(parts))
    write_rows(table, tmp_path / "one.arrow")
    write_rows(chunked, tmp_path / "two.arrow")
    assert (tmp_path / "one.arrow").read_bytes() == (tmp_path / "two.arrow").read_bytes()


def test_a_text_column_with_a_numpy_nan_gap_is_written_with_an_empty_cell(
    tmp_path: Path,
) -> None:
    table = batches(3)
    table["note"] = pd.Series(["x", np.float32("nan"), "y"], dtype=object)
    save(tmp_path / "pool", table)
    assert list(load_pool(tmp_path / "pool")["note"]) == ["x", "", "y"]  # type: ignore[index]


def test_a_csv_base_without_its_recorded_digest_is_written_whole(tmp_path: Path) -> None:
    from datapool.store import CsvBase

    table = batches(2, 2)
    write_lightly_csv(table.iloc[:2], tmp_path / "old.csv")
    base = CsvBase(tmp_path / "old.csv", 2, "0" * 64)  # the file was edited since
    got = write_lightly_csv(table, tmp_path / "new.csv", base=base)
    write_lightly_csv(table, tmp_path / "whole.csv")
    assert (tmp_path / "new.csv").read_bytes() == (tmp_path / "whole.csv").read_bytes()
    assert got == hashlib.sha256((tmp_path / "whole.csv").read_bytes()).hexdigest()


def test_a_shard_of_another_version_is_caught_by_its_fingerprint(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    table = batches(3, 2)
    save(pool, table)
    manifest = read_manifest(pool)
    assert manifest is not None
    older = (pool / manifest.shards[1].file).read_bytes()
    reembedded = table.assign(embedding_0=table["embedding_0"] * np.float32(0.5), model_id="m2")
    save(pool, reembedded)
    (pool / manifest.shards[1].file).write_bytes(older)  # what a half-applied version leaves
    with pytest.raises(PoolError, match="holds other rows than the manifest lists"):
        read_pool(pool)


def test_a_reader_sees_the_completed_version_not_a_mix(tmp_path: Path) -> None:
    # A write killed mid-apply, read by export/combine (which do not recover first).
    from datapool.store import COMPLETE, INCOMING

    pool, scratch = tmp_path / "pool", tmp_path / "scratch"
    table = batches(3, 2)
    save(pool, table)
    shutil.copytree(pool, scratch)
    reembedded = table.assign(embedding_0=table["embedding_0"] * np.float32(0.5), model_id="m2")
    save(scratch, reembedded)
    manifest = read_manifest(scratch)
    assert manifest is not None
    (pool / INCOMING / SHARDS).mkdir(parents=True)
    (scratch / MANIFEST).replace(pool / INCOMING / MANIFEST)
    first, second = (s.file for s in manifest.shards)
    (scratch / first).replace(pool / first)  # renamed in already
    (scratch / second).replace(pool / INCOMING / second)  # still staged
    (pool / INCOMING / COMPLETE).write_text('{"csv": true, "shards": []}')
    back = read_pool(pool)
    assert back is not None and set(back["model_id"]) == {"m2"}


def test_a_table_no_reader_would_accept_is_never_written(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    save(pool, batches(3))
    before = {p: p.read_bytes() for p in pool.rglob("*") if p.is_file()}
    repeated = pd.concat([batches(3), batches(3).iloc[[1]]], ignore_index=True)
    with pytest.raises(PoolError, match=r"row 4 .* repeats the content_hash .*batches 'b0' and"):
        save_pool(pool, repeated, checkpoint=None, sources={})
    broken = batches(3).assign(embedding_2=np.float32([0.1, np.nan, 0.2]))
    with pytest.raises(PoolError, match=r"row 2 .*embedding_2"):
        save_pool(pool, broken, checkpoint=None, sources={})
    assert {p: p.read_bytes() for p in pool.rglob("*") if p.is_file()} == before


def test_user_columns_of_an_older_pool_stay_text(tmp_path: Path) -> None:
    table = batches(3)
    table["zip"] = ["007", "0123", ""]
    (tmp_path / "pool").mkdir()
    write_table(table, tmp_path / "pool" / POOL_CSV)
    back = read_pool(tmp_path / "pool")
    assert back is not None and list(back["zip"]) == ["007", "0123", ""]


def test_content_hashes_reads_each_shard_once_across_versions(tmp_path: Path) -> None:
    class Counting:
        """The local file system, counting the shards it opens."""

        def __init__(self) -> None:
            self.fs, self.opened = fsspec.filesystem("file"), 0

        def exists(self, path: str) -> bool:
            return bool(self.fs.exists(path))

        def open(self, path: str, mode: str = "rb") -> object:
            self.opened += path.endswith(".arrow")
            return self.fs.open(path, mode)

    save(tmp_path / "v1", batches(3, 2))
    save(tmp_path / "v2", batches(3, 2, 4))
    fs, memo = Counting(), {}  # type: ignore[var-annotated]
    assert content_hashes(fs, str(tmp_path / "v1"), memo=memo) == list(
        batches(3, 2)["content_hash"]
    )
    assert content_hashes(fs, str(tmp_path / "v2"), memo=memo) == list(
        batches(3, 2, 4)["content_hash"]
    )
    assert fs.opened == 3  # v2 shares its first two shards with v1
