"""A pool version is one transaction: after a crash at any point, recovery gives a whole version."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from datapool.errors import PoolError
from datapool.pool import CHECKPOINT, IMAGES_DIR, POOL_CSV, write_table
from datapool.store import MANIFEST, SHARDS, read_manifest
from datapool.transaction import COMPLETE, INCOMING, open_pool, recover, save_pool

from .synthetic import snapshot
from .test_pool import pool_table


def _pool_with_images(tmp_path: Path, n: int) -> tuple[pd.DataFrame, dict[str, Path]]:
    """A pool table whose rows point at real files (content hashes match)."""

    table = pool_table(n)
    sources: dict[str, Path] = {}
    for i in range(n):
        src = tmp_path / "inbox" / f"img_{i}.png"
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(f"image {i}".encode())
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        table.loc[i, "content_hash"] = digest
        sources[digest] = src
    return table, sources


def members(pool: Path) -> dict[str, bytes]:
    """Every image in the pool's packs, by member name."""
    found: dict[str, bytes] = {}
    for pack in sorted((pool / IMAGES_DIR).glob("*.zip")):
        with zipfile.ZipFile(pack) as opened:
            found |= {name: opened.read(name) for name in opened.namelist()}
    return found


def unpack(pool: Path) -> None:
    """Turn the pool's packs into loose images/<hash><ext>: the layout before the packs."""
    for name, data in members(pool).items():
        (pool / IMAGES_DIR / name).write_bytes(data)
    for pack in (pool / IMAGES_DIR).glob("*.zip"):
        pack.unlink()


def test_save_pool_copies_images_by_content(tmp_path: Path) -> None:
    table, sources = _pool_with_images(tmp_path, 3)
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    save_pool(tmp_path / "pool", table, checkpoint=ckpt, sources=sources)
    assert [p.name for p in (tmp_path / "pool" / IMAGES_DIR).iterdir()] == [
        Path(p.file).name
        for p in read_manifest(tmp_path / "pool").packs  # type: ignore[union-attr]
    ]
    assert members(tmp_path / "pool") == {f"{d}.png": s.read_bytes() for d, s in sources.items()}
    assert (tmp_path / "pool" / CHECKPOINT).read_bytes() == b"weights"
    # A smaller next version drops the images its rows no longer reference.
    save_pool(tmp_path / "pool", table.iloc[:1], checkpoint=ckpt, sources={})
    assert len(members(tmp_path / "pool")) == 1


def test_save_pool_refuses_a_source_changed_since_embedding(tmp_path: Path) -> None:
    table, sources = _pool_with_images(tmp_path, 2)
    next(iter(sources.values())).write_bytes(b"edited after embed")
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"weights")
    with pytest.raises(PoolError, match="changed since it was embedded"):
        save_pool(tmp_path / "pool", table, checkpoint=ckpt, sources=sources)
    assert not (tmp_path / "pool" / POOL_CSV).exists()


def _two_versions(tmp_path: Path) -> tuple[Path, dict[str, bytes], dict[str, bytes]]:
    """A pool at version 1, and snapshots of version 1 and of version 2 (built in a copy)."""
    table, sources = _pool_with_images(tmp_path, 4)
    (tmp_path / "v1.ckpt").write_bytes(b"model one")
    (tmp_path / "v2.ckpt").write_bytes(b"model two")
    pool = tmp_path / "pool"
    save_pool(pool, table.iloc[:2], checkpoint=tmp_path / "v1.ckpt", sources=sources)
    old = snapshot(pool)
    shutil.copytree(pool, tmp_path / "v2")
    save_pool(tmp_path / "v2", table.iloc[1:], checkpoint=tmp_path / "v2.ckpt", sources=sources)
    return pool, old, snapshot(tmp_path / "v2")


def _stage_v2(tmp_path: Path, pool: Path, new: dict[str, bytes], *, complete: bool) -> None:
    """Leave ``pool`` as a crash would: v2's files (all of them) staged."""
    for name, data in new.items():
        target = pool / INCOMING / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    if complete:
        (pool / INCOMING / COMPLETE).write_text("done")


def _rename_in(pool: Path, *folders: str) -> None:
    """What _apply did before it was killed: the staged files of ``folders`` renamed in."""
    for folder in folders:
        for staged in (pool / INCOMING / folder).iterdir():
            staged.replace(pool / folder / staged.name)


def test_crash_before_the_mark_rolls_back(tmp_path: Path) -> None:
    pool, old, new = _two_versions(tmp_path)
    _stage_v2(tmp_path, pool, new, complete=False)
    recover(pool)
    assert snapshot(pool) == old


