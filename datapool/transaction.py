"""Writing a pool version as one transaction, and recovering after a crash.

A version is the manifest, the shards it lists, ``checkpoint_latest.ckpt``, the
images its rows reference and (for pools up to ``csv_max_rows``) the derived
``datapool_latest.csv`` (:mod:`datapool.store`). Each file can be replaced
atomically, but not several at once, so a new version is first staged in
``.incoming/`` -- the shards that changed, the manifest, the CSV, the
checkpoint -- and marked ``COMPLETE``; only then are the files renamed into
place, the manifest last. :func:`recover` finishes an interrupted rename (roll
forward, if the mark exists) or discards the stage (roll back), and removes
shards and images the version does not reference. Whatever instant a run is
killed at, after recovery the pool is exactly the old or exactly the new version.
A version is validated before anything is deleted by it: a damaged table stops
recovery with a message instead of taking the recorded version's images with it.
A pool written before the shards (its CSV alone) is migrated by its next save.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from datapool.atomic import atomic_open, fsync_dir
from datapool.errors import PoolError
from datapool.pool import (
    CHECKPOINT,
    IMAGES_DIR,
    POOL_CSV,
    ensure_pool_present,
    image_names,
    read_legacy_pool,
    stored_image,
)
from datapool.store import (
    COMPLETE,
    INCOMING,
    MANIFEST,
    SHARDS,
    Manifest,
    Plan,
    check_rows,
    is_in,
    load_pool,
    plan_version,
    read_columns,
    read_manifest,
    write_lightly_csv,
    write_rows,
)

# Up to this many rows a pool also gets Lightly's datapool_latest.csv (see README):
# at 100,000 x 64 it is ~100 MB and ~2 s to write; beyond, every version would add
# a whole-table copy to the DVC cache, which the shards exist to avoid.
CSV_MAX_ROWS = 100_000


@dataclass(frozen=True)
class Saved:
    """What :func:`save_pool` wrote.

    Attributes:
        manifest: the new version's manifest.
        shards_written: shards written anew (the others were unchanged).
        csv: whether ``datapool_latest.csv`` was written (else it was removed).
        migrated: the pool was in the layout before shards (its CSV alone) until now.
    """

    manifest: Manifest
    shards_written: int
    csv: bool
    migrated: bool

    def note(self, pool_dir: Path) -> str:
        """One line about the store, for the stage's output; empty when nothing is notable."""
        notes = []
        if self.migrated:
            notes.append(
                f"{pool_dir} migrated from {POOL_CSV} alone to Arrow shards + {MANIFEST} "
                f"({self.manifest.rows} rows); {POOL_CSV} is now derived from them"
            )
        if not self.csv:
            notes.append(
                f"{POOL_CSV} not written: the pool has more than csv_max_rows rows "
                "(`datapool export` writes Lightly's CSV on demand)"
            )
        return "; ".join(notes)


def save_pool(
    pool_dir: Path,
    table: pd.DataFrame,
    *,
    checkpoint: Path | None,
    sources: Mapping[str, Path],
    csv_max_rows: int = CSV_MAX_ROWS,
    latest_batch: str | None = None,
) -> Saved:
    """Make ``table`` (with the model in ``checkpoint``) the pool's current version.

    ``sources`` maps content hash -> original file for rows whose image the pool
    does not hold yet; each is copied to :func:`~datapool.pool.stored_image` and
    must still have that hash, else :class:`PoolError` (missing, or changed since
    it was embedded) and the pool is left as it was. ``checkpoint=None`` leaves
    the pool without a model (an imported pool's embeddings have none). Only the
    shards whose rows changed are written (:func:`datapool.store.plan_version`);
    ``datapool_latest.csv`` is written when the pool has at most ``csv_max_rows``
    rows (0: never) and removed otherwise, so it never shows an older version.
    ``latest_batch`` is the increment writing this version (``merge``; see
    :attr:`datapool.store.Manifest.latest_batch`), recorded in the same
    transaction; None keeps the one recorded now (an edit of rows is no increment).
    """
    check_rows(table, source=f"the new version of {pool_dir}")  # what a reader would refuse
    if (pool_dir / INCOMING).exists():
        recover(pool_dir)  # else the last save finished, and the caller read a whole version
    old = read_manifest(pool_dir) if pool_dir.is_dir() else None
    migrated = old is None and (pool_dir / POOL_CSV).is_file()
    if latest_batch is None:
        latest_batch = old.latest_batch if old is not None else ""
    plan = plan_version(table, old, latest_batch=latest_batch)
    table = plan.table  # in shard order, so the CSV lists rows as the shards do
    csv = 0 < len(table) <= csv_max_rows if csv_max_rows else False
    leaving = _leaving_images(pool_dir, old, plan)
    try:
        _stage(pool_dir, table, plan, checkpoint=checkpoint, sources=sources, csv=csv)
    except BaseException:
        recover(pool_dir)  # no COMPLETE mark yet: drops the stage and the images it copied
        raise
    _apply(pool_dir, table, leaving=leaving)
    return Saved(plan.manifest, shards_written=len(plan.writes), csv=csv, migrated=migrated)


