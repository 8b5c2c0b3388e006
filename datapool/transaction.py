"""Writing a pool version as one transaction, and recovering after a crash.

A version is the manifest, the shards it lists, the image packs it lists
(``images/batch-*.zip``, :mod:`datapool.packs`), ``checkpoint_latest.ckpt`` and
(for pools up to ``csv_max_rows``) the derived ``datapool_latest.csv``
(:mod:`datapool.store`). Each file can be replaced atomically, but not several
at once, so a new version is first staged in ``.incoming/`` -- the shards and
packs that changed, the manifest, the CSV, the checkpoint -- and marked
``COMPLETE``; only then are the files renamed into place, the manifest last.
Nothing is written outside ``.incoming/`` before the mark. :func:`recover`
finishes an interrupted rename (roll forward, if the mark exists) or discards
the stage (roll back), and removes shards and packs the version does not list.
Whatever instant a run is killed at, after recovery the pool is exactly the old
or exactly the new version. A version is validated before anything is deleted
by it: a damaged table stops recovery with a message instead of taking the
recorded version's images with it.

Work is proportional to the rows written: a save opens only the packs it
rewrites (to take the images it keeps from them), never an untouched batch's.

Migration: a pool written before the shards (its CSV alone), or before the
packs (loose ``images/<hash><ext>``, manifest format ``datapool-pool/1``), is
read as it is; its next save packs every batch's images from the loose files
and removes those after the new manifest is in place (:meth:`Saved.note` says so).

Test hook: :func:`datapool.version.crash_point` ``staged`` (after the mark,
before any rename) and ``applying`` (shards and packs renamed in, the manifest
not yet) kill the process there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from datapool.atomic import atomic_open, fsync_dir
from datapool.errors import PoolError
from datapool.packs import Member, Packs, PoolImages, Source, read_source, same_content, write_pack
from datapool.pool import (
    CHECKPOINT,
    IMAGES_DIR,
    POOL_CSV,
    ensure_pool_present,
    image_names,
    read_legacy_pool,
)
from datapool.store import (
    COMPLETE,
    INCOMING,
    MANIFEST,
    PACK_SUFFIX,
    SHARDS,
    Manifest,
    Plan,
    check_columns,
    check_rows,
    csv_base,
    load_pool,
    plan_version,
    read_manifest,
    write_lightly_csv,
    write_rows,
    written_rows,
)
from datapool.version import crash_point

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
        packs_written: image packs written anew (the others were not opened).
        packed: loose images (the layout before packs) this save packed and removed.
    """

    manifest: Manifest
    shards_written: int
    csv: bool
    migrated: bool
    packs_written: int = 0
    packed: int = 0

    def note(self, pool_dir: Path) -> str:
        """One line about the store, for the stage's output; empty when nothing is notable."""
        notes = []
        if self.migrated:
            notes.append(
                f"{pool_dir} migrated from {POOL_CSV} alone to Arrow shards + {MANIFEST} "
                f"({self.manifest.rows} rows); {POOL_CSV} is now derived from them"
            )
        if self.packed:
            notes.append(
                f"{pool_dir}/{IMAGES_DIR}: {self.packed} loose images packed into "
                f"{len(self.manifest.packs)} per-batch ZIPs ({IMAGES_DIR}/batch-*{PACK_SUFFIX}) "
                "and removed"
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
    sources: Mapping[str, Source],
    csv_max_rows: int = CSV_MAX_ROWS,
    latest_batch: str | None = None,
) -> Saved:
    """Make ``table`` (with the model in ``checkpoint``) the pool's current version.

    ``sources`` maps content hash -> where to read an image the pool does not hold
    yet (an original file, or a member of another pool's pack: see
    :func:`datapool.combine.images_of`); each image packed is checked against its
    row's hash, else :class:`PoolError` (missing, or changed since it was embedded)
    and the pool is left as it was. ``checkpoint=None`` leaves the pool without a
    model (an imported pool's embeddings have none). Only the shards whose rows
    changed and the packs whose image set changed are written
    (:func:`datapool.store.plan_version`); a rewritten pack takes the images it
    keeps from the old one. ``datapool_latest.csv`` is written when the pool has at
    most ``csv_max_rows`` rows (0: never) and removed otherwise, so it never shows
    an older version. ``latest_batch`` is the increment writing this version
    (``merge``; see :attr:`datapool.store.Manifest.latest_batch`), recorded in the
    same transaction; None keeps the one recorded now (an edit of rows is no increment).
    """
    source = f"the new version of {pool_dir}"
    check_columns(table, source=source)
    if (pool_dir / INCOMING).exists():
        recover(pool_dir)  # else the last save finished, and the caller read a whole version
    old = read_manifest(pool_dir) if pool_dir.is_dir() else None
    migrated = old is None and (pool_dir / POOL_CSV).is_file()
    if latest_batch is None:
        latest_batch = old.latest_batch if old is not None else ""
    plan = plan_version(table, old, latest_batch=latest_batch)
    table = plan.table  # in shard order, so the CSV lists rows as the shards do
    # what a reader would refuse, in the shards to write (the others were checked before)
    check_rows(table, source=source, only=written_rows(plan))
    csv = 0 < len(table) <= csv_max_rows if csv_max_rows else False
    loose = _loose_images(pool_dir) if old is None or old.loose else 0
    try:
        manifest = _stage(
            pool_dir, table, plan, old=old, checkpoint=checkpoint, sources=sources, csv=csv
        )
    except BaseException:
        recover(pool_dir)  # no COMPLETE mark yet: drops the stage
        raise
    crash_point("staged")
    _apply(pool_dir, table)
    return Saved(
        manifest,
        shards_written=len(plan.writes),
        csv=csv,
        migrated=migrated,
        packs_written=len(plan.packs),
        packed=loose,
    )