def test_crash_after_the_mark_rolls_forward(tmp_path: Path) -> None:
    pool, old, new = _two_versions(tmp_path)
    _stage_v2(tmp_path, pool, new, complete=True)
    # Killed mid-apply: shards, packs and checkpoint are in place, CSV and manifest staged.
    _rename_in(pool, SHARDS, IMAGES_DIR)
    (pool / INCOMING / CHECKPOINT).replace(pool / CHECKPOINT)
    assert open_pool(pool, lock_file=tmp_path / "dvc.lock") is not None
    assert snapshot(pool) == new
    assert old != new


def test_crash_after_both_renames_rolls_forward(tmp_path: Path) -> None:
    pool, _, new = _two_versions(tmp_path)
    _stage_v2(tmp_path, pool, new, complete=True)
    # Killed after the manifest was renamed in, before the sweep and the stage's removal.
    _rename_in(pool, SHARDS, IMAGES_DIR)
    for name in (CHECKPOINT, POOL_CSV, MANIFEST):
        (pool / INCOMING / name).replace(pool / name)
    assert open_pool(pool, lock_file=tmp_path / "dvc.lock") is not None
    assert snapshot(pool) == new


def test_crash_during_the_first_version_leaves_no_pool(tmp_path: Path) -> None:
    table, sources = _pool_with_images(tmp_path, 2)
    (tmp_path / "m.ckpt").write_bytes(b"m")
    scratch = tmp_path / "scratch"
    save_pool(scratch, table, checkpoint=tmp_path / "m.ckpt", sources=sources)
    pool = tmp_path / "pool"
    _stage_v2(tmp_path, pool, snapshot(scratch), complete=False)
    assert open_pool(pool, lock_file=tmp_path / "dvc.lock") is None
    assert snapshot(pool) == {}