def _stage(
    pool_dir: Path,
    table: pd.DataFrame,
    plan: Plan,
    *,
    checkpoint: Path | None,
    sources: Mapping[str, Path],
    csv: bool,
) -> None:
    """Copy the new images in, write changed shards, manifest, CSV and model to the stage,
    then mark it COMPLETE (listing the staged shards and whether a CSV belongs to it)."""
    staging = pool_dir / INCOMING
    # The stage exists before the first image is copied, so recovery knows that
    # images no table references, beside an unmarked stage, are its leftovers.
    staging.mkdir(parents=True)
    # Rows of unchanged shards had their images checked when their shard was written.
    written = list(plan.writes.values())
    _copy_missing_images(pool_dir, pd.concat(written) if written else table.iloc[:0], sources)
    fingerprints = {s.file: s.fingerprint for s in plan.manifest.shards}
    for name, rows in plan.writes.items():
        write_rows(rows, staging / name, fingerprint=fingerprints[name])
    if csv:
        write_lightly_csv(table, staging / POOL_CSV)
    current = pool_dir / CHECKPOINT
    if checkpoint is not None and (
        not current.exists() or current.read_bytes() != checkpoint.read_bytes()
    ):
        with atomic_open(staging / CHECKPOINT, "wb") as handle:
            handle.write(checkpoint.read_bytes())
    with atomic_open(staging / MANIFEST, "w") as handle:
        handle.write(plan.manifest.to_json())
    for folder in (staging / SHARDS, pool_dir / IMAGES_DIR, staging):
        if folder.is_dir():
            fsync_dir(folder)  # the copied images too: COMPLETE promises the whole version
    mark = {"csv": csv, "shards": sorted(plan.writes)}
    with atomic_open(staging / COMPLETE, "w") as handle:
        handle.write(json.dumps(mark) + "\n")


def _mark(staging: Path) -> dict[str, Any]:
    """What a COMPLETE mark says: ``{"csv": bool, "shards": [staged shard files]}``. A mark
    left by datapool before the shards is plain text: a version with a CSV, no shards."""
    text = (staging / COMPLETE).read_text(encoding="utf-8")
    try:
        mark = json.loads(text)
    except ValueError:
        return {"csv": True, "shards": []}
    return mark if isinstance(mark, dict) else {"csv": True, "shards": []}


def _copy_missing_images(pool_dir: Path, rows: pd.DataFrame, sources: Mapping[str, Path]) -> None:
    """Copy into ``images/`` the image of each of ``rows`` the pool does not hold yet,
    from ``sources``. Per row, not by listing ``images/``: a merge writes a few
    thousand rows into a pool of a million images."""
    present: set[str] = set()
    hashes, files = rows["content_hash"].tolist(), rows["filenames"].tolist()
    for digest, filename, name in zip(hashes, files, image_names(rows), strict=True):
        if name in present or (pool_dir / IMAGES_DIR / name).exists():
            continue
        if str(digest) not in sources:
            raise PoolError(f"the image of {filename!r} ({str(digest)[:12]}) is missing")
        target = stored_image(pool_dir, content_hash=str(digest), filename=str(filename))
        _copy_verified(sources[str(digest)], target, content_hash=str(digest))
        present.add(name)


