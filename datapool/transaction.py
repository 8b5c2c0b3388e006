"""Writing a pool version as one transaction, and recovering after a crash.

A version is ``datapool_latest.csv`` + ``checkpoint_latest.ckpt`` + the images
the CSV references. Each file can be replaced atomically, but not two at once,
so a new version is first staged in ``.incoming/`` and marked ``COMPLETE``;
only then are the files renamed into place. :func:`recover` finishes an
interrupted rename (roll forward, if the mark exists) or discards the stage
(roll back), and removes images no row references. Whatever instant a run is
killed at, after recovery the pool is exactly the old or exactly the new version.
A table is validated before any image is deleted by it: a damaged table stops
recovery with a message instead of taking the recorded version's images with it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from datapool.atomic import atomic_open, fsync_dir
from datapool.errors import PoolError
from datapool.pool import (
    CHECKPOINT,
    IMAGES_DIR,
    POOL_CSV,
    ensure_pool_present,
    read_pool,
    stored_image,
    write_table,
)

INCOMING = ".incoming"
COMPLETE = "COMPLETE"


def save_pool(
    pool_dir: Path, table: pd.DataFrame, *, checkpoint: Path | None, sources: Mapping[str, Path]
) -> None:
    """Make ``table`` (with the model in ``checkpoint``) the pool's current version.

    ``sources`` maps content hash -> original file for rows whose image the pool
    does not hold yet; each is copied to :func:`~datapool.pool.stored_image` and
    must still have that hash, else :class:`PoolError` (missing, or changed since
    it was embedded) and the pool is left as it was. ``checkpoint=None`` leaves
    the pool without a model (an imported pool's embeddings have none).
    """
    recover(pool_dir)
    try:
        _stage(pool_dir, table, checkpoint=checkpoint, sources=sources)
    except BaseException:
        recover(pool_dir)  # no COMPLETE mark yet: drops the stage and the images it copied
        raise
    _apply(pool_dir, table)


def _stage(
    pool_dir: Path, table: pd.DataFrame, *, checkpoint: Path | None, sources: Mapping[str, Path]
) -> None:
    """Copy the new images in, write the table and model to the stage, then mark it COMPLETE."""
    staging = pool_dir / INCOMING
    # The stage exists before the first image is copied, so recovery knows that
    # images no table references, beside an unmarked stage, are its leftovers.
    staging.mkdir(parents=True)
    for digest, name in zip(table["content_hash"], table["filenames"], strict=True):
        target = stored_image(pool_dir, content_hash=str(digest), filename=str(name))
        if not target.exists():
            if str(digest) not in sources:
                raise PoolError(f"the image of {name!r} ({str(digest)[:12]}) is missing")
            _copy_verified(sources[str(digest)], target, content_hash=str(digest))
    write_table(table, staging / POOL_CSV)
    current = pool_dir / CHECKPOINT
    if checkpoint is not None and (
        not current.exists() or current.read_bytes() != checkpoint.read_bytes()
    ):
        with atomic_open(staging / CHECKPOINT, "wb") as handle:
            handle.write(checkpoint.read_bytes())
    fsync_dir(staging)
    with atomic_open(staging / COMPLETE, "w") as handle:
        handle.write("staged version complete; safe to apply\n")


def create_pool(
    pool_dir: Path, table: pd.DataFrame, *, checkpoint: Path | None, sources: Mapping[str, Path]
) -> None:
    """A new pool at ``pool_dir`` (see :func:`save_pool`); nothing is left behind on failure.

    Raises :class:`PoolError` if the folder already exists or an image is missing/changed.
    """
    if pool_dir.exists():
        raise PoolError(f"{pool_dir} already exists; choose a new pool name")
    try:
        save_pool(pool_dir, table, checkpoint=checkpoint, sources=sources)
    except BaseException:
        shutil.rmtree(pool_dir, ignore_errors=True)
        raise


def recover(pool_dir: Path) -> pd.DataFrame | None:
    """Bring a pool left by an interrupted :func:`save_pool` to a whole version.

    Returns the pool's rows, validated (:func:`~datapool.pool.read_pool`), or
    None when it has no table. Every table is validated before any image is
    deleted, and an image goes only when the version it ends with does not
    reference it (an abandoned stage's copies, a previous version's images).
    Raises :class:`PoolError` naming the file (and row) and deletes nothing when
    the current table or a staged one marked complete does not validate: it is
    not a version, and sweeping by it would drop the recorded version's images.
    """
    staging = pool_dir / INCOMING
    if (staging / COMPLETE).exists():
        # Roll forward; the staged table may already be in place (killed mid-apply).
        source = staging if (staging / POOL_CSV).exists() else pool_dir
        table = _valid_table(source, advice=f"remove {staging} to keep the current version")
        if table is None:
            raise PoolError(f"{staging} is marked complete but holds no table; remove it")
        _apply(pool_dir, table)
        return table
    abandoned = staging.exists()
    if abandoned:
        shutil.rmtree(staging)
    elif not (pool_dir / POOL_CSV).exists():
        return None  # no table and no stage: the images are no stage's leftovers, keep them
    table = _valid_table(
        pool_dir,
        advice=f"bring back the recorded version with `dvc checkout {pool_dir.parent.name}/"
        f"{pool_dir.name}` (or delete {pool_dir / POOL_CSV} if no commit recorded it)",
    )
    _sweep_images(pool_dir, table)
    return table


def _apply(pool_dir: Path, table: pd.DataFrame) -> None:
    """Rename the staged files into place (checkpoint, then CSV) and sweep by ``table``,
    the staged rows; idempotent."""
    staging = pool_dir / INCOMING
    for name in (CHECKPOINT, POOL_CSV):
        if (staging / name).exists():
            (staging / name).replace(pool_dir / name)
    fsync_dir(pool_dir)
    _sweep_images(pool_dir, table)
    shutil.rmtree(staging)


def _valid_table(folder: Path, *, advice: str) -> pd.DataFrame | None:
    """``read_pool(folder)``; its :class:`PoolError` says no image was deleted, and ``advice``."""
    try:
        return read_pool(folder)
    except PoolError as err:
        raise PoolError(f"{err}; no pool image was deleted: {advice}") from err


def _sweep_images(pool_dir: Path, table: pd.DataFrame | None) -> None:
    """Delete stored images the validated ``table`` does not reference (all, for None)."""
    images = pool_dir / IMAGES_DIR
    if not images.is_dir():
        return
    keep: set[str] = set()
    if table is not None:
        keep = {
            stored_image(pool_dir, content_hash=str(h), filename=str(f)).name
            for h, f in zip(table["content_hash"], table["filenames"], strict=True)
        }
    for stale in images.iterdir():
        if stale.name not in keep:
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