def _four_image_pool(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    table, sources = _pool_with_images(tmp_path, 4)
    (tmp_path / "m.ckpt").write_bytes(b"m")
    pool = tmp_path / "pool"
    save_pool(pool, table, checkpoint=tmp_path / "m.ckpt", sources=sources)
    return pool, snapshot(pool)


def test_truncated_shard_is_refused_and_no_image_is_deleted(tmp_path: Path) -> None:
    # A shard cut short (disk full, a copy interrupted by hand) must stop recovery
    # before anything is swept by what is left of it.
    pool, before = _four_image_pool(tmp_path)
    manifest = read_manifest(pool)
    assert manifest is not None
    shard = pool / manifest.shards[0].file
    shard.write_bytes(shard.read_bytes()[:200])
    (pool / INCOMING).mkdir()  # as a crash leaves it: recovery must validate before sweeping
    with pytest.raises(PoolError, match=f"{shard.name} is not a readable Arrow file.*dvc checkout"):
        open_pool(pool, lock_file=tmp_path / "dvc.lock")
    assert len(members(pool)) == 4
    changed = {
        k for k in set(before) | set(snapshot(pool)) if before.get(k) != snapshot(pool).get(k)
    }
    assert changed == {manifest.shards[0].file}


def test_truncated_csv_of_an_older_pool_is_refused_and_no_image_is_deleted(tmp_path: Path) -> None:
    # The reported case, in the layout before shards: a CSV cut short inside its
    # second row made recovery keep the first row's image and delete 3 of 4.
    pool, _ = _four_image_pool(tmp_path)
    table = open_pool(pool, lock_file=tmp_path / "dvc.lock")
    assert table is not None
    shutil.rmtree(pool / SHARDS)
    (pool / MANIFEST).unlink()
    unpack(pool)
    write_table(table, pool / POOL_CSV)
    text = (pool / POOL_CSV).read_text()
    cut = text.index("\n", text.index("\n") + 1) + 20
    (pool / POOL_CSV).write_text(text[:cut])
    (pool / INCOMING).mkdir()
    with pytest.raises(PoolError, match=f"{POOL_CSV}: row 2 .*dvc checkout"):
        open_pool(pool, lock_file=tmp_path / "dvc.lock")
    assert len(list((pool / IMAGES_DIR).iterdir())) == 4


def test_unreadable_staged_version_is_refused_and_nothing_is_deleted(tmp_path: Path) -> None:
    # A version marked COMPLETE whose shard is damaged is not applied: the current
    # version (and every image it references) stays, and the message says what to do.
    pool, before = _four_image_pool(tmp_path)
    manifest = read_manifest(pool)
    assert manifest is not None
    staged = pool / INCOMING / manifest.shards[0].file
    staged.parent.mkdir(parents=True)
    staged.write_bytes(b"PAR1 not really")
    (pool / INCOMING / COMPLETE).write_text("done")
    with pytest.raises(PoolError, match=f"{INCOMING}.*not a readable Arrow file"):
        recover(pool)
    assert {k: v for k, v in snapshot(pool).items() if not k.startswith(INCOMING)} == before


def test_deleted_manifest_keeps_the_images_and_the_recorded_pool_is_asked_for(
    tmp_path: Path,
) -> None:
    # No pool and no interrupted stage: the images are not a crash's leftovers
    # but the recorded version's, and the fresh-clone guard says what to do.
    pool, before = _four_image_pool(tmp_path)
    for name in (MANIFEST, POOL_CSV):
        (pool / name).unlink()
    lock = tmp_path / "dvc.lock"
    out = {"path": pool.as_posix(), "md5": "0" * 32 + ".dir", "nfiles": 5}
    lock.write_text(yaml.safe_dump({"stages": {"merge": {"outs": [out]}}}))
    with pytest.raises(PoolError, match="missing from the workspace"):
        open_pool(pool, lock_file=lock)
    assert snapshot(pool) == {k: v for k, v in before.items() if k not in (MANIFEST, POOL_CSV)}


def test_a_refused_save_leaves_the_pool_as_it_was(tmp_path: Path) -> None:
    pool, before = _four_image_pool(tmp_path)
    # Rows 0-3 are the pool's; row 4's image is copied in, row 5's was edited.
    table, sources = _pool_with_images(tmp_path, 6)
    list(sources.values())[5].write_bytes(b"edited after embed")
    with pytest.raises(PoolError, match="changed since it was embedded"):
        save_pool(pool, table, checkpoint=None, sources=sources)
    assert snapshot(pool) == before
    assert not (pool / INCOMING).exists()


def test_a_stage_left_by_datapool_before_the_shards_rolls_forward_to_its_csv(
    tmp_path: Path,
) -> None:
    # The older datapool staged datapool_latest.csv and a plain-text COMPLETE mark;
    # killed mid-apply, then upgraded: the staged CSV is the version to finish.
    pool, _ = _four_image_pool(tmp_path)
    table = open_pool(pool, lock_file=tmp_path / "dvc.lock")
    assert table is not None
    shutil.rmtree(pool / SHARDS)
    for name in (MANIFEST, POOL_CSV):
        (pool / name).unlink()
    unpack(pool)
    write_table(table.iloc[:2], pool / POOL_CSV)  # the old version: 2 rows
    (pool / INCOMING).mkdir()
    write_table(table, pool / INCOMING / POOL_CSV)  # the staged one: all 4
    (pool / INCOMING / COMPLETE).write_text("staged version complete; safe to apply\n")
    recovered = recover(pool)
    assert recovered is not None and len(recovered) == 4
    assert len(list((pool / IMAGES_DIR).iterdir())) == 4
    assert not (pool / INCOMING).exists()


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [("embedding_1", float("nan"), "row 6 .*not a finite number"),
     ("content_hash", "not-a-hash", "row 6 .*not a content hash")],
)  # fmt: skip
def test_a_bad_new_row_is_named_by_its_row_in_the_version(
    tmp_path: Path, column: str, value: object, message: str
) -> None:
    """Only the shards a save writes are checked row by row (the others are the bytes of a
    checked version); an error still names the row's number in the whole table."""
    pool, before = _four_image_pool(tmp_path)
    table, sources = _pool_with_images(tmp_path, 6)
    table.loc[4:, "batch_id"] = "b2"  # rows 5-6 form the new shard
    table[column] = table[column].astype(object)
    table.loc[5, column] = value
    with pytest.raises(PoolError, match=message):
        save_pool(pool, table, checkpoint=None, sources=sources)
    assert snapshot(pool) == before


def test_a_new_row_repeating_an_old_shards_image_is_refused(tmp_path: Path) -> None:
    pool, before = _four_image_pool(tmp_path)
    table, sources = _pool_with_images(tmp_path, 5)
    table.loc[4, "batch_id"] = "b2"
    table.loc[4, "content_hash"] = table.loc[1, "content_hash"]
    with pytest.raises(PoolError, match=r"row 5 .*repeats the content_hash of row 2"):
        save_pool(pool, table, checkpoint=None, sources=sources)
    assert snapshot(pool) == before