def _loose_images(pool_dir: Path) -> int:
    """How many loose images (the layout before packs) ``images/`` holds."""
    try:
        with os.scandir(pool_dir / IMAGES_DIR) as entries:
            return sum(1 for e in entries if not e.name.endswith(PACK_SUFFIX))
    except FileNotFoundError:
        return 0


def _stage(
    pool_dir: Path,
    table: pd.DataFrame,
    plan: Plan,
    *,
    old: Manifest | None,
    checkpoint: Path | None,
    sources: Mapping[str, Source],
    csv: bool,
) -> Manifest:
    """Write the changed packs and shards, manifest, CSV and model to the stage, then
    mark it COMPLETE (listing the staged shards and packs and whether a CSV belongs to it).
    Returns the manifest written (``plan``'s, with the CSV's digest)."""
    staging = pool_dir / INCOMING
    manifest = plan.manifest
    staging.mkdir(parents=True)
    _write_packs(pool_dir, plan, old=old, sources=sources)
    fingerprints = {s.file: s.fingerprint for s in plan.manifest.shards}
    for name, rows in plan.writes.items():
        write_rows(rows, staging / name, fingerprint=fingerprints[name])
    if csv:  # the previous version's file, when it may be continued (O(rows added))
        base = csv_base(pool_dir, old, plan.manifest)
        digest = write_lightly_csv(table, staging / POOL_CSV, base=base)
        manifest = replace(manifest, csv_sha256=digest)
    current = pool_dir / CHECKPOINT
    if checkpoint is not None and (
        not current.exists() or current.read_bytes() != checkpoint.read_bytes()
    ):
        with atomic_open(staging / CHECKPOINT, "wb") as handle:
            handle.write(checkpoint.read_bytes())
    with atomic_open(staging / MANIFEST, "w") as handle:
        handle.write(manifest.to_json())
    for folder in (staging / SHARDS, staging / IMAGES_DIR, staging):
        if folder.is_dir():
            fsync_dir(folder)
    mark = {"csv": csv, "shards": sorted(plan.writes), "packs": sorted(plan.packs)}
    with atomic_open(staging / COMPLETE, "w") as handle:
        handle.write(json.dumps(mark) + "\n")
    return manifest


def _write_packs(
    pool_dir: Path, plan: Plan, *, old: Manifest | None, sources: Mapping[str, Source]
) -> None:
    """Write each pack ``plan`` lists into the stage (see :func:`_image` for where each
    image comes from); every image is checked against its row's content hash."""
    staging = pool_dir / INCOMING
    with PoolImages(pool_dir, manifest=old) as own:
        for file, rows in plan.packs.items():
            names = image_names(rows)
            columns = ("content_hash", "filenames", "batch_id", "source")
            rows_text = rows[list(columns)].astype(str).itertuples(index=False, name=None)
            wanted = dict(zip(names, rows_text, strict=True))

            def read(name: str, wanted: Any = wanted) -> bytes:
                return _image(own, sources, *wanted[name])

            write_pack(staging / file, names, read)


def _image(
    own: PoolImages,
    sources: Mapping[str, Source],
    digest: str,
    filename: str,
    batch_id: str,
    source_dir: str,
) -> bytes:
    """One image to pack, checked against ``digest``, from the first place that has it: the
    pool's own copy (its batch's old pack, or a loose file before the packs), then
    ``sources``, then the row's original ``source_dir/filename`` (a pool whose own copy is
    not checked out; safe, as only the image the row's hash names is taken)."""
    source: Source | None = own.own_copy(content_hash=digest, filename=filename, batch_id=batch_id)
    if isinstance(source, Member) and source.name not in own.packs.names(
        source.pack, source.listed
    ):
        source = None  # a new image of a batch being redone
    if source is None:
        original = Path(source_dir) / filename
        if digest in sources:
            source = sources[digest]
        elif original.is_file():
            source = original
        else:
            raise PoolError(f"the image of {filename!r} ({digest[:12]}) is missing")
    data = read_source(source, own.packs)
    if same_content(data, digest):
        return data
    if isinstance(source, Member):
        raise PoolError(
            f"{source.pack}: image {source.name} does not hash to the content_hash of "
            f"{filename!r}: the pack was edited or damaged"
        )
    raise PoolError(
        f"{source} changed since it was embedded (content hash differs); "
        "run the pipeline again (dvc repro -f) to re-embed it"
    )


