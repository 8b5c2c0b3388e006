"""A pool's table: its columns, the checks every reader applies, and Lightly's CSV.

In memory a pool (or a batch of candidates) is a wide table in Lightly's
embeddings convention -- ``filenames``, ``embedding_0`` .. ``embedding_{D-1}``,
``labels`` -- followed by our own columns (:data:`EXTRA_COLUMNS`) and any user
columns. On disk it is stored as Arrow shards (:mod:`datapool.store`); the CSV
functions here read and write Lightly's CSV (import, export, the derived
``datapool_latest.csv``, and pools written before the shards existed, which
:func:`read_pool` still reads). CSV writes go to a temp file in the same folder
and are renamed over the old file, so a reader never sees half a file.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from datapool.atomic import atomic_open
from datapool.errors import PoolError

POOL_CSV = "datapool_latest.csv"
CHECKPOINT = "checkpoint_latest.ckpt"
IMAGES_DIR = "images"  # the pool's own copies of its images, named by content hash

# Our columns after Lightly's: identity of the image, the batch that added it,
# the model that embedded it, and where it stood in its batch's pick order.
EXTRA_COLUMNS = ("content_hash", "batch_id", "model_id", "source", "pick_rank", "pick_distance")
TEXT_COLUMNS = ("filenames", "labels", "content_hash", "batch_id", "model_id", "source")
_EMBEDDING = re.compile(r"embedding_(\d+)")
# A content hash names files (the pool's copy is images/<hash><ext>), so only a
# sha256 digest in lowercase hex is accepted: "/etc/passwd" or "../x" would name
# files outside the pool.
_CONTENT_HASH = re.compile(r"[0-9a-f]{64}")
# float32 needs 9 significant digits to survive a text round trip exactly.
FLOAT_FORMAT = "%.9g"


def embedding_columns(dim: int) -> list[str]:
    """``["embedding_0", ..., "embedding_{dim-1}"]``."""
    return [f"embedding_{i}" for i in range(dim)]


def column_order(dim: int, extra: Sequence[str] = EXTRA_COLUMNS) -> list[str]:
    """Lightly's columns first (filenames, embeddings, labels), then ours."""
    return ["filenames", *embedding_columns(dim), "labels", *extra]


def embedding_dim(table: pd.DataFrame) -> int:
    """Number D of ``embedding_*`` columns of a validated table."""
    return sum(1 for c in table.columns if _EMBEDDING.fullmatch(str(c)))


def embeddings_of(table: pd.DataFrame) -> np.ndarray:
    """The embeddings of a validated table as float32 ``[rows, D]``."""
    cols = embedding_columns(embedding_dim(table))
    return table[cols].to_numpy(dtype=np.float32, copy=True).reshape(len(table), len(cols))


