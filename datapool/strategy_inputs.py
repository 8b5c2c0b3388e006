"""Readers for the selection inputs of :mod:`datapool.strategies` (issue 11).

Pure functions from files to arrays aligned with a list of candidate filenames
(paths relative to ``input_dir``, ``/``-separated, as the pool's ``filenames``
column holds them). Every failure is an :class:`InputError` naming the file and
its line (the header of a CSV is line 1, its first data row line 2).

Formats (Lightly's tools accept the same):

* **name list** (``relevant_filenames_file``, masked or pre-selected files):
  one relative path per line; blank lines are skipped, surrounding whitespace
  and a leading ``./`` are dropped, ``\\`` is read as ``/``.
* **flag CSV**: a ``filenames`` column and a flag column (``masked`` or
  ``selected``) holding ``true/false``, ``1/0`` or ``yes/no`` (any case).
* **score CSV**: a ``filenames`` column and any other columns (model scores,
  numeric or categorical metadata), one row per file.

Names that match no candidate are ignored, not refused: a list may cover the
whole dataset while one increment's candidates are only its batch. The readers
report them (``unmatched``) so a caller can log how many there were.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt
import pandas as pd

from datapool.errors import InputError

__all__ = [
    "Flags",
    "ScoreTable",
    "flags_for",
    "normalise_name",
    "read_flags",
    "read_names",
    "read_scores",
]

_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f", ""}


def normalise_name(raw: str, where: str) -> str:
    """``" ./a\\\\b.png "`` -> ``"a/b.png"``; InputError (naming ``where``) for an absolute path."""
    name = raw.strip().replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InputError(f"{where}: {raw.strip()!r} is absolute; give paths relative to input_dir")
    return PurePosixPath(name).as_posix() if name else ""


def read_names(path: Path) -> list[str]:
    """The relative paths listed one per line in ``path`` (a name list, see module docstring).

    Raises InputError if the file is missing or unreadable, or a line is absolute.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the file list {path}: {err}") from err
    names = [
        normalise_name(line, f"{path} line {i}") for i, line in enumerate(text.splitlines(), 1)
    ]
    return [n for n in names if n]


def _read_csv(path: Path) -> pd.DataFrame:
    """Every column of ``path`` as strings (empty cells ""), ``filenames`` normalised.

    InputError if missing, unreadable, without ``filenames`` or with an empty name.
    """
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as err:
        raise InputError(f"the file {path} does not exist") from err
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise InputError(f"cannot read the CSV file {path}: {err}") from err
    frame.columns = [str(c).strip() for c in frame.columns]
    if "filenames" not in frame.columns:
        raise InputError(f"{path} has no 'filenames' column (columns: {', '.join(frame.columns)})")
    names = [normalise_name(v, f"{path} line {i + 2}") for i, v in enumerate(frame["filenames"])]
    frame["filenames"] = names
    empty = [i for i, v in enumerate(names) if not v]
    if empty:
        raise InputError(f"{path} line {empty[0] + 2}: the filenames cell is empty")
    return frame


def _flag_column(path: Path, frame: pd.DataFrame, column: str) -> list[str]:
    """Filenames whose ``column`` is true; InputError for an unknown column or value."""
    if column not in frame.columns:
        raise InputError(f"{path} has no {column!r} column (columns: {', '.join(frame.columns)})")
    out = []
    for i, (name, raw) in enumerate(zip(frame["filenames"], frame[column], strict=True)):
        value = raw.strip().lower()
        if value in _TRUE:
            out.append(name)
        elif value not in _FALSE:
            raise InputError(
                f"{path} line {i + 2} (filenames={name!r}): {column}={raw!r} is not "
                "true/false, 1/0 or yes/no"
            )
    return out


@dataclass(frozen=True)
class Flags:
    """A boolean mask over the candidates and the listed names that matched none.

    Attributes:
        mask: bool ``[n]``, True for candidates the file names.
        unmatched: the listed names that are not candidates, in file order.
    """

    mask: npt.NDArray[np.bool_]
    unmatched: tuple[str, ...]