def _three_batches(tmp_path: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Nine rows in batches b1 (rows 0-2), b2 (3-5), b3 (6-8), images at hand."""
    table, sources = _pool_with_images(tmp_path, 9)
    table.loc[3:5, "batch_id"] = "b2"
    table.loc[6:, "batch_id"] = "b3"
    return table, sources


def _whole(tmp_path: Path, table: pd.DataFrame, tag: str) -> bytes:
    """``table``'s CSV as one write makes it."""
    from datapool.store import write_lightly_csv

    write_lightly_csv(table, tmp_path / f"{tag}.csv")
    return (tmp_path / f"{tag}.csv").read_bytes()


def test_the_csv_continues_the_previous_versions_file_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A version that only adds shards continues the last version's CSV (whose digest the
    manifest recorded): the bytes equal a whole write. An edited CSV is written whole."""
    from datapool import transaction

    bases: list[object] = []
    write = transaction.write_lightly_csv

    def spy(*args: Any, **kwargs: Any) -> str:
        bases.append(kwargs.get("base"))
        return write(*args, **kwargs)

    monkeypatch.setattr(transaction, "write_lightly_csv", spy)
    table, sources = _three_batches(tmp_path)
    pool = tmp_path / "pool"
    for rows, tag in ((3, "v1"), (6, "v2")):
        save_pool(pool, table.iloc[:rows], checkpoint=None, sources=sources)
        got = (pool / POOL_CSV).read_bytes()
        assert got == _whole(tmp_path, table.iloc[:rows], tag)
        manifest = read_manifest(pool)
        assert manifest is not None and manifest.csv_sha256 == hashlib.sha256(got).hexdigest()
    assert bases[0] is None and bases[1] is not None  # v2 continued v1's file
    (pool / POOL_CSV).write_bytes((pool / POOL_CSV).read_bytes().replace(b"cat", b"dog"))
    save_pool(pool, table, checkpoint=None, sources=sources)
    assert (pool / POOL_CSV).read_bytes() == _whole(tmp_path, table, "v3")
    assert bases[2] is not None  # offered, but its digest no longer matched: written whole


def test_a_csv_hard_linked_to_dvcs_cache_is_copied_not_changed(tmp_path: Path) -> None:
    """With DVC's hardlink cache type the CSV is the cache object itself: the next
    version's CSV (continuing it) is a new file, the recorded one stays as it was."""
    table, sources = _three_batches(tmp_path)
    pool = tmp_path / "pool"
    save_pool(pool, table.iloc[:3], checkpoint=None, sources=sources)
    cached = tmp_path / "cache-object"
    cached.hardlink_to(pool / POOL_CSV)
    v1 = cached.read_bytes()
    save_pool(pool, table.iloc[:6], checkpoint=None, sources=sources)
    assert cached.read_bytes() == v1
    assert (pool / POOL_CSV).read_bytes() == _whole(tmp_path, table.iloc[:6], "v2")


def test_a_save_killed_before_its_csv_is_renamed_in_recovers_the_csv(tmp_path: Path) -> None:
    """Real SIGKILL at ``applying`` while a version that only adds a batch (its CSV
    continuing the last one) is applied: recovery renames the staged CSV in; its bytes
    are a whole write's."""
    from .test_packs import _crash_save
    from .test_store import batches, save

    pool = tmp_path / "pool"
    save(pool, batches(3, 2))
    _crash_save(pool, batches(3, 2, 2), "applying", tmp_path)
    assert (pool / INCOMING / COMPLETE).is_file() and (pool / INCOMING / POOL_CSV).is_file()
    assert recover(pool) is not None
    assert (pool / POOL_CSV).read_bytes() == _whole(tmp_path, batches(3, 2, 2), "v2")


@pytest.mark.slow
@pytest.mark.parametrize("link", ["hardlink", "symlink", "copy"])
def test_every_dvc_cache_type_keeps_the_recorded_versions_csv(tmp_path: Path, link: str) -> None:
    """Real DVC: a version recorded with ``cache.type`` ``link``, then the next version
    continuing its CSV; checking the first version out again gives its CSV intact."""
    from datapool.tools import run_tool

    from .test_store import batches, save

    ws = tmp_path / "ws"
    ws.mkdir()
    run_tool(["git", "init", "-q"], cwd=ws, quiet=True)
    run_tool(["dvc", "init", "-q"], cwd=ws, quiet=True)
    run_tool(["dvc", "config", "cache.type", link], cwd=ws, quiet=True)
    pool = ws / "pool"
    save(pool, batches(3, 2))
    v1 = (pool / POOL_CSV).read_bytes()
    run_tool(["dvc", "add", "-q", "pool"], cwd=ws, quiet=True)
    shutil.copy(ws / "pool.dvc", tmp_path / "v1.dvc")
    save(pool, batches(3, 2, 2))
    assert (pool / POOL_CSV).read_bytes() == _whole(tmp_path, batches(3, 2, 2), "v2")
    shutil.copy(tmp_path / "v1.dvc", ws / "pool.dvc")
    run_tool(["dvc", "checkout", "-q", "--force", "pool"], cwd=ws, quiet=True)
    assert (pool / POOL_CSV).read_bytes() == v1