def create_pool(
    pool_dir: Path, table: pd.DataFrame, *, checkpoint: Path | None, sources: Mapping[str, Path]
) -> Saved:
    """A new pool at ``pool_dir`` (see :func:`save_pool`); nothing is left behind on failure.

    Raises :class:`PoolError` if the folder already exists or an image is missing/changed.
    """
    if pool_dir.exists():
        raise PoolError(f"{pool_dir} already exists; choose a new pool name")
    try:
        return save_pool(pool_dir, table, checkpoint=checkpoint, sources=sources)
    except BaseException:
        shutil.rmtree(pool_dir, ignore_errors=True)
        raise


def recover(pool_dir: Path) -> pd.DataFrame | None:
    """Bring a pool left by an interrupted :func:`save_pool` to a whole version.

    Returns the pool's rows, validated (:func:`~datapool.store.load_pool`), or
    None when it has none. Every version is validated before anything is
    deleted, and a shard or image goes only when the version it ends with does
    not reference it (an abandoned stage's copies, a previous version's files).
    Raises :class:`PoolError` naming the file (and row) and deletes nothing when
    the current version or a staged one marked complete does not validate: it
    is not a version, and sweeping by it would drop the recorded version's images.
    """
    staging = pool_dir / INCOMING
    if (staging / COMPLETE).exists():
        # Roll forward; some staged files may already be in place (killed mid-apply).
        table = _staged_version(pool_dir)
        if table is None:
            raise PoolError(f"{staging} is marked complete but holds no version; remove it")
        _apply(pool_dir, table)
        return table
    if not staging.exists():
        # No stage: the last save finished (its sweep ran before the stage went).
        return _valid_table(pool_dir, advice=_checkout_advice(pool_dir))
    shutil.rmtree(staging)
    table = _valid_table(pool_dir, advice=_checkout_advice(pool_dir))
    _sweep(pool_dir, table)  # the abandoned stage's image copies (all of them without a table)
    return table


def _staged_version(pool_dir: Path) -> pd.DataFrame | None:
    """The version a COMPLETE stage makes, validated; PoolError (deleting nothing) if it
    does not validate, with advice that fits how far its renames got."""
    staging = pool_dir / INCOMING
    untouched = all((staging / name).is_file() for name in _mark(staging)["shards"])
    advice = (
        f"remove {staging} to keep the current version"
        if untouched  # no staged shard was renamed over the current version's yet
        else _checkout_advice(pool_dir)
    )
    legacy = not (staging / MANIFEST).exists() and read_manifest(pool_dir) is None
    if legacy and (staging / POOL_CSV).exists():
        # Staged by datapool before the shards: the staged CSV is the new version.
        try:
            return read_legacy_pool(staging)
        except PoolError as err:
            raise PoolError(f"{err}; no pool image was deleted: {advice}") from err
    return _valid_table(pool_dir, overlay=staging, advice=advice)


def _checkout_advice(pool_dir: Path) -> str:
    return (
        f"bring back the recorded version with `dvc checkout {pool_dir.parent.name}/"
        f"{pool_dir.name}` (or delete {pool_dir} if no commit recorded it)"
    )


def _apply(pool_dir: Path, table: pd.DataFrame, *, leaving: list[str] | None = None) -> None:
    """Rename the staged files into place (shards, checkpoint, CSV, then the manifest) and
    sweep by ``table``, the staged rows; idempotent. ``leaving`` (from :func:`save_pool`)
    names the only images that can have become unreferenced; None sweeps by listing."""
    staging = pool_dir / INCOMING
    staged_shards = staging / SHARDS
    if staged_shards.is_dir():
        (pool_dir / SHARDS).mkdir(exist_ok=True)
        for shard in sorted(staged_shards.iterdir()):
            shard.replace(pool_dir / SHARDS / shard.name)
        fsync_dir(pool_dir / SHARDS)
    for name in (CHECKPOINT, POOL_CSV):
        if (staging / name).exists():
            (staging / name).replace(pool_dir / name)
    if not _mark(staging)["csv"]:
        (pool_dir / POOL_CSV).unlink(missing_ok=True)  # would show an older version
    if (staging / MANIFEST).exists():
        (staging / MANIFEST).replace(pool_dir / MANIFEST)
    fsync_dir(pool_dir)
    if leaving is None:
        _sweep(pool_dir, table)
    else:
        for name in leaving:
            (pool_dir / IMAGES_DIR / name).unlink(missing_ok=True)
        _sweep_shards(pool_dir)
    shutil.rmtree(staging)