def _mark(staging: Path) -> dict[str, Any]:
    """What a COMPLETE mark says: ``{"csv": bool, "shards": [...], "packs": [...]}`` (staged
    files). A mark left by datapool before the shards is plain text: a CSV, no shards."""
    text = (staging / COMPLETE).read_text(encoding="utf-8")
    try:
        mark = json.loads(text)
    except ValueError:
        mark = None
    if not isinstance(mark, dict):
        mark = {"csv": True}
    return {"shards": [], "packs": [], **mark}


def create_pool(
    pool_dir: Path, table: pd.DataFrame, *, checkpoint: Path | None, sources: Mapping[str, Source]
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
    deleted, and a shard, pack or loose image goes only when the version it ends
    with does not reference it (a previous version's files, an older datapool's
    abandoned image copies).
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
    mark = _mark(staging)
    untouched = all((staging / name).is_file() for name in [*mark["shards"], *mark["packs"]])
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
    table = _valid_table(pool_dir, overlay=staging, advice=advice)
    _check_staged_packs(staging, mark["packs"], advice=advice)
    return table


def _check_staged_packs(staging: Path, files: list[str], *, advice: str) -> None:
    """Each pack still in the stage opens and holds what the staged manifest lists."""
    manifest = read_manifest(staging)
    listed = {p.file: p for p in (manifest.packs if manifest is not None else [])}
    with Packs() as packs:
        for file in files:
            if (staging / file).is_file():
                try:
                    if file not in listed:
                        raise PoolError(f"{staging / file} is a pack the staged manifest lacks")
                    packs.names(staging / file, listed[file])
                except PoolError as err:
                    raise PoolError(f"{err}; no pool image was deleted: {advice}") from err


def _checkout_advice(pool_dir: Path) -> str:
    return (
        f"bring back the recorded version with `dvc checkout {pool_dir.parent.name}/"
        f"{pool_dir.name}` (or delete {pool_dir} if no commit recorded it)"
    )


def _apply(pool_dir: Path, table: pd.DataFrame | None) -> None:
    """Rename the staged files into place (shards and packs, checkpoint, CSV, then the
    manifest) and sweep by the new manifest (``table``: its rows); idempotent."""
    staging = pool_dir / INCOMING
    for folder in (SHARDS, IMAGES_DIR):
        staged = staging / folder
        if staged.is_dir():
            (pool_dir / folder).mkdir(exist_ok=True)
            for file in sorted(staged.iterdir()):
                file.replace(pool_dir / folder / file.name)
            fsync_dir(pool_dir / folder)
    crash_point("applying")
    for name in (CHECKPOINT, POOL_CSV):
        if (staging / name).exists():
            (staging / name).replace(pool_dir / name)
    if not _mark(staging)["csv"]:
        (pool_dir / POOL_CSV).unlink(missing_ok=True)  # would show an older version
    if (staging / MANIFEST).exists():
        (staging / MANIFEST).replace(pool_dir / MANIFEST)
    fsync_dir(pool_dir)
    _sweep(pool_dir, table)
    shutil.rmtree(staging)


def _valid_table(folder: Path, *, advice: str, overlay: Path | None = None) -> pd.DataFrame | None:
    """``load_pool(folder)``; its :class:`PoolError` says nothing was deleted, and ``advice``."""
    try:
        return load_pool(folder, overlay=overlay)
    except PoolError as err:
        raise PoolError(f"{err}; no pool image was deleted: {advice}") from err


def _sweep(pool_dir: Path, table: pd.DataFrame | None) -> None:
    """Delete what the current version does not reference: in ``images/``, every file but
    the packs the manifest lists (so, after a migration, the loose images); in a pool
    before the packs, the loose images the validated ``table`` does not reference (all,
    for None). Then shards the manifest does not list. Lists ``images/``: O(batches)
    once a pool has packs."""
    manifest = read_manifest(pool_dir)
    images = pool_dir / IMAGES_DIR
    if images.is_dir():
        if manifest is not None and not manifest.loose:
            keep = {Path(p.file).name for p in manifest.packs}
        else:
            keep = set(image_names(table)) if table is not None else set()
        for stale in images.iterdir():
            if stale.name not in keep and stale.is_file():
                stale.unlink()
    _sweep_shards(pool_dir, manifest)


def _sweep_shards(pool_dir: Path, manifest: Manifest | None) -> None:
    """Delete shard files ``manifest`` (the current one) does not list."""
    shards = pool_dir / SHARDS
    if shards.is_dir() and manifest is not None:
        listed = {Path(s.file).name for s in manifest.shards}
        for stale in shards.iterdir():
            if stale.name not in listed:
                stale.unlink()


def open_pool(pool_dir: Path, *, lock_file: Path) -> pd.DataFrame | None:
    """What every stage does first: recover, refuse a pool not pulled, read and validate.

    Returns the pool's rows, or None when the pool does not exist yet.
    Raises :class:`PoolError` (see :func:`~datapool.pool.ensure_pool_present`
    and :func:`~datapool.pool.read_pool`).
    """
    table = recover(pool_dir) if pool_dir.is_dir() else None
    ensure_pool_present(pool_dir, lock_file=lock_file)
    return table
