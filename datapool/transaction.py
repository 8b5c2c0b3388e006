"""Writing a pool version as one transaction, and recovering after a crash.

A version is ``datapool_latest.csv`` + ``checkpoint_latest.ckpt`` + the images
the CSV references. Each file can be replaced atomically, but not two at once,
so a new version is first staged in ``.incoming/`` and marked ``COMPLETE``;
only then are the files renamed into place. :func:`recover` finishes an
interrupted rename (roll forward, if the mark exists) or discards the stage
(roll back), and removes images no row references. Whatever instant a run is
killed at, after recovery the pool is exactly the old or exactly the new version.
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
    for digest, name in zip(table["content_hash"], table["filenames"], strict=True):
        target = stored_image(pool_dir, content_hash=str(digest), filename=str(name))
        if not target.exists():
            if str(digest) not in sources:
                raise PoolError(f"the image of {name!r} ({str(digest)[:12]}) is missing")
            _copy_verified(sources[str(digest)], target, content_hash=str(digest))
    staging = pool_dir / INCOMING
    shutil.rmtree(staging, ignore_errors=True)
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
    _apply(pool_dir)


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


def recover(pool_dir: Path) -> None:
    """Bring a pool left by an interrupted :func:`save_pool` to a whole version."""
    staging = pool_dir / INCOMING
    if staging.exists():
        if (staging / COMPLETE).exists():
            _apply(pool_dir)
            return
        shutil.rmtree(staging)
    _sweep_images(pool_dir)


def _apply(pool_dir: Path) -> None:
    """Rename the staged files into place (checkpoint, then CSV); idempotent."""
    staging = pool_dir / INCOMING
    for name in (CHECKPOINT, POOL_CSV):
        if (staging / name).exists():
            (staging / name).replace(pool_dir / name)
    fsync_dir(pool_dir)
    _sweep_images(pool_dir)
    shutil.rmtree(staging)


def _sweep_images(pool_dir: Path) -> None:
    """Delete stored images that the current CSV does not reference."""
    images = pool_dir / IMAGES_DIR
    if not images.is_dir():
        return
    keep: set[str] = set()
    if (pool_dir / POOL_CSV).exists():
        rows = pd.read_csv(
            pool_dir / POOL_CSV,
            usecols=["filenames", "content_hash"],
            dtype=str,
            keep_default_na=False,
        )
        keep = {
            stored_image(pool_dir, content_hash=h, filename=f).name
            for h, f in zip(rows["content_hash"], rows["filenames"], strict=True)
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
    if pool_dir.is_dir():
        recover(pool_dir)
    ensure_pool_present(pool_dir, lock_file=lock_file)
    return read_pool(pool_dir)