def read_table(path: Path, *, required: Sequence[str] = EXTRA_COLUMNS) -> pd.DataFrame:
    """Read and validate an embeddings CSV (a pool or a batch of candidates).

    Checks that ``filenames``, ``labels``, ``required`` and a contiguous run of
    ``embedding_0..D-1`` columns exist, that every embedding is a finite
    number, and that every ``content_hash`` (when the column exists) is one
    (:func:`is_content_hash`). Raises :class:`PoolError` naming the file, and
    the row (1-based, as a spreadsheet counts data rows) and column at fault.
    """
    if not path.is_file():
        raise PoolError(f"{path} does not exist")
    try:
        # Every column but the numbers is text as written: a user's column of codes
        # (007, 0123) must not become 7 and 123, least of all when migrated to shards.
        header = pd.read_csv(path, nrows=0).columns
        numeric = {"pick_rank", "pick_distance"}
        text = [c for c in header if not _EMBEDDING.fullmatch(str(c)) and c not in numeric]
        table = pd.read_csv(
            path,
            dtype=dict.fromkeys(text, str),
            keep_default_na=False,
            na_values={c: [] for c in text},
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PoolError(f"{path} is not a readable CSV: {err}") from err
    _check_columns(table, path, required)
    _check_embeddings(table, path)
    _check_hashes(table, path)
    return table


def _check_columns(table: pd.DataFrame, path: Path, required: Sequence[str]) -> None:
    missing = [c for c in ("filenames", "labels", *required) if c not in table.columns]
    if missing:
        raise PoolError(f"{path} lacks column(s) {', '.join(missing)}")
    numbers = sorted(int(m.group(1)) for c in table.columns if (m := _EMBEDDING.fullmatch(str(c))))
    if not numbers:
        raise PoolError(f"{path} has no embedding_* columns")
    if numbers != list(range(len(numbers))):
        gap = next(i for i, n in enumerate(numbers) if n != i)
        raise PoolError(
            f"{path}: embedding columns are not embedding_0..embedding_{len(numbers) - 1} "
            f"(embedding_{gap} is missing)"
        )


def _check_embeddings(table: pd.DataFrame, path: Path) -> None:
    for column in embedding_columns(embedding_dim(table)):
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            row = int(bad[0])
            raise PoolError(
                f"{path}: row {row + 1} (filenames={table['filenames'].iloc[row]!r}), column "
                f"{column}: {table[column].iloc[row]!r} is not a finite number"
            )
        table[column] = values.astype(np.float32)


def is_content_hash(value: object) -> bool:
    """True for a sha256 digest written as 64 lowercase hex digits."""
    return isinstance(value, str) and _CONTENT_HASH.fullmatch(value) is not None


def _check_hashes(table: pd.DataFrame, path: Path) -> None:
    if "content_hash" not in table.columns:
        return
    for row, value in enumerate(table["content_hash"]):
        if not is_content_hash(value):
            raise PoolError(
                f"{path}: row {row + 1} (filenames={table['filenames'].iloc[row]!r}), column "
                f"content_hash: {value!r} is not a content hash (the image's sha256 as 64 "
                "lowercase hex digits)"
            )


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` as CSV to ``path`` atomically: temp file, fsync, rename."""
    with atomic_open(path, "w") as handle:
        table.to_csv(handle, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")


def read_pool(pool_dir: Path) -> pd.DataFrame | None:
    """The pool's rows, validated, or None when the pool has not been created yet.

    Reads the shards (:func:`datapool.store.load_pool`), or the CSV of a pool
    written before they existed. Raises :class:`PoolError`.
    """
    from datapool.store import load_pool  # store imports this module's layout helpers

    return load_pool(pool_dir)


def read_legacy_pool(pool_dir: Path) -> pd.DataFrame | None:
    """A pool written before the shards: ``datapool_latest.csv`` alone, validated, with
    unique content hashes; None when there is no such file. Raises :class:`PoolError`."""
    path = pool_dir / POOL_CSV
    if not path.exists():
        return None
    table = read_table(path)
    repeated = table["content_hash"].duplicated()
    if repeated.any():
        row = int(np.flatnonzero(repeated.to_numpy())[0])
        raise PoolError(
            f"{path}: row {row + 1} (filenames={table['filenames'].iloc[row]!r}) repeats the "
            f"content_hash of an earlier row; each image may appear once"
        )
    return table


def ensure_pool_present(pool_dir: Path, *, lock_file: Path) -> None:
    """Refuse to go on when DVC recorded a non-empty pool that is not in the workspace.

    This is the fresh-clone trap: without ``dvc pull`` the pool folder is absent,
    and running on would rebuild the pool from the newest batch alone.
    Raises :class:`PoolError` with the command to run.
    """
    from datapool.store import pool_exists

    if pool_exists(pool_dir) or not lock_file.is_file():
        return
    lock = yaml.safe_load(lock_file.read_text(encoding="utf-8")) or {}
    # dvc.lock names outputs relative to its own folder; compare real paths, so the
    # guard also holds for a stage given an absolute or differently spelled --pool-dir.
    root = lock_file.resolve().parent
    wanted = pool_dir.resolve()
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            path = (root / str(out.get("path", ""))).resolve()
            if path == wanted and int(out.get("nfiles", 0)) > 0:
                raise PoolError(
                    f"{lock_file} records pool {wanted} ({out.get('nfiles')} files, "
                    f"{out.get('md5') or out.get('hash')}) but it is missing from the workspace. "
                    "Fetch it with `dvc pull` (or `dvc repro --pull`), or `dvc checkout` if it is "
                    "in the local cache; refusing to rebuild the pool from this batch alone."
                )


def known_embeddings(pool: pd.DataFrame | None, *, model_id: str) -> dict[str, np.ndarray]:
    """``{content_hash: embedding [D] float32}`` of pool rows embedded by ``model_id``."""
    if pool is None:
        return {}
    same = pool[pool["model_id"] == model_id]
    return dict(zip(same["content_hash"], embeddings_of(same), strict=True))


def image_name(content_hash: str, filename: str) -> str:
    """``<content_hash><suffix>``: the file name of an image in the pool's ``images/``.

    The suffix is the lowercased extension of ``filename``'s last component when
    it is letters and digits only (``.png``, ``.jpeg``), else none; so any name
    (``..``, odd characters) gives a safe file name. No check of the hash here
    (see :func:`stored_image`).
    """
    name = filename.rstrip("/").rpartition("/")[2]
    dot = name.rfind(".")  # as Path(filename).suffix reads it, without building a Path
    suffix = name[dot:].lower() if 0 < dot < len(name) - 1 else ""
    return content_hash + (suffix if suffix[1:].isalnum() else "")


def image_names(table: pd.DataFrame) -> list[str]:
    """:func:`image_name` of every row of ``table``, in order."""
    # tolist() first: iterating a pandas (Arrow-backed) text column boxes each value slowly.
    hashes, files = table["content_hash"].tolist(), table["filenames"].tolist()
    return [image_name(str(h), str(f)) for h, f in zip(hashes, files, strict=True)]


def stored_image(pool_dir: Path, *, content_hash: str, filename: str) -> Path:
    """Where the pool keeps its own copy of an image: ``images/<content_hash><suffix>``.

    Named by content, so the copy is safe whatever the original name held
    (``..``, absolute paths, odd characters) and equal images share one file.
    Raises :class:`PoolError` if ``content_hash`` is not one (see
    :func:`is_content_hash`): it would name a file outside the pool.
    """
    if not is_content_hash(content_hash):
        raise PoolError(
            f"{content_hash!r} is not a content hash (64 lowercase hex digits), so it names no "
            f"image of {pool_dir}"
        )
    return pool_dir / IMAGES_DIR / image_name(content_hash, filename)