def _valid_table(folder: Path, *, advice: str, overlay: Path | None = None) -> pd.DataFrame | None:
    """``load_pool(folder)``; its :class:`PoolError` says nothing was deleted, and ``advice``."""
    try:
        return load_pool(folder, overlay=overlay)
    except PoolError as err:
        raise PoolError(f"{err}; no pool image was deleted: {advice}") from err


def _sweep(pool_dir: Path, table: pd.DataFrame | None) -> None:
    """Delete stored images the validated ``table`` does not reference (all, for None), and
    shards the current manifest does not list."""
    images = pool_dir / IMAGES_DIR
    if images.is_dir():
        keep = set(image_names(table)) if table is not None else set()
        for stale in images.iterdir():
            if stale.name not in keep:
                stale.unlink()
    _sweep_shards(pool_dir)


def _leaving_images(pool_dir: Path, old: Manifest | None, plan: Plan) -> list[str] | None:
    """Images the new version no longer references: those of the old version's rows in
    shards it rewrites or drops, unless the new version holds that image under the same
    name. None (sweep by listing) when there is no old manifest (a new or migrated pool).
    """
    if old is None:
        return None
    kept = {s.file for s in plan.manifest.shards} - set(plan.writes)
    gone = [s for s in old.shards if s.file not in kept]
    if not gone:
        return []
    import pyarrow as pa

    parts = [read_columns(pool_dir / s.file, ("content_hash", "filenames")) for s in gone]
    before = pa.concat_tables(parts).to_pandas()
    now = plan.table.set_index("content_hash")["filenames"]
    names = image_names(before)
    still = is_in(before["content_hash"], plan.table["content_hash"])
    keep = set()
    if still.any():
        moved = before[still]
        keep = set(image_names(moved.assign(filenames=now.loc[moved["content_hash"]].to_numpy())))
    return [name for name in names if name not in keep]


def _sweep_shards(pool_dir: Path) -> None:
    """Delete shard files the current manifest does not list."""
    shards = pool_dir / SHARDS
    manifest = read_manifest(pool_dir)
    if shards.is_dir() and manifest is not None:
        listed = {Path(s.file).name for s in manifest.shards}
        for stale in shards.iterdir():
            if stale.name not in listed:
                stale.unlink()


def _copy_verified(source: Path, target: Path, *, content_hash: str) -> None:
    """Copy ``source`` to ``target`` atomically, checking its sha256 on the way."""
    digest = hashlib.sha256()
    try:
        with source.open("rb") as reader, atomic_open(target, "wb") as writer:
            while chunk := reader.read(1 << 20):
                digest.update(chunk)
                writer.write(chunk)
            if digest.hexdigest() != content_hash:
                raise PoolError(
                    f"{source} changed since it was embedded (content hash differs); "
                    "run the pipeline again (dvc repro -f) to re-embed it"
                )
    except OSError as err:
        raise PoolError(f"cannot copy {source} into the pool: {err}") from err


def open_pool(pool_dir: Path, *, lock_file: Path) -> pd.DataFrame | None:
    """What every stage does first: recover, refuse a pool not pulled, read and validate.

    Returns the pool's rows, or None when the pool does not exist yet.
    Raises :class:`PoolError` (see :func:`~datapool.pool.ensure_pool_present`
    and :func:`~datapool.pool.read_pool`).
    """
    table = recover(pool_dir) if pool_dir.is_dir() else None
    ensure_pool_present(pool_dir, lock_file=lock_file)
    return table
