"""Trading pools with other tools: Lightly's embeddings CSV, a file list, an image folder.

Export writes, into one folder::

    embeddings.csv   filenames,embedding_0..embedding_{D-1},labels  (Lightly's layout)
    labels.json      {"0": "cats", "1": "dogs", ...}: the name of each integer label
    filenames.txt    one image path per line, relative to images/
    images/          a copy of every pooled image, at the path the CSV names: loose
                     files (the pool itself packs them per batch, see datapool.packs)

Lightly's ``load_embeddings`` reads labels with ``int()``, so the CSV holds
integers: the pool's distinct label names in sorted order, numbered from 0 (as
torchvision's ``ImageFolder`` numbers class folders); an unlabelled pool's ``""``
is a name like any other. An export is staged in a hidden folder and renamed
into place, so a failed export leaves nothing behind.

Import reads such a CSV (``masked`` and ``selected`` columns are accepted and
dropped; every row is kept) plus the folder its ``filenames`` are relative to,
and builds a new pool from it. Only files inside that folder are taken: a name
that is absolute, holds ``..``, or resolves (through links) outside it is
refused. With a ``labels.json`` beside the CSV its names replace the integer
labels; without one the labels are kept as written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd

from datapool.combine import load
from datapool.errors import PoolError
from datapool.images import content_hash
from datapool.packs import PoolImages
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
LABEL_MAP = "labels.json"
IMAGES = "images"
LIGHTLY_OPTIONAL = ("masked", "selected")


@dataclass(frozen=True)
class Exported:
    """What :func:`export_pool` wrote: row count and the four outputs' paths."""

    rows: int
    csv: Path
    file_list: Path
    images: Path
    label_map: Path


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


def label_numbers(labels: Iterable[object]) -> tuple[list[int], dict[int, str]]:
    """Integer labels for Lightly, and the name of each: distinct names sorted, numbered from 0."""
    texts = [str(v) for v in labels]
    names = sorted(set(texts))
    number = {name: i for i, name in enumerate(names)}
    return [number[t] for t in texts], dict(enumerate(names))


def _write_export(pool_dir: Path, table: pd.DataFrame, folder: Path) -> None:
    """Write the four outputs of an export of ``table`` into ``folder``.

    Images are written as loose files (that is what a labelling tool opens), each
    the exact bytes of the pool's copy (its pack member) or, when the pool does not
    hold it, of the original -- checked against the row's content hash either way
    (:meth:`datapool.packs.PoolImages.read`), so no other file can be exported.
    """
    names = export_names(table)
    with PoolImages(pool_dir) as images:
        for name, (_, row) in zip(names, table.iterrows(), strict=True):
            data = images.read(row)
            try:
                (folder / IMAGES / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / IMAGES / name).write_bytes(data)
            except OSError as err:
                raise PoolError(f"cannot export the image of {row['filenames']!r}: {err}") from err
    numbers, label_map = label_numbers(table["labels"])
    lightly = table[["filenames", *embedding_columns(embedding_dim(table)), "labels"]].copy()
    lightly["filenames"] = names
    lightly["labels"] = numbers
    write_table(lightly, folder / EMBEDDINGS_CSV)
    (folder / LABEL_MAP).write_text(
        json.dumps({str(k): v for k, v in label_map.items()}, ensure_ascii=False, indent=2) + "\n",
        encoding="utf-8",
    )
    (folder / FILE_LIST).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")


def export_pool(pool_dir: Path, out_dir: Path) -> Exported:
    """Write the pool's Lightly CSV, label map, file list and images into ``out_dir``.

    Raises :class:`PoolError` if the pool does not exist or is invalid, ``out_dir``
    already holds an export, or an image is neither in the pool nor at its source
    with the row's content hash; ``out_dir`` is then left as it was.
    """
    table = load(pool_dir)
    outputs = (IMAGES, FILE_LIST, LABEL_MAP, EMBEDDINGS_CSV)  # the CSV last: it completes one
    if any((out_dir / n).exists() or (out_dir / n).is_symlink() for n in outputs):
        raise PoolError(f"{out_dir} already holds an export; choose an empty folder")
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        _write_export(pool_dir, table, staging)
        for name in outputs:
            (staging / name).replace(out_dir / name)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    staging.rmdir()
    return Exported(
        rows=len(table),
        csv=out_dir / EMBEDDINGS_CSV,
        file_list=out_dir / FILE_LIST,
        images=out_dir / IMAGES,
        label_map=out_dir / LABEL_MAP,
    )


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


