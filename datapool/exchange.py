"""Trading pools with other tools: Lightly's embeddings CSV, a file list, an image folder.

Export writes, into one folder::

    embeddings.csv   filenames,embedding_0..embedding_{D-1},labels  (Lightly's layout)
    filenames.txt    one image path per line, relative to images/
    images/          a copy of every pooled image, at the path the CSV names

Import reads such a CSV (``masked`` and ``selected`` columns are accepted and
dropped; every row is kept) plus the folder its ``filenames`` are relative to,
and builds a new pool from it.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from datapool.combine import image_of, load
from datapool.errors import PoolError
from datapool.images import content_hash
from datapool.pool import (
    column_order,
    embedding_columns,
    embedding_dim,
    embeddings_of,
    read_table,
    write_table,
)
from datapool.transaction import create_pool

EMBEDDINGS_CSV = "embeddings.csv"
FILE_LIST = "filenames.txt"
IMAGES = "images"
LIGHTLY_OPTIONAL = ("masked", "selected")


@dataclass(frozen=True)
class Exported:
    """What :func:`export_pool` wrote: row count and the three outputs' paths."""

    rows: int
    csv: Path
    file_list: Path
    images: Path


def export_names(table: pd.DataFrame) -> list[str]:
    """A unique, safe relative path per row: its ``filenames`` when that is a plain
    relative path not taken yet, else ``<stem>_<hash12><suffix>`` beside it."""
    names: list[str] = []
    taken: set[str] = set()
    for name, digest in zip(table["filenames"], table["content_hash"], strict=True):
        path = PurePosixPath(str(name))
        if path.is_absolute() or ".." in path.parts or not path.name or str(path) in taken:
            path = path.parent / f"{path.stem}_{str(digest)[:12]}{path.suffix}"
            if path.is_absolute() or ".." in path.parts:
                path = PurePosixPath(f"{str(digest)[:12]}{path.suffix}")
        taken.add(str(path))
        names.append(str(path))
    return names


def export_pool(pool_dir: Path, out_dir: Path) -> Exported:
    """Write the pool's Lightly CSV, file list and images into ``out_dir``.

    Raises :class:`PoolError` if the pool does not exist, ``out_dir`` already
    holds an export, or an image is neither in the pool nor at its source.
    """
    table = load(pool_dir)
    csv, listing, images = out_dir / EMBEDDINGS_CSV, out_dir / FILE_LIST, out_dir / IMAGES
    if csv.exists() or images.exists():
        raise PoolError(f"{out_dir} already holds an export; choose an empty folder")
    names = export_names(table)
    for name, (_, row) in zip(names, table.iterrows(), strict=True):
        source = image_of(pool_dir, row)
        if not source.is_file():
            raise PoolError(
                f"the image of {row['filenames']!r} is neither in {pool_dir} nor at {source}"
            )
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, images / name)
    lightly = table[["filenames", *embedding_columns(embedding_dim(table)), "labels"]].copy()
    lightly["filenames"] = names
    write_table(lightly, csv)
    listing.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return Exported(rows=len(table), csv=csv, file_list=listing, images=images)


def read_lightly(path: Path) -> pd.DataFrame:
    """A Lightly embeddings CSV: ``filenames``, ``embedding_*``, ``labels`` (others dropped).

    Raises :class:`PoolError` naming the file and row for malformed content.
    """
    table = read_table(path, required=())
    dim = embedding_dim(table)
    return table[["filenames", *embedding_columns(dim), "labels"]].reset_index(drop=True)


def normalised(table: pd.DataFrame, path: Path) -> np.ndarray:
    """The table's embeddings scaled to unit length; PoolError for an all-zero row."""
    vectors = embeddings_of(table)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise PoolError(
            f"{path}: row {zero[0] + 1} ({table['filenames'].iloc[zero[0]]!r}) has an all-zero "
            "embedding, which has no direction"
        )
    unit: np.ndarray = (vectors / norms).astype(np.float32)
    return unit


def import_table(csv: Path, images_dir: Path) -> tuple[pd.DataFrame, dict[str, Path], int]:
    """Build pool rows from a Lightly CSV whose filenames are relative to ``images_dir``.

    Returns ``(table, {content hash: image file}, duplicates dropped)``. Every
    row's image must exist (a pool holds its images). The embeddings' model is
    unknown, so ``model_id`` is ``imported-<sha256 of the CSV>``: such a pool is
    never compared with another model's embeddings. Embeddings are
    L2-normalised; ``pick_rank`` is the CSV order and ``pick_distance`` empty.
    Raises :class:`PoolError` naming the file and row at fault.
    """
    table = read_lightly(csv)
    tag = hashlib.sha256(csv.read_bytes()).hexdigest()[:16]
    files: dict[str, Path] = {}
    hashes: list[str] = []
    for row, name in enumerate(table["filenames"], start=1):
        path = images_dir / str(name)
        if not path.is_file():
            raise PoolError(f"{csv}: row {row} names {name!r}, but {path} does not exist")
        hashes.append(content_hash(path))
        files.setdefault(hashes[-1], path)
    dim = embedding_dim(table)
    table[embedding_columns(dim)] = normalised(table, csv)
    table["content_hash"] = hashes
    table["batch_id"] = f"imported-{tag}"
    table["model_id"] = f"imported-{tag}"
    table["source"] = str(images_dir.resolve())
    unique = table[~table["content_hash"].duplicated()].reset_index(drop=True)
    unique["pick_rank"] = np.arange(1, len(unique) + 1)
    unique["pick_distance"] = np.nan
    return unique.reindex(columns=column_order(dim)), files, len(table) - len(unique)


def import_pool(csv: Path, images_dir: Path, pool_dir: Path) -> tuple[int, int]:
    """Create ``pool_dir`` from a Lightly CSV; returns ``(rows, duplicates dropped)``."""
    table, files, duplicates = import_table(csv, images_dir)
    create_pool(pool_dir, table, sources=files, checkpoint=None)
    return len(table), duplicates
