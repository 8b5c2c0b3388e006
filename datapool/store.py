"""The pool's storage of record: Arrow shards, one per batch, and a manifest.

A pool folder ``pools/NAME/`` holds::

    manifest.json            format, dimension, row count, model ids, the shards in order
    shards/<batch>.arrow     the rows one batch added, in pick order
    images/<batch>.zip       the images of those rows, one uncompressed ZIP per batch
                             (:mod:`datapool.packs`; members named ``<hash><ext>``)
    checkpoint_latest.ckpt   the model that made the embeddings
    datapool_latest.csv      Lightly's layout of every row, *derived* from the shards
                             (see :func:`write_lightly_csv`); never read back

A shard is an Arrow IPC file (Feather v2, uncompressed; ``pd.read_feather``
opens it): one ``embedding`` column (a fixed-size list of D float32, so the
vectors load as one ``[rows, D]`` array without parsing text)
and one column per other field (``filenames``, ``labels``, our
:data:`~datapool.pool.EXTRA_COLUMNS`, then any user columns, kept as text).
The same format serves for the candidates ``embed`` writes and the picks
``sample`` writes (:func:`write_rows` / :func:`read_rows`).

Why shards: a merge writes the new batch's shard and the manifest, and leaves
every other shard byte for byte as it was, so DVC stores each shard once and a
version costs the cache what it added, not the whole table again. A shard is
rewritten exactly when its rows changed (a redo of that batch, a new model
re-embedding every row), which the manifest tells by a fingerprint of its rows.

In memory a pool is the same wide table as before (``filenames``,
``embedding_0..D-1``, ``labels``, ours, user columns; one float32 block), so
the selection and merge code does not care how it was stored. Pools written
before this layout (only ``datapool_latest.csv``) are still read, and the next
write migrates them; so are pools whose images are loose files
``images/<hash><ext>`` (format ``datapool-pool/1``, before the packs).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, cast

import numpy as np
import pandas as pd

from datapool.atomic import atomic_open
from datapool.errors import PoolError
from datapool.pool import (
    EXTRA_COLUMNS,
    IMAGES_DIR,
    POOL_CSV,
    column_order,
    embedding_columns,
    embedding_dim,
    image_names,
)

MANIFEST = "manifest.json"
SHARDS = "shards"
# A version being written is staged here and marked COMPLETE (datapool.transaction).
INCOMING = ".incoming"
COMPLETE = "COMPLETE"
FINGERPRINT_KEY = b"datapool.fingerprint"  # a shard's own record of the rows it holds
# /2: every batch's images are in a pack (images/batch-<key>.zip) the manifest lists.
# /1 (still read): images are loose files images/<hash><ext>, and the manifest lists no pack.
# The number changed so that a datapool before the packs refuses a /2 pool by name
# instead of looking for loose images that are not there.
FORMAT = "datapool-pool/2"
LOOSE_FORMAT = "datapool-pool/1"
EMBEDDING = "embedding"  # the shard column holding the vectors
SUFFIX = ".arrow"  # shards, candidates, picks
PACK_SUFFIX = ".zip"
_SHARD_NAME = re.compile(r"shards/batch-[0-9a-f]{16}\.arrow")
_PACK_NAME = re.compile(r"images/batch-[0-9a-f]{16}\.zip")


@dataclass(frozen=True)
class Shard:
    """One shard as the manifest lists it.

    Attributes:
        file: path inside the pool folder, ``shards/batch-<16 hex>.arrow``.
        batch_id: the increment whose rows it holds.
        rows: its row count.
        fingerprint: sha256 of its rows' values (see :func:`fingerprint`).
    """

    file: str
    batch_id: str
    rows: int
    fingerprint: str


@dataclass(frozen=True)
class Pack:
    """One batch's images as the manifest lists them (see :mod:`datapool.packs`).

    Attributes:
        file: path inside the pool folder, ``images/batch-<16 hex>.zip`` (the key of
            the batch's shard, :func:`batch_key`).
        batch_id: the increment whose rows' images it holds.
        members: its member count (one per row of the batch: a row's image is unique).
        fingerprint: sha256 of its sorted member names (:func:`members_fingerprint`).
    """

    file: str
    batch_id: str
    members: int
    fingerprint: str


@dataclass(frozen=True)
class Manifest:
    """What a pool folder holds: ``dim``-long embeddings, ``rows`` rows in ``shards`` order.

    Attributes:
        dim: embedding length D.
        rows: total rows (the sum over shards).
        model_ids: the distinct ``model_id`` values of the rows, sorted.
        shards: the shards, in the order their rows make up the pool.
        user_columns: columns beyond ours (a migrated pool's, or an import's), in order.
        latest_batch: the batch id of the increment that wrote this version (``merge``),
            even when it added no row; ``""`` when no increment did (combine, import).
            It decides which increment a run may redo (:func:`datapool.increment.batch_identity`).
        packs: one per shard, same order: where each batch's images are. Empty in a
            pool of :data:`LOOSE_FORMAT`, whose images are loose files.
        format: :data:`FORMAT`, or :data:`LOOSE_FORMAT` for a pool written before the packs.
        csv_sha256: sha256 of the ``datapool_latest.csv`` written with this version
            (``""``: none, or written before this was recorded). The next version appends
            its new rows to that file when it still has this digest (:func:`csv_base`).
    """

    dim: int
    rows: int
    model_ids: list[str]
    shards: list[Shard]
    user_columns: list[str] = field(default_factory=list)
    latest_batch: str = ""
    packs: list[Pack] = field(default_factory=list)
    format: str = FORMAT
    csv_sha256: str = ""

    @property
    def loose(self) -> bool:
        """True for a pool written before the packs: its images are ``images/<hash><ext>``."""
        return self.format == LOOSE_FORMAT

    def to_json(self) -> str:
        """The manifest as JSON text (stable key order, one shard per line)."""
        return json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n"


def batch_key(batch_id: str) -> str:
    """``batch-<first 16 hex of sha256(batch_id)>``: the name a batch's shard and pack
    share, safe for any batch id (ids may be long or hold any character)."""
    return f"batch-{hashlib.sha256(batch_id.encode('utf-8')).hexdigest()[:16]}"


def shard_file(batch_id: str) -> str:
    """``shards/<batch_key>.arrow``: the file of a batch's rows."""
    return f"{SHARDS}/{batch_key(batch_id)}{SUFFIX}"


def pack_file(batch_id: str) -> str:
    """``images/<batch_key>.zip``: the file of a batch's images."""
    return f"{IMAGES_DIR}/{batch_key(batch_id)}{PACK_SUFFIX}"


def members_fingerprint(names: Sequence[str]) -> str:
    """sha256 of a pack's member names, sorted, one per line: what a pack holds."""
    return hashlib.sha256("".join(f"{n}\n" for n in sorted(names)).encode("utf-8")).hexdigest()


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest of pool folder ``folder``, validated; None when it has none.

    Raises :class:`PoolError` naming the file and the field at fault.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return parse_manifest(path.read_text(encoding="utf-8"), source=str(path))


def parse_manifest(text: str, *, source: str) -> Manifest:
    """A manifest from its JSON ``text`` (``source`` names it in errors); PoolError if bad."""
    try:
        data = json.loads(text)
        if data.get("format") not in (FORMAT, LOOSE_FORMAT):
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        shards = [Shard(**s) for s in data["shards"]]
        manifest = Manifest(
            dim=int(data["dim"]),
            rows=int(data["rows"]),
            model_ids=[str(m) for m in data["model_ids"]],
            shards=shards,
            user_columns=[str(c) for c in data.get("user_columns", [])],
            latest_batch=str(data.get("latest_batch", "")),
            packs=[Pack(**p) for p in data.get("packs", [])],
            format=str(data["format"]),
            csv_sha256=str(data.get("csv_sha256", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise PoolError(f"{source} is not a datapool manifest: {err}") from err
    bad = [s.file for s in shards if not _SHARD_NAME.fullmatch(s.file)]
    if bad:
        raise PoolError(f"{source}: shard {bad[0]!r} is not a file of the pool's shards/ folder")
    if sum(s.rows for s in shards) != manifest.rows or manifest.dim < 1:
        raise PoolError(f"{source}: rows {manifest.rows} is not the sum of its shards' rows")
    _check_packs(manifest, source)
    return manifest


def _check_packs(manifest: Manifest, source: str) -> None:
    """A /2 manifest lists one pack per shard (same batch, one member per row, a file of
    ``images/``); a /1 manifest lists none. PoolError naming ``source`` otherwise."""
    if manifest.loose:
        if manifest.packs:
            raise PoolError(f"{source}: format {LOOSE_FORMAT} lists no packs, this one does")
        return
    if len(manifest.packs) != len(manifest.shards):
        raise PoolError(
            f"{source} lists {len(manifest.packs)} image packs for {len(manifest.shards)} shards"
        )
    for shard, pack in zip(manifest.shards, manifest.packs, strict=True):
        if not _PACK_NAME.fullmatch(pack.file) or pack.file != pack_file(shard.batch_id):
            raise PoolError(
                f"{source}: pack {pack.file!r} is not the pack of batch {shard.batch_id!r}"
            )
        if pack.batch_id != shard.batch_id or pack.members != shard.rows:
            raise PoolError(
                f"{source}: pack {pack.file} holds {pack.members} images of batch "
                f"{pack.batch_id!r}, its shard {shard.rows} rows of {shard.batch_id!r}"
            )


def pool_exists(folder: Path) -> bool:
    """True when ``folder`` holds a pool: a manifest, or an older pool's CSV alone."""
    return (folder / MANIFEST).is_file() or (folder / POOL_CSV).is_file()


def row_count(folder: Path) -> int:
    """Rows of the pool in ``folder`` (0 when there is none), from its manifest if it
    has one, else by reading an older pool's CSV. Raises :class:`PoolError` if unreadable."""
    manifest = read_manifest(folder)
    if manifest is not None:
        return manifest.rows
    if not (folder / POOL_CSV).is_file():
        return 0
    from datapool.pool import read_pool

    table = read_pool(folder)
    return 0 if table is None else len(table)


# --- rows <-> Arrow files -------------------------------------------------------------------------


def _arrow() -> Any:
    """pyarrow, imported on first use (the CLI's import path stays light)."""
    import pyarrow as pa

    return pa


_NUMBERS = ("pick_rank", "pick_distance")  # our columns kept as numbers (all others text)
_TEXTUAL = ("string", "empty")  # pandas' infer_dtype of text-or-missing / all-missing objects


def to_arrow(table: pd.DataFrame) -> Any:
    """``table`` (the wide in-memory layout) as a pyarrow Table in the shard layout.

    ``embedding_0..D-1`` become one ``embedding`` column of fixed-size float32
    lists (absent when the table has none, e.g. picks); text columns stay text,
    ``pick_rank``/``pick_distance`` stay numbers, and any other column is kept as
    text (``""`` where empty), as the CSV showed it.
    """
    pa = _arrow()
    dim = embedding_dim(table)
    embedded = set(embedding_columns(dim))
    arrays: dict[str, Any] = {}
    for column in table.columns:
        name = str(column)
        if name in embedded:
            continue
        values = table[column]
        if name in _NUMBERS:
            arrays[name] = pa.array(values.to_numpy(), from_pandas=True)
        else:
            arrays[name] = _as_text(values)
    if dim:
        flat = table[embedding_columns(dim)].to_numpy(dtype=np.float32).reshape(-1)
        arrays[EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)
    return pa.table(arrays)


def _as_text(values: pd.Series) -> Any:
    """Each value as the text a CSV cell would hold, a pyarrow string array: str(value),
    ``""`` for missing ones.

    Text columns (pandas' string dtype, or objects that are all text or missing) go
    through Arrow's C++ conversion: a Python loop over them cost ~1 s per 20k-row
    table of 6 text columns (every row, every save).
    """
    pa = _arrow()
    import pyarrow.compute as pc

    if isinstance(values.dtype, pd.StringDtype) or (
        values.dtype == object and pd.api.types.infer_dtype(values, skipna=True) in _TEXTUAL
    ):
        try:
            text = pc.fill_null(pa.array(values, type=pa.string(), from_pandas=True), "")
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            pass  # a gap Arrow does not take for one (e.g. a numpy float32 NaN): the loop
        else:
            # one chunk whatever the column's memory layout: equal tables, equal shard bytes
            return text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    return pa.array(["" if _missing(v) else str(v) for v in values], type=pa.string())


def _missing(value: object) -> bool:
    try:
        return bool(pd.isna(cast(Any, value)))
    except (TypeError, ValueError):  # arrays and the like are values, not gaps
        return False


def from_arrow(arrow: Any, *, source: str, required: Sequence[str]) -> pd.DataFrame:
    """A shard-layout pyarrow Table back as the wide in-memory table, validated.

    Raises :class:`PoolError` as :func:`check_arrow` does.
    """
    check_arrow(arrow, source=source, required=required)
    return _to_frame(arrow)


def check_arrow(arrow: Any, *, source: str, required: Sequence[str]) -> None:
    """Check a shard-layout table: ``filenames`` and ``required`` exist, the embeddings
    (if any) are fixed-size float32 and finite, every ``content_hash`` is one.

    Raises :class:`PoolError` naming ``source``, and the first row (1-based) and
    column at fault.
    """
    names = list(arrow.column_names)
    missing = [c for c in ("filenames", *required) if c not in names]
    if missing:
        raise PoolError(f"{source} lacks column(s) {', '.join(missing)}")
    if EMBEDDING in names:
        _check_finite(
            _vectors(arrow.column(EMBEDDING), arrow.num_rows, source=source), arrow, source
        )
    if "content_hash" in names:
        _check_hash_column(arrow, source)


def _to_frame(arrow: Any) -> pd.DataFrame:
    """A checked shard-layout table as the wide layout: filenames, embedding_*, the rest."""
    if EMBEDDING not in arrow.column_names:
        frame: pd.DataFrame = arrow.to_pandas()
        return frame
    vectors = _vectors(arrow.column(EMBEDDING), arrow.num_rows, source="")
    return _assemble(arrow.drop_columns([EMBEDDING]), [vectors])


def _assemble(meta: Any, vectors: list[np.ndarray]) -> pd.DataFrame:
    """The wide layout from the other columns (a pyarrow Table) and the vectors' parts,
    stacked in order into one writable float32 block (one copy)."""
    frame: pd.DataFrame = meta.to_pandas()
    block = np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)
    # copy=False: the [rows, D] array becomes the frame's one float32 block as it is
    # (pandas would otherwise transpose-copy it: seconds at 1M x 128).
    columns = embedding_columns(block.shape[1])
    wide = pd.DataFrame(block, columns=columns, index=frame.index, copy=False)
    back = [c for c in frame.columns if c != "filenames"]
    return pd.concat([frame[["filenames"]], wide, frame[back]], axis=1)


def _row_name(arrow: Any, row: int) -> str:
    return repr(arrow.column("filenames")[row].as_py())


def _vectors(column: Any, rows: int, *, source: str) -> np.ndarray:
    """The ``embedding`` column as float32 ``[rows, D]``; PoolError if it is not one."""
    pa = _arrow()
    chunk = column.combine_chunks()
    if not pa.types.is_fixed_size_list(chunk.type) or not pa.types.is_float32(
        chunk.type.value_type
    ):
        raise PoolError(f"{source}: column {EMBEDDING} is {chunk.type}, not fixed-size float32")
    if chunk.null_count:
        row = int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
        raise PoolError(f"{source}: row {row + 1} has no embedding")
    dim = chunk.type.list_size
    flat = chunk.flatten().to_numpy(zero_copy_only=False)
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(rows, dim)


def _check_finite(
    vectors: np.ndarray, arrow: Any, source: str, *, numbers: np.ndarray | None = None
) -> None:
    """PoolError naming the first row of ``vectors`` with a NaN or infinite value; rows are
    called by ``numbers`` (0-based) when the vectors are a selection of a table's rows."""
    bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
    if bad.size:
        row = int(bad[0])
        column = int(np.flatnonzero(~np.isfinite(vectors[row]))[0])
        number = row if numbers is None else int(numbers[row])
        raise PoolError(
            f"{source}: row {number + 1} (filenames={_row_name(arrow, row)}), column "
            f"embedding_{column}: {vectors[row, column]!r} is not a finite number"
        )


def _check_hash_column(arrow: Any, source: str, *, numbers: np.ndarray | None = None) -> None:
    """PoolError naming the first row whose ``content_hash`` is no sha256 hex digest (rows
    called by ``numbers`` as in :func:`_check_finite`)."""
    import pyarrow.compute as pc

    hashes = arrow.column("content_hash")
    valid = pc.fill_null(pc.match_substring_regex(hashes, r"^[0-9a-f]{64}$"), False)
    if not pc.all(valid).as_py() and arrow.num_rows:
        row = int(np.flatnonzero(~valid.to_numpy(zero_copy_only=False))[0])
        value = hashes[row].as_py()
        number = row if numbers is None else int(numbers[row])
        raise PoolError(
            f"{source}: row {number + 1} (filenames={_row_name(arrow, row)}), column "
            f"content_hash: {value!r} is not a content hash (the image's sha256 as 64 "
            "lowercase hex digits)"
        )


def write_rows(table: pd.DataFrame, path: Path, *, fingerprint: str = "") -> None:
    """Write ``table`` (wide layout, with or without embeddings) to the Arrow IPC file
    ``path`` atomically (temp file, fsync, rename). Equal tables give equal bytes.
    A shard carries its ``fingerprint`` in the file's metadata, so a shard that is
    not the one its manifest lists (two versions mixed) is caught on reading.

    Decision: Arrow IPC, uncompressed, rather than Parquet. Measured at 1M x 128
    (docs/BENCHMARKS.md): Parquet decodes float pages at ~150-300 MB/s, 2-4 s for
    the vectors alone, while an IPC file is read at memory speed (~0.2 s); text
    columns would compress, but they are a quarter of the bytes.
    """
    pa = _arrow()
    arrow = to_arrow(table)
    if fingerprint:
        arrow = arrow.replace_schema_metadata({FINGERPRINT_KEY: fingerprint.encode("ascii")})
    with atomic_open(path, "wb") as handle, pa.ipc.new_file(handle, arrow.schema) as writer:
        writer.write_table(arrow)


class Opener(Protocol):
    """Anything that opens a file for binary reading: a local folder or an fsspec filesystem."""

    def open(self, path: str, mode: str = "rb") -> IO[bytes]: ...


def read_rows(
    path: Path | str, *, required: Sequence[str] = (), fs: Opener | None = None
) -> pd.DataFrame:
    """Read an Arrow file written by :func:`write_rows` (a shard, candidates, picks).

    ``fs`` reads through a filesystem (e.g. ``dvc.api.DVCFileSystem`` at an old
    revision) instead of the local disk. Raises :class:`PoolError` naming the
    file when it is missing, not an Arrow file, or fails validation (:func:`from_arrow`).
    """
    if fs is None:
        arrow = _read_shard(Path(path), listed_in=None)
    else:
        try:
            with fs.open(str(path), "rb") as handle:
                arrow = _arrow().ipc.open_file(handle).read_all()
        except ValueError as err:
            raise PoolError(f"{path} is not a readable Arrow file: {err}") from err
    return from_arrow(arrow, source=str(path), required=required)


# --- a pool folder ----------------------------------------------------------------------------


def load_pool(folder: Path, *, overlay: Path | None = None) -> pd.DataFrame | None:
    """The pool in ``folder``: its rows in manifest order, validated; None if there is none.

    Reads the shards the manifest lists (or, for a pool written before shards
    existed, its ``datapool_latest.csv``). Checks each shard's row count, batch
    and dimension against the manifest, and that no image appears twice.
    ``overlay`` (a staged version, see :mod:`datapool.transaction`) is looked in
    first for the manifest and each shard. Raises :class:`PoolError` naming the
    file (and row) at fault.
    """
    if overlay is None and (folder / INCOMING / COMPLETE).exists():
        # A version whose write was interrupted after it was complete: what the
        # next stage's recovery will make of the folder (a reader must not mix the two).
        overlay = folder / INCOMING
    manifest = read_manifest(overlay) if overlay is not None else None
    manifest = manifest or read_manifest(folder)
    if manifest is None:
        from datapool.pool import read_legacy_pool

        return read_legacy_pool(folder)
    pa = _arrow()
    order = [*column_order(manifest.dim), *manifest.user_columns]
    metas, vectors = [], []
    for shard in manifest.shards:
        path = folder / shard.file
        if overlay is not None and (overlay / shard.file).is_file():
            path = overlay / shard.file
        arrow = _read_shard(path, listed_in=folder / MANIFEST)
        _check_shard(arrow, shard, manifest, source=str(path))
        vectors.append(_vectors(arrow.column(EMBEDDING), arrow.num_rows, source=str(path)))
        metas.append(arrow.drop_columns([EMBEDDING]))
    if not metas:
        return pd.DataFrame(columns=order)
    meta = _detached(pa.concat_tables(metas, promote_options="permissive"))
    _check_unique(meta, folder)
    return _assemble(meta, vectors).reindex(columns=order)


def _detached(table: Any) -> Any:
    """``table`` copied into fresh memory (one IPC round trip: a memcpy of its buffers).

    The shards are memory-mapped; the frame a reader gets must not keep a mapping:
    pandas' Arrow-backed text would, and a shard renamed away on a shared file
    system (NFS: another machine's save) or cut in place would fault on access.
    """
    pa = _arrow()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def _read_shard(path: Path, *, listed_in: Path | None) -> Any:
    """One Arrow file as a pyarrow Table; PoolError when it is missing or not one.

    The file is memory-mapped: the table's buffers are the page cache's pages, not a
    copy (``load_pool`` of 1M x 128 rows: 0.75-0.9 s against 1.3-5.3 s read into fresh
    memory, on a loaded 2-core machine). Callers copy what they keep (:func:`load_pool`:
    the vectors into the frame's block, the other columns by :func:`_detached`), so no
    mapping outlives the read.
    """
    pa = _arrow()
    try:
        with pa.memory_map(str(path), "r") as handle:
            return pa.ipc.open_file(handle).read_all()
    except FileNotFoundError:
        where = f" but {listed_in} lists it; bring the version back with `dvc checkout`"
        raise PoolError(f"{path} is missing{where if listed_in else ''}") from None
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise PoolError(f"{path} is not a readable Arrow file: {err}") from err


def _check_shard(arrow: Any, shard: Shard, manifest: Manifest, *, source: str) -> None:
    """A shard must hold what the manifest says: its rows, its batch, D-long vectors."""
    check_arrow(arrow, source=source, required=("labels", *EXTRA_COLUMNS, EMBEDDING))
    if arrow.num_rows != shard.rows:
        raise PoolError(f"{source} has {arrow.num_rows} rows, the manifest says {shard.rows}")
    if arrow.column(EMBEDDING).type.list_size != manifest.dim:
        raise PoolError(
            f"{source} holds embeddings of dimension {arrow.column(EMBEDDING).type.list_size}, "
            f"the manifest says {manifest.dim}"
        )
    batches = set(arrow.column("batch_id").unique().to_pylist())
    if batches - {shard.batch_id}:
        raise PoolError(f"{source} holds rows of batch(es) other than {shard.batch_id!r}")
    recorded = (arrow.schema.metadata or {}).get(FINGERPRINT_KEY, b"").decode("ascii")
    if recorded and recorded != shard.fingerprint:
        raise PoolError(
            f"{source} holds other rows than the manifest lists (fingerprint "
            f"{recorded[:12]}, listed {shard.fingerprint[:12]}): the folder mixes two versions"
        )


def check_columns(table: pd.DataFrame, *, source: str) -> None:
    """Raise :class:`PoolError` naming ``source`` unless ``table`` has our columns."""
    missing = [c for c in ("filenames", "labels", *EXTRA_COLUMNS) if c not in table.columns]
    if missing or not embedding_dim(table):
        raise PoolError(f"{source} lacks column(s) {', '.join(missing) or 'embedding_*'}")


def check_rows(table: pd.DataFrame, *, source: str, only: np.ndarray | None = None) -> None:
    """Check a table before it is written as a pool: our columns exist, every embedding is
    finite, every content hash is one and none repeats -- what :func:`load_pool` checks
    on reading, so a version is never written that no stage could read back.

    ``only`` (bool ``[len(table)]``) limits the per-row checks to those rows (the
    shards a save writes: the others are the same bytes as a version already
    checked); repeats are looked for among all rows. Raises :class:`PoolError` naming
    ``source`` and the first row at fault (its number in ``table``).
    """
    check_columns(table, source=source)
    meta = _identities(table)
    columns = embedding_columns(embedding_dim(table))
    if only is None:
        _check_finite(table[columns].to_numpy(dtype=np.float32), meta, source)
        _check_hash_column(meta, source)
    elif only.any():
        rows = np.flatnonzero(only)  # errors name a row by its number in ``table``
        vectors = table[columns].iloc[rows].to_numpy(dtype=np.float32)
        _check_finite(vectors, meta.take(rows), source, numbers=rows)
        _check_hash_column(meta.take(rows), source, numbers=rows)
    _check_unique(meta, Path(source))


def _identities(table: pd.DataFrame) -> Any:
    """``filenames``, ``content_hash`` (and ``batch_id``, when ``table`` has it) of
    ``table`` as text in a pyarrow Table: what the row checks
    (:func:`_check_hash_column`, :func:`_check_unique`) read."""
    pa = _arrow()
    columns = [c for c in ("filenames", "content_hash", "batch_id") if c in table.columns]
    # pandas' string columns hand their Arrow buffers over; a Python list of 1M
    # strings took ~0.3 s per column
    return pa.table({c: pa.array(table[c].astype(str)) for c in columns})


def _check_unique(meta: Any, folder: Path) -> None:
    """No content hash twice in the pool (``meta``: its rows as a pyarrow Table). The error
    names both rows (and both batches, when ``meta`` has them): in a pool, the image of
    one row would be packed twice, once per batch."""
    import pyarrow.compute as pc

    hashes = meta.column("content_hash")
    if len(pc.unique(hashes)) == len(hashes):
        return  # the common case, decided in C++; pandas' duplicated takes ~1 s at 1M rows
    values = hashes.to_pandas()
    row = int(np.flatnonzero(values.duplicated().to_numpy())[0])
    first = int(np.flatnonzero((values == values.iloc[row]).to_numpy())[0])
    names = meta.column("filenames")
    batches = ""
    if "batch_id" in meta.column_names:
        column = meta.column("batch_id")
        batches = f" (batches {column[row].as_py()!r} and {column[first].as_py()!r})"
    raise PoolError(
        f"{folder}: row {row + 1} (filenames={names[row].as_py()!r}) repeats the content_hash "
        f"of row {first + 1} (filenames={names[first].as_py()!r}){batches}; each image may "
        "appear once"
    )


def content_hashes(
    fs: Any, folder: str, *, memo: dict[str, list[str]] | None = None
) -> list[str] | None:
    """The content hashes of the pool at ``folder`` as seen through ``fs`` (any fsspec-like
    filesystem with ``exists`` and ``open``, e.g. ``dvc.api.DVCFileSystem`` at a revision).

    Reads only the ``content_hash`` column of each shard (or of an older pool's
    CSV). None when the folder holds no pool. Raises what ``fs`` raises for data
    it cannot reach (e.g. not in the DVC cache), and :class:`PoolError` for a bad manifest.
    ``memo`` keeps each shard's hashes by its fingerprint across calls: a history of many
    versions reads each shard once, as the versions share all but their newest shards.
    """
    pa = _arrow()
    manifest_path = f"{folder}/{MANIFEST}"
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "rb") as handle:
            manifest = parse_manifest(handle.read().decode("utf-8"), source=manifest_path)
        hashes: list[str] = []
        for shard in manifest.shards:
            if memo is not None and shard.fingerprint in memo:
                hashes += memo[shard.fingerprint]
                continue
            with fs.open(f"{folder}/{shard.file}", "rb") as handle:
                found = pa.ipc.open_file(handle).read_all().column("content_hash").to_pylist()
            if memo is not None:
                memo[shard.fingerprint] = found
            hashes += found
        return hashes
    if fs.exists(f"{folder}/{POOL_CSV}"):
        with fs.open(f"{folder}/{POOL_CSV}", "rb") as handle:
            column = pd.read_csv(handle, usecols=["content_hash"], dtype=str, keep_default_na=False)
        return list(column["content_hash"])
    return None


# --- writing a version ------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How to write a pool version: its manifest and the shards and packs to (re)write.

    Attributes:
        manifest: the new version's manifest.
        writes: ``{shard file: rows}`` for shards whose rows differ from the old version's
            (every shard when there was none); shards not listed stay as they are.
        packs: ``{pack file: rows}`` for packs whose image set differs from the old
            version's (every pack when it had none: a new pool, or one migrated from
            loose images); packs not listed stay as they are, unopened.
        table: the rows in shard order (as :func:`load_pool` will read them back).
    """

    manifest: Manifest
    writes: dict[str, pd.DataFrame]
    packs: dict[str, pd.DataFrame]
    table: pd.DataFrame


def plan_version(table: pd.DataFrame, old: Manifest | None, *, latest_batch: str = "") -> Plan:
    """Split ``table`` (wide layout, a pool's rows) into one shard and one image pack per
    batch, in order of each batch's first row, and list those whose content changed since ``old``.

    Rows of a batch that are not contiguous (a migrated pool the user sorted) are
    gathered behind the batch's first row. A shard is unchanged when its
    :func:`fingerprint` equals the old manifest's for the same file. A pack is unchanged
    when its shard is (same rows, so same images: its member names are not even
    computed), or when its :func:`members_fingerprint` equals the old one (a new model
    or an edited label rewrites the shard, not the pack).
    ``latest_batch`` goes into the manifest (see :class:`Manifest`).
    """
    dim = embedding_dim(table)
    ours = column_order(dim)
    user = [str(c) for c in table.columns if c not in ours]
    codes, batches = pd.factorize(table["batch_id"].astype(str), sort=False)
    if (np.diff(codes) < 0).any():
        table = table.iloc[np.argsort(codes, kind="stable")].reset_index(drop=True)
        codes = np.sort(codes, kind="stable")
    bounds = np.searchsorted(codes, np.arange(len(batches) + 1))
    before = {s.file: s.fingerprint for s in (old.shards if old else [])}
    packed = {p.file: p for p in (old.packs if old else [])}
    shards, packs, writes, pack_writes = [], [], {}, {}
    for i, batch in enumerate(batches):
        rows = table.iloc[bounds[i] : bounds[i + 1]].reset_index(drop=True)
        shard = Shard(shard_file(str(batch)), str(batch), len(rows), fingerprint(rows))
        shards.append(shard)
        previous = packed.get(pack_file(str(batch)))
        if before.get(shard.file) != shard.fingerprint:
            writes[shard.file] = rows
        elif previous is not None:
            packs.append(previous)
            continue
        pack = Pack(
            pack_file(str(batch)), str(batch), len(rows), members_fingerprint(image_names(rows))
        )
        packs.append(pack)
        if pack != previous:
            pack_writes[pack.file] = rows
    manifest = Manifest(
        dim=dim,
        rows=len(table),
        model_ids=model_ids(table),
        shards=shards,
        user_columns=user,
        latest_batch=latest_batch,
        packs=packs,
    )
    return Plan(manifest=manifest, writes=writes, packs=pack_writes, table=table)


def written_rows(plan: Plan) -> np.ndarray:
    """Bool ``[len(plan.table)]``: the rows of the shards ``plan`` (re)writes."""
    sizes = np.array([s.rows for s in plan.manifest.shards], dtype=np.int64)
    written = np.array([s.file in plan.writes for s in plan.manifest.shards], dtype=bool)
    return np.repeat(written, sizes)


def model_ids(table: pd.DataFrame) -> list[str]:
    """The distinct ``model_id`` values of ``table``, sorted (vectorised: a Python set over
    a 1M-row column took ~1.2 s)."""
    return sorted(str(m) for m in table["model_id"].astype(str).unique())


def fingerprint(rows: pd.DataFrame) -> str:
    """sha256 over a batch's rows: column names, every value and the embeddings' bytes.

    Equal rows give equal fingerprints in any process (pandas' row hash uses a
    fixed key), so a merge can tell which shards it must write again.
    """
    dim = embedding_dim(rows)
    vectors = rows[embedding_columns(dim)].to_numpy(dtype=np.float32)
    meta = rows.drop(columns=embedding_columns(dim))
    digest = hashlib.sha256("\x1f".join(map(str, rows.columns)).encode("utf-8"))
    digest.update(pd.util.hash_pandas_object(meta, index=False).to_numpy().tobytes())
    digest.update(np.ascontiguousarray(vectors).tobytes())
    return digest.hexdigest()


def write_lightly_csv(table: pd.DataFrame, path: Path, *, base: CsvBase | None = None) -> str:
    """Write ``table`` as Lightly's embeddings CSV plus our columns, atomically; returns
    the file's sha256.

    Columns: ``filenames, embedding_0..D-1, labels``, ours, then user columns.
    Written by Arrow's C++ CSV writer (about 10x pandas' ``to_csv`` at 1M x 128);
    floats in their shortest round-trip form, empty cells for missing values.
    A row's text depends on its own values only (embeddings float32, ``pick_rank``
    and ``pick_distance`` float64 whatever their dtype -- an integral double prints
    as an integer -- every other column text). So ``base`` (:func:`csv_base`), a
    CSV this function wrote of ``table``'s first ``base.rows`` rows, is copied and
    only the rows after them are converted and formatted: the bytes are those of a
    whole write. The copy is hashed as it goes (one read of the old file); if it
    does not have the digest its version recorded (edited since), the whole table
    is written instead. This file is derived from the shards and never read back
    by datapool.
    """
    import pyarrow.csv as pcsv

    with atomic_open(path, "wb") as handle:
        digest = hashlib.sha256()
        if base is not None and not _copy_verified(base, handle, digest):
            handle.seek(0)
            handle.truncate()
            digest, base = hashlib.sha256(), None
        arrow = _csv_columns(table.iloc[base.rows :] if base is not None else table)
        options = pcsv.WriteOptions(include_header=base is None)
        pcsv.write_csv(arrow, _Hashing(handle, digest), write_options=options)
    return digest.hexdigest()


def _copy_verified(base: CsvBase, handle: IO[bytes], digest: Any) -> bool:
    """Copy ``base.path`` to ``handle``, feeding ``digest``; whether it had ``base.sha256``."""
    with base.path.open("rb") as old:
        while chunk := old.read(1 << 22):
            handle.write(chunk)
            digest.update(chunk)
    return bool(digest.copy().hexdigest() == base.sha256)


class _Hashing:
    """A binary file that also feeds what is written to a sha256 (for pyarrow's writer)."""

    def __init__(self, handle: IO[bytes], digest: Any) -> None:
        self.handle, self.digest, self.closed = handle, digest, False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.digest.update(view)
        return self.handle.write(view)

    def flush(self) -> None:
        self.handle.flush()


def _csv_columns(table: pd.DataFrame) -> Any:
    """``table`` in the CSV's column order as a pyarrow Table (embeddings one column each)."""
    pa = _arrow()
    dim = embedding_dim(table)
    ours = column_order(dim)
    order = [*ours, *(c for c in table.columns if c not in ours)]
    vectors = table[embedding_columns(dim)].to_numpy(dtype=np.float32)
    arrow = to_arrow(table.drop(columns=embedding_columns(dim)))
    columns: dict[str, Any] = {}
    for name in order:
        if name in arrow.column_names:
            column = arrow.column(name)
            # one type whatever the dtype (int64, or float64 with a gap): see write_lightly_csv
            numeric = pa.types.is_integer(column.type) or pa.types.is_floating(column.type)
            columns[name] = column.cast(pa.float64()) if name in _NUMBERS and numeric else column
        else:  # embedding_i
            columns[name] = pa.array(vectors[:, int(name.removeprefix("embedding_"))])
    return pa.table(columns)


@dataclass(frozen=True)
class CsvBase:
    """A ``datapool_latest.csv`` the next version's may continue (:func:`csv_base`).

    Attributes:
        path: the file.
        rows: the pool rows it holds (its version's ``rows``).
        sha256: the digest its version recorded; the file is trusted only if it still
            has it (checked while it is copied, :func:`write_lightly_csv`).
    """

    path: Path
    rows: int
    sha256: str


def csv_base(folder: Path, old: Manifest | None, new: Manifest) -> CsvBase | None:
    """The current ``datapool_latest.csv`` of ``folder``, when the next version's CSV
    may start from it: the old version recorded its digest, the file exists, and the
    old version's shards are the new one's first shards, unchanged, with the same
    columns. None otherwise. Reads no file: the digest is checked on the copy."""
    path = folder / POOL_CSV
    if old is None or not old.csv_sha256 or not path.is_file():
        return None
    head = [(s.file, s.fingerprint) for s in new.shards[: len(old.shards)]]
    if head != [(s.file, s.fingerprint) for s in old.shards]:
        return None
    if (old.dim, old.user_columns) != (new.dim, new.user_columns):
        return None
    return CsvBase(path, old.rows, old.csv_sha256)


def is_in(values: pd.Series, others: pd.Series) -> np.ndarray:
    """``[len(values)]`` bool: which of ``values`` (text) occur in ``others``.

    Decided by Arrow's hash kernel: pandas' ``isin`` on its Arrow-backed text
    walked a Python set, ~11 s for 50k candidates against a 1M-row pool.
    """
    import pyarrow.compute as pc

    pa = _arrow()
    text = [pa.array(v.astype(str)) for v in (values, others)]  # Arrow buffers, no lists
    found = pc.is_in(text[0], value_set=text[1])
    return np.asarray(found.to_numpy(zero_copy_only=False), dtype=bool)


def read_columns(path: Path, columns: Sequence[str]) -> Any:
    """Only ``columns`` of the Arrow file ``path``, as a pyarrow Table (PoolError if bad)."""
    return _read_shard(path, listed_in=None).select(list(columns))


def read_any(path: Path, *, required: Sequence[str] = ()) -> pd.DataFrame:
    """Read rows (candidates, picks, a re-embedded pool) by the file's suffix: Arrow
    (``.arrow``, :func:`read_rows`) or CSV (anything else, as workspaces made by an
    older datapool still write). Both are validated alike; :class:`PoolError` if bad."""
    if path.suffix == SUFFIX:
        table = read_rows(path, required=required)
    else:
        from datapool.pool import read_table

        table = read_table(path, required=required)
    if "content_hash" in required:  # candidates: embed lists each image once
        _check_unique(_identities(table), path)
    return table


def write_any(table: pd.DataFrame, path: Path) -> None:
    """Write rows in the format ``path``'s suffix names (see :func:`read_any`), atomically."""
    if path.suffix == SUFFIX:
        write_rows(table, path)
    else:
        from datapool.pool import write_table

        write_table(table, path)
