"""The pool's images, one uncompressed ZIP per batch: deterministic, written only when a
batch's image set changes, checked on reading, crash-safe, migrated from loose files."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from datapool.errors import PoolError
from datapool.packs import DATE, PoolImages, read_image, write_pack
from datapool.pool import IMAGES_DIR, image_name
from datapool.store import LOOSE_FORMAT, MANIFEST, batch_key, read_manifest, shard_file
from datapool.transaction import recover, save_pool
from datapool.version import CRASH_AT

from .synthetic import snapshot
from .test_store import batches, image_sources, save
from .test_transaction import unpack


def packs(pool: Path) -> dict[str, tuple[int, bytes]]:
    """``{pack name: (inode, bytes)}``: a rewritten pack gets a new inode (temp + rename)."""
    return {p.name: (p.stat().st_ino, p.read_bytes()) for p in (pool / IMAGES_DIR).iterdir()}


def pack_of(batch: str) -> str:
    return f"{batch_key(batch)}.zip"


def all_images(pool: Path, table: pd.DataFrame) -> list[bytes]:
    with PoolImages(pool) as images:
        return [images.read(row) for _, row in table.iterrows()]


def test_a_pack_round_trips_and_the_same_images_give_the_same_bytes(tmp_path: Path) -> None:
    images = {f"{hashlib.sha256(bytes([i])).hexdigest()}.png": bytes([i]) * 50 for i in range(5)}
    write_pack(tmp_path / "a.zip", list(images), images.__getitem__)
    write_pack(tmp_path / "b.zip", list(reversed(images)), images.__getitem__)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.zip") as pack:
        assert pack.namelist() == sorted(images)
        assert {name: pack.read(name) for name in pack.namelist()} == images
        for info in pack.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            assert info.date_time == DATE and not info.extra and not info.comment
        assert not pack.comment
    with pytest.raises(PoolError, match="packed twice"):
        write_pack(tmp_path / "c.zip", [*images, next(iter(images))], images.__getitem__)
    assert not (tmp_path / "c.zip").exists()


def test_a_pool_is_one_pack_per_batch_named_like_its_shard(tmp_path: Path) -> None:
    pool, table = tmp_path / "pool", batches(3, 2)
    save(pool, table)
    manifest = read_manifest(pool)
    assert manifest is not None
    assert [p.file for p in manifest.packs] == [f"{IMAGES_DIR}/{pack_of(b)}" for b in ("b0", "b1")]
    assert [s.file for s in manifest.shards] == [shard_file(b) for b in ("b0", "b1")]
    assert [p.members for p in manifest.packs] == [3, 2]
    sources = image_sources(pool, table)
    assert all_images(pool, table) == [sources[h].read_bytes() for h in table["content_hash"]]


def test_adding_a_batch_writes_one_pack_and_leaves_the_others(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    save(pool, batches(3, 2))
    before = packs(pool)
    saved = save(pool, batches(3, 2, 4))
    assert saved.packs_written == 1  # type: ignore[attr-defined]
    after = packs(pool)
    assert {k: after[k] for k in before} == before  # same inode, same bytes
    assert set(after) - set(before) == {pack_of("b2")}


def test_a_save_never_opens_the_pack_of_a_batch_it_leaves_alone(tmp_path: Path) -> None:
    # Work in proportion to the rows written: b0's pack could be anything, unread.
    pool = tmp_path / "pool"
    save(pool, batches(3, 2))
    untouched = pool / IMAGES_DIR / pack_of("b0")
    untouched.write_bytes(b"not even a zip")
    saved = save(pool, batches(3, 3, 2))  # b1 redone, b2 added
    assert saved.packs_written == 2  # type: ignore[attr-defined]
    assert untouched.read_bytes() == b"not even a zip"


def test_a_redo_rewrites_its_pack_a_new_model_rewrites_none(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    save(pool, batches(3, 2))
    before = packs(pool)
    redone = batches(3, 3)  # batch b1 redone: another image set
    save(pool, redone)
    after = packs(pool)
    assert after[pack_of("b0")] == before[pack_of("b0")]
    assert after[pack_of("b1")][1] != before[pack_of("b1")][1]
    assert len(all_images(pool, redone)) == 6
    # New embeddings and a label edit rewrite shards, never a pack.
    reembedded = redone.assign(embedding_0=0.5, model_id="m2", labels="dog")
    saved = save(pool, reembedded)
    assert saved.shards_written == 2 and saved.packs_written == 0  # type: ignore[attr-defined]
    assert packs(pool) == after


def test_a_dropped_batch_takes_its_pack_with_it(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    save(pool, batches(3, 2))
    subset = batches(3, 2).iloc[:3]  # combine or thinning keeps batch b0 only
    save(pool, subset)
    assert set(packs(pool)) == {pack_of("b0")}
    assert len(all_images(pool, subset)) == 3


def _damage(pack: Path, how: str) -> None:
    data = pack.read_bytes()
    with zipfile.ZipFile(pack) as opened:
        names = opened.namelist()
        images = {n: opened.read(n) for n in names}
    if how == "truncated":
        pack.write_bytes(data[: len(data) // 2])
    elif how == "member missing":
        write_pack(pack, names[1:], images.__getitem__)
    elif how == "other pack":  # the same names' count, another set
        write_pack(pack, ["0" * 64 + ".png", *names[1:]], lambda n: images.get(n, b"x"))
    else:  # a bit of every member flipped in place (their CRCs no longer match)
        for image in images.values():
            offset = data.index(image)
            data = data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1 :]
        pack.write_bytes(data)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("truncated", "is not a readable image pack"),
        ("member missing", "holds other images than the manifest lists"),
        ("other pack", "holds other images than the manifest lists"),
        ("flipped", "is damaged"),
    ],
)
def test_a_damaged_pack_is_refused_naming_it(tmp_path: Path, how: str, message: str) -> None:
    pool, table = tmp_path / "pool", batches(3)
    save(pool, table)
    pack = pool / IMAGES_DIR / pack_of("b0")
    _damage(pack, how)
    with pytest.raises(PoolError, match=rf"{pack}.*{message}|{message}.*{pack.name}"):
        read_image(pool, table.iloc[0])
    # A save that must rewrite the pack refuses too, and leaves the pool as it was.
    before = snapshot(pool)
    with pytest.raises(PoolError, match=pack.name):
        save(pool, table.iloc[:2])
    assert snapshot(pool) == before


def test_a_member_that_is_not_the_rows_image_is_refused(tmp_path: Path) -> None:
    pool, table = tmp_path / "pool", batches(2)
    save(pool, table)
    pack = pool / IMAGES_DIR / pack_of("b0")
    names = [
        image_name(h, f) for h, f in zip(table["content_hash"], table["filenames"], strict=True)
    ]
    write_pack(pack, names, lambda n: b"not the image")  # same names, CRCs fine, wrong bytes
    with pytest.raises(PoolError, match=rf"{pack_of('b0')}.*does not hash to its content_hash"):
        read_image(pool, table.iloc[1])


def test_a_missing_pack_falls_back_to_the_original(tmp_path: Path) -> None:
    pool, table = tmp_path / "pool", batches(2)
    save(pool, table)
    (pool / IMAGES_DIR / pack_of("b0")).unlink()  # not checked out
    original = table.iloc[0]
    inbox = image_sources(pool, table)[str(original["content_hash"])].parent
    row = original.copy()
    row["source"] = str(inbox)
    assert read_image(pool, row) == (inbox / str(row["filenames"])).read_bytes()
    row["source"] = str(tmp_path / "gone")
    with pytest.raises(PoolError, match="is neither in"):
        read_image(pool, row)


def _crash_save(pool: Path, table: pd.DataFrame, point: str, tmp_path: Path) -> None:
    """save_pool in a child process that SIGKILLs itself at ``point``."""
    table.to_pickle(tmp_path / "table.pkl")
    sources = {k: str(v) for k, v in image_sources(pool, table).items()}
    (tmp_path / "sources.json").write_text(json.dumps(sources))
    script = (
        "import json, sys, pandas as pd; from pathlib import Path;"
        "from datapool.transaction import save_pool;"
        f"t = pd.read_pickle({str(tmp_path / 'table.pkl')!r});"
        f"s = {{k: Path(v) for k, v in json.loads(Path({str(tmp_path / 'sources.json')!r})"
        ".read_text()).items()};"
        f"save_pool(Path({str(pool)!r}), t, checkpoint=None, sources=s)"
    )
    env = {**os.environ, CRASH_AT: point}
    done = subprocess.run([sys.executable, "-c", script], env=env, check=False)
    assert done.returncode == -9


@pytest.mark.parametrize("point", ["staged", "applying"])
def test_a_save_killed_between_stage_and_apply_recovers_to_the_new_version(
    tmp_path: Path, point: str
) -> None:
    pool = tmp_path / "pool"
    save(pool, batches(3, 2))
    expected = tmp_path / "expected"
    save(expected, batches(3, 3, 2))  # the same version, written without a crash
    _crash_save(pool, batches(3, 3, 2), point, tmp_path)
    recovered = recover(pool)
    assert recovered is not None and len(recovered) == 8
    assert packs(pool).keys() == packs(expected).keys()
    assert {k: v[1] for k, v in packs(pool).items()} == {
        k: v[1] for k, v in packs(expected).items()
    }
    assert len(all_images(pool, recovered)) == 8


def test_a_pool_of_loose_images_is_read_then_packed_by_its_next_save(tmp_path: Path) -> None:
    pool, table = tmp_path / "pool", batches(3, 2)
    save(pool, table)
    unpack(pool)  # the layout before the packs: images/<hash><ext>, format /1
    manifest = json.loads((pool / MANIFEST).read_text())
    manifest["format"], manifest["packs"] = LOOSE_FORMAT, []
    (pool / MANIFEST).write_text(json.dumps(manifest))
    loose = sorted(p.name for p in (pool / IMAGES_DIR).iterdir())
    assert len(loose) == 5 and not any(n.endswith(".zip") for n in loose)
    sources = image_sources(pool, table)
    expected = [sources[h].read_bytes() for h in table["content_hash"]]
    assert all_images(pool, table) == expected  # read from the loose files
    for source in sources.values():
        source.unlink()  # so the next save can only take them from the loose files
    grown = batches(3, 2, 1)  # the kept rows' images can only come from the loose files
    new = image_sources(tmp_path / "later", grown.iloc[5:])
    saved = save_pool(pool, grown, checkpoint=None, sources=new)
    assert saved.packed == 5 and "5 loose images packed" in saved.note(pool)
    assert sorted(packs(pool)) == sorted(pack_of(b) for b in ("b0", "b1", "b2"))  # loose gone
    assert all_images(pool, grown)[:5] == expected


def _loose(pool: Path) -> None:
    """Rewrite ``pool`` as datapool wrote it before the packs (format /1, loose images)."""
    unpack(pool)
    manifest = json.loads((pool / MANIFEST).read_text())
    manifest["format"], manifest["packs"] = LOOSE_FORMAT, []
    (pool / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_through_dvc_a_loose_pool_migrates_and_its_old_revision_still_restores(
    tmp_path: Path,
) -> None:
    from datapool.tools import git_commit, run_tool

    repo = tmp_path / "repo"
    repo.mkdir()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        run_tool(cmd, cwd=repo, quiet=True)
    run_tool(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
        cwd=repo,
        quiet=True,
    )
    pool, table = repo / "pools" / "p", batches(3, 2)
    save(pool, table)
    _loose(pool)
    sources = image_sources(pool, table)
    expected = [sources[h].read_bytes() for h in table["content_hash"]]

    def record(message: str) -> str:
        run_tool(["dvc", "add", "-q", "pools/p"], cwd=repo, quiet=True)
        git_commit(repo, message, paths=["pools/p.dvc", "pools/.gitignore"])
        return run_tool(["git", "rev-parse", "HEAD"], cwd=repo, quiet=True).strip()

    old = record("loose")
    grown = batches(3, 2, 1)
    saved = save_pool(
        pool, grown, checkpoint=None, sources=image_sources(tmp_path / "later", grown.iloc[5:])
    )
    assert saved.packed == 5
    record("packed")
    nfiles = yaml_nfiles(repo / "pools" / "p.dvc")
    assert nfiles == 1 + 3 + 3 + 1  # manifest, a shard and a pack per batch, the CSV
    run_tool(["git", "checkout", "-q", old], cwd=repo, quiet=True)
    run_tool(["dvc", "checkout", "-q", "--force"], cwd=repo, quiet=True)
    manifest = read_manifest(pool)
    assert manifest is not None and manifest.loose
    assert all_images(pool, table) == expected  # the old revision reads its loose images


def yaml_nfiles(record: Path) -> int:
    import yaml

    return int(yaml.safe_load(record.read_text())["outs"][0]["nfiles"])
