"""Editing a pool's labels and columns of one's own, recorded as a new pool version.

The pool's store of record is its shards (:mod:`datapool.store`);
``datapool_latest.csv`` is derived from them and never read back, so a change
made to that file alone is overwritten by the next run. ``datapool label NAME
EDITS.csv`` is the way to edit: :func:`apply_edits` sets the cells, and
:func:`label_pool` writes the result as the pool's next version and records it
as a revision, through the version transaction (:mod:`datapool.version`).

EDITS.csv has a *key* column that names the rows to edit -- ``content_hash``
(the image's identity) or ``filenames`` -- and the columns to set:

* ``labels`` and columns of the user's own are set on the named rows; an empty
  cell sets ``""``. A column the pool does not have yet is added to every row,
  ``""`` where EDITS.csv does not name the row. Rows EDITS.csv does not name
  keep their values.
* datapool's own columns -- ``filenames``, ``embedding_*``, ``content_hash``,
  ``batch_id``, ``model_id``, ``source``, ``pick_rank``, ``pick_distance`` --
  cannot be edited. Decision: such a column is *ignored* when each of its cells
  equals the pool's value for that row, and refused (naming the column, row and
  both values) when one differs. So the derived ``datapool_latest.csv``, edited
  in a spreadsheet, is itself a valid EDITS.csv. Numbers are equal when they
  are the same float32 to within one unit in the last place (the CSV holds
  float32 values in shortest form; a spreadsheet may re-print them with 15
  digits); a spreadsheet that saves numbers rounded "as shown" changes them,
  and is refused. ``filenames`` is ours because the pool's copy of an image is
  named by its extension (:func:`datapool.pool.image_name`).
* Refused, with nothing written: a key that matches no row (the first named,
  and how many), a key given twice, a ``filenames`` key that matches several
  rows (images of the same name from different inboxes: use ``content_hash``),
  a header repeating a name, an unnamed column holding values, and new columns
  named like embeddings (``embedding``, ``embedding_N``).
* Rows whose cells are all empty (a spreadsheet's trailing rows) are skipped.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from datapool.atomic import atomic_open, read_text_if_file
from datapool.errors import InputError, PoolError
from datapool.layout import LOCK, PARAMS, pool_dir
from datapool.pool import EXTRA_COLUMNS, POOL_CSV, embedding_columns, embedding_dim
from datapool.revisions import (
    Record,
    current_record,
    merge_entry,
    park,
    pipeline_pool,
)
from datapool.settings import check_value, flatten, load_params
from datapool.store import EMBEDDING
from datapool.tools import run_tool
from datapool.transaction import open_pool, save_pool
from datapool.version import JOURNAL, Report, to_stderr, transaction, workspace_lock

KEYS = ("content_hash", "filenames")
_EMBEDDING_NAME = re.compile(r"embedding(_\d+)?")
# Files a spreadsheet leaves beside the CSV it has open (LibreOffice, Excel); in the
# pool folder they would become part of the version that `dvc add`/`dvc commit` records.
_SPREADSHEET_LOCKS = (".~lock.", "~$")


@dataclass(frozen=True)
class Edited:
    """What :func:`apply_edits` changed.

    Attributes:
        rows_changed: rows of the pool with at least one cell changed (a row whose
            new column got a non-empty value counts).
        columns_added: new columns, in EDITS.csv's order.
        ignored: datapool's own columns EDITS.csv held with the pool's values.
    """

    rows_changed: int
    columns_added: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def changes(self) -> bool:
        """True when the pool differs from before."""
        return bool(self.rows_changed or self.columns_added)

    def describe(self) -> str:
        """``3 rows changed, 1 column added (reviewed)``."""
        rows = f"{self.rows_changed} row{'' if self.rows_changed == 1 else 's'} changed"
        n = len(self.columns_added)
        added = f"{n} column{'' if n == 1 else 's'} added"
        return f"{rows}, {added}" + (f" ({', '.join(self.columns_added)})" if n else "")


# --- reading EDITS.csv ------------------------------------------------------------------------


def read_edits(data: bytes, *, source: str) -> pd.DataFrame:
    """EDITS.csv's bytes as a table: text cells as ``str`` (``""`` where empty; ``NA``
    stays text), ``embedding_N`` columns as numbers, all-empty rows dropped; the index
    is each row's 1-based number in the file (as a spreadsheet counts data rows).

    A UTF-8 byte order mark (Excel writes one) is skipped. Raises :class:`InputError`
    naming ``source`` for text that is not UTF-8 CSV, an empty file, a repeated header
    name, or an unnamed column holding values.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{source} is not UTF-8 text: {err}") from None
    header = next(csv.reader(io.StringIO(text)), None)
    if not header:
        raise InputError(f"{source} is empty; it needs a header row naming its columns")
    repeated = sorted({name for name in header if name.strip() and header.count(name) > 1})
    if repeated:
        raise InputError(f"{source}: column {repeated[0]!r} appears twice in the header")
    numeric = [name for name in header if _EMBEDDING_NAME.fullmatch(name) and name != EMBEDDING]
    try:
        table = pd.read_csv(
            io.StringIO(text),
            dtype={name: str for name in header if name not in numeric},
            keep_default_na=False,
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as err:
        raise InputError(f"{source} is not a readable CSV: {err}") from None
    table.columns = pd.Index(header)
    table.index = pd.RangeIndex(1, len(table) + 1)
    table = table.loc[~_blank(table).all(axis=1)]
    unnamed = [i for i, name in enumerate(header) if not name.strip()]
    for position in unnamed:
        if not _blank_cells(table.iloc[:, position]).all():
            raise InputError(
                f"{source}: column {position + 1} has no name in the header but holds values; "
                "name it (a column of your own) or delete it"
            )
    keep = [i for i in range(len(header)) if i not in unnamed]
    return table.iloc[:, keep]


def _blank(table: pd.DataFrame) -> pd.DataFrame:
    """True for each empty cell (``""`` or missing); numeric columns are only checked
    for gaps (turning 100k x 128 numbers into text would take seconds)."""
    return pd.DataFrame(
        {i: _blank_cells(table.iloc[:, i]).to_numpy() for i in range(table.shape[1])},
        index=table.index,
    )


def _blank_cells(values: pd.Series) -> pd.Series:
    empty = values.isna()
    if pd.api.types.is_numeric_dtype(values):
        return empty
    return empty | values.astype(str).eq("")


def choose_key(edits: pd.DataFrame) -> str:
    """The default key: ``content_hash`` when EDITS.csv has that column (it names one
    image exactly), else ``filenames``."""
    return "content_hash" if "content_hash" in edits.columns else "filenames"


# --- applying edits (pure) --------------------------------------------------------------------


def apply_edits(
    table: pd.DataFrame, edits: pd.DataFrame, key: str, *, source: str = "the edits"
) -> tuple[pd.DataFrame, Edited]:
    """``table`` (a pool, wide layout) with the cells ``edits`` sets, and what changed.

    ``edits``: a ``key`` column (one of :data:`KEYS`) and the columns to set, one
    row per pool row to edit (see the module docstring for the rules); its index
    numbers the rows in messages (see :func:`read_edits`). ``table`` is not
    changed; the result has its rows in the same order, new columns last.
    Raises :class:`InputError` naming ``source``, the column, and the first row at
    fault for every refusal the module docstring lists.
    """
    if key not in KEYS:
        raise InputError(f"--key must be one of {', '.join(KEYS)}, not {key!r}")
    if key not in edits.columns:
        raise InputError(f"{source} has no {key} column (the key naming each row to edit)")
    dim = embedding_dim(table)
    ours = {"filenames", *EXTRA_COLUMNS, *embedding_columns(dim)}
    _check_new_names(edits.columns, table.columns, source=source)
    rows = _rows_of(table, edits, key, source=source)
    ignored = [c for c in edits.columns if c in ours and c != key]
    _check_unchanged(table, edits, rows, ignored, key=key, source=source)
    out = table.copy()
    changed = np.zeros(len(table), dtype=bool)
    editable = [c for c in edits.columns if c not in ours]
    for column in editable:
        before = _text(out[column]) if column in out.columns else np.full(len(out), "", object)
        after = before.copy()
        after[rows] = _text(edits[column])
        changed |= before != after
        out[column] = after
    added = [c for c in editable if c not in table.columns]
    return out, Edited(int(changed.sum()), added, ignored)


def _text(values: pd.Series) -> np.ndarray:
    """Cells as text (object array): ``str(value)``, ``""`` for a missing one."""
    return np.array(["" if pd.isna(v) else str(v) for v in values], dtype=object)


def _check_new_names(names: Iterable[object], pool: Iterable[object], *, source: str) -> None:
    """A column EDITS.csv adds may not look like an embedding: the store keeps the
    vectors in a column named ``embedding`` and counts ``embedding_N`` as dimensions."""
    have = set(map(str, pool))
    for name in map(str, names):
        if name not in have and _EMBEDDING_NAME.fullmatch(name):
            raise InputError(
                f"{source}: column {name} is not one of the pool's; a new column cannot be "
                "named embedding or embedding_N (those hold the pool's vectors)"
            )


def _rows_of(table: pd.DataFrame, edits: pd.DataFrame, key: str, *, source: str) -> np.ndarray:
    """Position in ``table`` of the row each edit names by ``key``."""
    keys = _text(edits[key])
    seen = pd.Series(keys).duplicated(keep=False).to_numpy()
    if seen.any():
        value, where = keys[seen][0], edits.index[seen][:2]
        raise InputError(
            f"{source}: {key} {value!r} appears in rows {where[0]} and {where[1]}; "
            "each row of the pool can be edited once"
        )
    column = _text(table[key])
    if key == "filenames":
        counts = pd.Series(column).value_counts()
        ambiguous = [i for i, k in enumerate(keys) if counts.get(k, 0) > 1]
        if ambiguous:
            i = ambiguous[0]
            raise InputError(
                f"{source}: filenames {keys[i]!r} (row {edits.index[i]}) matches "
                f"{counts[keys[i]]} rows of the pool (images of that name from different "
                "inboxes); edit by content hash instead: --key content_hash"
            )
    rows = pd.Index(column).get_indexer(keys)
    unknown = np.flatnonzero(rows < 0)
    if unknown.size:
        i = int(unknown[0])
        raise InputError(
            f"{source}: {unknown.size} {key} value(s) match no row of the pool; the first is "
            f"{keys[i]!r} (row {edits.index[i]})"
        )
    return np.asarray(rows)


def _check_unchanged(
    table: pd.DataFrame,
    edits: pd.DataFrame,
    rows: np.ndarray,
    columns: list[str],
    *,
    key: str,
    source: str,
) -> None:
    """Refuse the first of datapool's ``columns`` whose cell differs from the pool's."""
    for column in columns:
        if column == key:
            continue
        pool = table[column].iloc[rows]
        given = edits[column]
        if pd.api.types.is_numeric_dtype(pool):
            same = _same_numbers(pool.to_numpy(dtype=np.float64), given)
        else:
            same = _text(pool) == _text(given)
        if not same.all():
            i = int(np.flatnonzero(~same)[0])
            raise InputError(
                f"{source}: column {column} is datapool's own and cannot be edited: row "
                f"{edits.index[i]} ({key}={_text(edits[key])[i]!r}) has {_text(given)[i]!r}, "
                f"the pool {_text(pool)[i]!r}. Only labels and columns of your own can be "
                f"set; leave {column} out, or as the pool has it"
            )


def _same_numbers(pool: np.ndarray, given: pd.Series) -> np.ndarray:
    """Per cell: ``given`` (text or numbers) is the pool's number as float32, to within
    one float32 unit in the last place, or both are empty."""
    text = given.where(~_blank_cells(given), np.nan)
    numbers = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
    ulp = np.spacing(np.abs(pool).astype(np.float32)).astype(np.float64)
    with np.errstate(invalid="ignore"):
        close = np.abs(numbers - pool) <= ulp
    return np.asarray(close | (np.isnan(numbers) & np.isnan(pool)))


# --- recording the edit as a pool version -----------------------------------------------------


@dataclass(frozen=True)
class Labelled:
    """What :func:`label_pool` did.

    Attributes:
        pool: the pool's name.
        edited: what changed (:class:`Edited`).
        revision: the commit recording the new version; None when nothing changed
            or with ``keep_history=false`` (not committed).
        history_note: with ``keep_history=false``, what became of earlier versions.
    """

    pool: str
    edited: Edited
    revision: str | None
    history_note: str = ""

    def line(self) -> str:
        """The one line the command prints."""
        what = f"pool {self.pool}: {self.edited.describe()}"
        if not self.edited.changes:
            return f"{what}; the pool is as it was, nothing recorded"
        if self.history_note:
            return f"{what}; not committed (keep_history=false; {self.history_note})"
        return f"{what}, revision {(self.revision or '?')[:7]}"


def label_pool(
    workspace: Path,
    name: str,
    edits: Path,
    *,
    key: str | None = None,
    report: Report = to_stderr,
) -> Labelled:
    """Apply EDITS.csv (``edits``) to pool ``name`` and record the result as its next
    version, as one version transaction (:mod:`datapool.version`, command ``label``).

    ``key``: ``content_hash`` or ``filenames``; None picks :func:`choose_key`. The
    pool's rows are edited (:func:`apply_edits`) and written as a new version
    (:func:`datapool.transaction.save_pool`: only shards whose rows changed are
    rewritten; the model and the latest increment stay). ``datapool_latest.csv``
    is written again when the pool has one now (so also when EDITS.csv *is* that
    file), else not. Then the version is recorded where the pool is recorded: for
    the pipeline's pool (dvc.lock's merge output) by ``dvc commit --force merge``,
    for a parked pool by ``dvc add pools/NAME``; and committed (dvc.lock, or
    ``pools/NAME.dvc``). With ``datapool.keep_history: false`` the pipeline's pool
    is not committed and its earlier versions are dropped, as ``run`` does.
    Nothing changes when no cell does.

    Refused before anything is written (:class:`InputError`, :class:`PoolError`):
    what :func:`read_edits` and :func:`apply_edits` refuse; a pool the workspace
    does not record, or whose data is not here (``dvc pull``); a spreadsheet's lock
    file in the pool folder (it would be recorded with the version); params.yaml
    naming another pool than dvc.lock records, or naming a parked pool (the
    pipeline was switched but not run). Refused after writing, and rolled back:
    ``dvc commit`` would also record merge inputs that changed since the last run
    (params.yaml edited by hand, ``work/`` changed): they would pass for what made
    the pool. On any failure after writing began, the transaction puts the
    records back, the pool's data is checked out again at the recorded version,
    and EDITS.csv, if it lies in the pool folder, gets its bytes back. After a
    kill (SIGKILL) before the version is recorded, the next command rolls the
    records back (:func:`datapool.version.recover`) and, the pool's manifest having
    changed since the journal was written, checks the recorded version out again.
    """
    try:
        data = edits.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {edits}: {err.strerror or err}") from None
    changes = read_edits(data, source=str(edits))
    key = key or choose_key(changes)
    folder = pool_dir(workspace, name)
    with workspace_lock(workspace):
        written = False
        try:
            with transaction(workspace, locked=True, report=report) as txn:
                record = _recorded(workspace, name)
                pool = _open(workspace, name)
                new, edited = apply_edits(pool, changes, key, source=str(edits))
                if not edited.changes:
                    return Labelled(name, edited, None)
                keep = record.parked or _keep_history(workspace)
                message = f"pool {name}: labels edited from {edits.name}, {edited.describe()}"
                txn.begin(
                    command="label",
                    pool=name,
                    message=message,
                    parked=record.parked,
                    keep_history=keep,
                    replaced=None if keep else record,
                )
                written = True
                has_csv = (folder / POOL_CSV).is_file()
                save_pool(
                    folder,
                    new,
                    checkpoint=None,
                    sources={},
                    csv_max_rows=len(new) if has_csv else 0,
                )
                _record(workspace, name, record)
                txn.done(message)
        except BaseException:
            if written and txn.finished is None and not (workspace / JOURNAL).exists():
                _undo_data(workspace, name, edits, data)  # rolled back
            raise
    forgotten = txn.finished.forgotten if txn.finished is not None else None
    revision = txn.finished.revision if txn.finished is not None else None
    return Labelled(name, edited, revision, forgotten.note if forgotten is not None else "")


def _recorded(workspace: Path, name: str) -> Record:
    """How the workspace records pool ``name``, checked recordable again (see label_pool)."""
    record = current_record(workspace, name)
    if record is None:
        raise InputError(
            f"pool {name} is not recorded in {workspace} (neither by dvc.lock's merge stage "
            f"nor by pools/{name}.dvc); `datapool history NAME` lists the pools' revisions"
        )
    named = pipeline_pool(workspace)
    if not record.parked and named != name:
        raise InputError(
            f"dvc.lock records pool {name} but params.yaml names {named}: `dvc commit` "
            "would record the wrong pool. Run the pipeline first (`datapool run`), or set "
            f"datapool.name back to {name}"
        )
    if record.parked and named == name:
        raise InputError(
            f"pool {name} is parked (pools/{name}.dvc) but params.yaml makes it the "
            "pipeline's pool, which `dvc add` cannot record. Run the pipeline first "
            "(`datapool run`), or set datapool.name back"
        )
    return record


def _open(workspace: Path, name: str) -> pd.DataFrame:
    """The pool's rows (an interrupted save finished first); PoolError when its data
    is not here or a spreadsheet's lock file lies in its folder."""
    folder = pool_dir(workspace, name)
    locks = (
        sorted(p.name for p in folder.glob("*") if p.name.startswith(_SPREADSHEET_LOCKS))
        if folder.is_dir()
        else []
    )
    if locks:
        raise PoolError(
            f"{folder} holds {locks[0]}, a spreadsheet's lock file: close the CSV in the "
            "spreadsheet (or delete that file), then label again; it would otherwise be "
            "recorded as part of the pool"
        )
    table = open_pool(folder, lock_file=workspace / LOCK)
    if table is None:
        raise PoolError(
            f"pool {name} is recorded but {folder} holds no pool; bring it back with "
            f"`dvc pull` (or `dvc checkout` if it is in the local cache)"
        )
    return table


def _keep_history(workspace: Path) -> bool:
    """``datapool.keep_history`` in params.yaml (true when absent), checked."""
    params = load_params((workspace / PARAMS).read_text(encoding="utf-8"))
    flat = flatten(params) if isinstance(params, dict) else {}
    return bool(check_value("datapool.keep_history", flat.get("datapool.keep_history", True)))


def _record(workspace: Path, name: str, record: Record) -> None:
    """Record the pool folder as it is now where ``record`` says the pool is recorded."""
    if record.parked:
        park(workspace, name)
        return
    before = merge_entry(read_text_if_file(workspace / LOCK))
    run_tool(["dvc", "commit", "--force", "merge"], cwd=workspace, quiet=True)
    changed = _inputs_changed(before, merge_entry(read_text_if_file(workspace / LOCK)))
    if changed:
        raise InputError(
            f"the pipeline's inputs changed since its last run ({', '.join(changed)}), and "
            "recording the edited pool in dvc.lock would record them as what made it; "
            "nothing was changed. Run the pipeline first (`datapool run`), or put them back, "
            "then label again"
        )


def _inputs_changed(before: object, after: object) -> list[str]:
    """What differs between two dvc.lock merge entries besides the outputs: each
    dependency's path, each parameter's dotted name, else the command (dvc.yaml)."""
    old = before if isinstance(before, dict) else {}
    new = after if isinstance(after, dict) else {}
    deps = [{str(d.get("path")): d for d in (e.get("deps") or [])} for e in (old, new)]
    changed = sorted(p for p in set(deps[0]) | set(deps[1]) if deps[0].get(p) != deps[1].get(p))
    params = [
        {k: v for values in (e.get("params") or {}).values() for k, v in flatten(values).items()}
        for e in (old, new)
    ]
    changed += sorted(
        k for k in set(params[0]) | set(params[1]) if params[0].get(k) != params[1].get(k)
    )
    if not changed and old.get("cmd") != new.get("cmd"):
        changed.append("merge's command in dvc.yaml")
    return changed


def _undo_data(workspace: Path, name: str, edits: Path, data: bytes) -> None:
    """After a label rolled back (the rollback has checked the recorded version of the
    pool out again, its manifest having changed): EDITS.csv's bytes back if it lay in
    the pool folder (the user's edited CSV, which the checkout replaced)."""
    folder = pool_dir(workspace, name).resolve()
    if edits.resolve().parent == folder:
        with atomic_open(edits, "wb") as handle:
            handle.write(data)