def flags_for(names: Iterable[str], filenames: Sequence[str]) -> Flags:
    """Mark the candidates ``filenames`` whose name is in ``names``."""
    wanted = list(dict.fromkeys(names))
    index = {name: i for i, name in enumerate(filenames)}
    mask = np.zeros(len(filenames), dtype=bool)
    unmatched = []
    for name in wanted:
        i = index.get(name)
        if i is None:
            unmatched.append(name)
        else:
            mask[i] = True
    return Flags(mask, tuple(unmatched))


def read_flags(path: Path, column: str, filenames: Sequence[str]) -> Flags:
    """Candidates named by ``path``: a CSV (``.csv``, flag ``column``) or else a name list.

    ``column`` is ``"masked"`` or ``"selected"`` for Lightly-style CSVs.
    Raises InputError for a missing file, no ``filenames`` or ``column``
    column, a flag value that is not boolean, or an absolute path.
    """
    if path.suffix.lower() == ".csv":
        names = _flag_column(path, _read_csv(path), column)
    else:
        if not path.exists():
            raise InputError(f"the file {path} does not exist")
        names = read_names(path)
    return flags_for(names, filenames)


@dataclass(frozen=True)
class ScoreTable:
    """Per-file scores and metadata read from a CSV keyed by ``filenames``.

    Attributes:
        path: the file, for messages.
        frame: every column as strings, indexed by the normalised filename.
        lines: the file line of each row (same index).
    """

    path: Path
    frame: pd.DataFrame
    lines: pd.Series

    def _cells(self, column: str, filenames: Sequence[str]) -> npt.NDArray[np.object_]:
        """The ``column`` cell of each of ``filenames``; InputError for a missing column or row."""
        if column == "filenames" or column not in self.frame.columns:
            known = ", ".join(c for c in self.frame.columns)
            raise InputError(f"{self.path} has no column {column!r} (columns: {known})")
        found = self.frame.index.get_indexer(pd.Index(list(filenames)))
        if (found < 0).any():
            missing = filenames[int(np.flatnonzero(found < 0)[0])]
            raise InputError(
                f"{self.path} has no row for {missing!r} "
                f"({int((found < 0).sum())} candidate(s) missing)"
            )
        cells: npt.NDArray[np.object_] = self.frame[column].to_numpy(dtype=object)[found]
        return cells

    def where(self, name: str) -> str:
        """``"scores.csv line 7 (filenames='a.png')"``: where ``name``'s row is."""
        return f"{self.path} line {int(self.lines[name])} (filenames={name!r})"

    def numbers(self, column: str, filenames: Sequence[str]) -> npt.NDArray[np.float64]:
        """``column`` as float64 ``[len(filenames)]``; InputError naming the row of a non-number.

        Empty cells and ``nan`` are refused too: a score the strategies would
        have to guess is an input error.
        """
        cells = self._cells(column, filenames)
        out = np.empty(len(cells), dtype=np.float64)
        for i, cell in enumerate(cells):
            try:
                out[i] = float(cell)
            except ValueError:
                out[i] = math.nan
            if not math.isfinite(out[i]):
                raise InputError(
                    f"{self.where(filenames[i])}: {column}={cell!r} is not a finite number"
                )
        return out

    def labels(self, column: str, filenames: Sequence[str]) -> npt.NDArray[np.object_]:
        """``column`` as strings (categorical metadata, stripped) aligned with ``filenames``."""
        return np.array([str(c).strip() for c in self._cells(column, filenames)], dtype=object)


def read_scores(path: Path) -> ScoreTable:
    """Read a score CSV (module docstring). InputError if the file is missing or
    unreadable, lacks ``filenames``, or names a file twice (naming both lines)."""
    frame = _read_csv(path)
    lines = pd.Series(np.arange(2, len(frame) + 2), index=frame["filenames"])
    twice = frame["filenames"].duplicated().to_numpy()
    if twice.any():
        i = int(np.flatnonzero(twice)[0])
        name = frame["filenames"].iloc[i]
        first = int(np.flatnonzero((frame["filenames"] == name).to_numpy())[0])
        raise InputError(f"{path} line {i + 2}: {name!r} already has a row (line {first + 2})")
    return ScoreTable(path, frame.set_index("filenames"), lines)