def image_inside(images_dir: Path, name: str, *, csv: Path, row: int) -> Path:
    """The file that row ``row`` of ``csv`` names, links resolved, which must lie in ``images_dir``.

    An import copies what the CSV names into the pool (and from there to every
    DVC remote), so a CSV must not reach ``/etc/passwd`` by an absolute path,
    ``..`` or a link. Raises :class:`PoolError` naming the row otherwise, or
    when the file does not exist.
    """
    relative = PurePosixPath(name)
    if not name or relative.is_absolute() or ".." in relative.parts or "\0" in name:
        raise PoolError(
            f"{csv}: row {row} names {name!r}, which is not a relative path inside the images "
            f"folder {images_dir}; absolute paths, '..' and NUL characters are refused as outside"
        )
    try:
        path = (images_dir / name).resolve()
    except RuntimeError as err:  # Python < 3.13 raises this for a link loop
        raise PoolError(f"{csv}: row {row} names {name!r}, which is a link loop: {err}") from err
    if not path.is_relative_to(images_dir.resolve()):
        raise PoolError(
            f"{csv}: row {row} names {name!r}, a link to {path}, outside the images folder "
            f"{images_dir}; only files inside it are imported"
        )
    if not path.is_file():
        raise PoolError(f"{csv}: row {row} names {name!r}, but {images_dir / name} does not exist")
    return path


def read_label_map(path: Path) -> dict[int, str]:
    """``{number: name}`` from a ``labels.json`` as :func:`export_pool` writes it.

    Raises :class:`PoolError` naming the file if it is not a JSON object of
    integer keys ("0", "1", ...) and text names.
    """
    expected = f'{path} is not a label map: expected {{"0": "name", "1": "name", ...}}'
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PoolError(f"{expected} ({err})") from err
    if not isinstance(data, dict) or not all(
        k.isascii() and k.isdigit() and k == str(int(k)) and isinstance(v, str)
        for k, v in data.items()
    ):
        raise PoolError(expected)
    return {int(k): v for k, v in data.items()}


def named_labels(labels: pd.Series, *, csv: Path) -> list[str]:
    """The CSV's labels, with the names of ``labels.json`` beside it when there is one.

    Raises :class:`PoolError` naming the row and value of a label the map does not name.
    """
    map_file = csv.parent / LABEL_MAP
    if not map_file.is_file():
        return [str(v) for v in labels]
    names = read_label_map(map_file)
    out: list[str] = []
    for row, value in enumerate(labels, start=1):
        try:
            out.append(names[int(value)])
        except (ValueError, KeyError):
            raise PoolError(
                f"{csv}: row {row} has label {value!r}, which {map_file} does not name; "
                "move the map away to keep the labels as written"
            ) from None
    return out


def import_table(csv: Path, images_dir: Path) -> tuple[pd.DataFrame, dict[str, Path], int]:
    """Build pool rows from a Lightly CSV whose filenames are relative to ``images_dir``.

    Returns ``(table, {content hash: image file}, duplicates dropped)``. Every
    row's image must exist inside ``images_dir`` (:func:`image_inside`). Labels
    are named from a ``labels.json`` beside the CSV (:func:`named_labels`). The
    embeddings' model is unknown, so ``model_id`` is ``imported-<sha256 of the
    CSV>``: such a pool is never compared with another model's embeddings.
    Embeddings are L2-normalised; ``pick_rank`` is the CSV order and
    ``pick_distance`` empty. Raises :class:`PoolError` naming the file and row at fault.
    """
    table = read_lightly(csv)
    tag = hashlib.sha256(csv.read_bytes()).hexdigest()[:16]
    files: dict[str, Path] = {}
    hashes: list[str] = []
    for row, name in enumerate(table["filenames"], start=1):
        path = image_inside(images_dir, str(name), csv=csv, row=row)
        hashes.append(content_hash(path))
        files.setdefault(hashes[-1], path)
    dim = embedding_dim(table)
    table[embedding_columns(dim)] = normalised(table, csv)
    table["labels"] = named_labels(table["labels"], csv=csv)
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
