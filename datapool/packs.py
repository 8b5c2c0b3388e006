"""The pool's images: one uncompressed ZIP per batch, and the one way to read a row's image.

A pool keeps its own copy of every image (so DVC versions them) in *packs*,
``images/batch-<16 hex>.zip``, one per batch that added rows, under the key
that batch's shard has (:func:`datapool.store.batch_key`). A member is named
as the loose copy used to be, ``<content_hash><ext>``
(:func:`datapool.pool.image_name`). Why packs: a pool of a million loose
images made DVC stat a million files on every ``dvc repro`` (58.7 s) and made
each version's ``.dir`` listing in the cache grow with the whole pool; with
packs both are O(batches).

Decisions:

* ZIP, ``ZIP_STORED`` (no compression): stdlib ``zipfile``; a member is found
  by name through the central directory without reading the others; every
  OS's file manager opens it; images are compressed already.
* Packs are separate from the shards: a new model rewrites every shard but
  no pack, so a retrain never copies an image again.
* Same images, same bytes: members sorted by name, a fixed date
  (1980-01-01 00:00:00, the earliest a ZIP holds), fixed attributes (a regular
  file, ``rw-r--r--``, made on "Unix"), no comment or extra field. DVC then
  stores a pack once across versions and pools.
* The manifest lists each pack with its member count and the sha256 of its
  sorted member names (:class:`datapool.store.Pack`); a pack that disagrees,
  does not open, lacks a member, or whose member does not hash to the row's
  ``content_hash`` is refused with a :class:`PoolError` naming it.
* One reader (:class:`PoolImages`): a row's image is read from its batch's
  pack, or in a pool written before the packs (:data:`datapool.store.LOOSE_FORMAT`,
  or a CSV-only pool) from its loose ``images/<hash><ext>``; when the pool's
  copy is not there (a pack not checked out), from the original
  ``source/filenames``. Every read is checked against the row's content hash.
"""

from __future__ import annotations

import hashlib
import itertools
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

import pandas as pd

from datapool.atomic import atomic_open
from datapool.errors import PoolError
from datapool.pool import image_name, is_content_hash, stored_image
from datapool.store import (
    COMPLETE,
    INCOMING,
    MANIFEST,
    Manifest,
    Pack,
    members_fingerprint,
    read_manifest,
)

DATE = (1980, 1, 1, 0, 0, 0)  # every member's date: the earliest a ZIP can hold
_ATTRIBUTES = 0o100644 << 16  # a regular file, rw-r--r-- (what unzip gives the extracted file)
_UNIX = 3  # ZIP's "made by" system, fixed so the bytes do not depend on the writer's OS


def write_pack(path: Path, names: Sequence[str], read: Callable[[str], bytes]) -> None:
    """Write the pack ``path`` holding ``names`` (member names), each member's bytes
    from ``read(name)``, atomically (temp file, fsync, rename).

    Members go in sorted order with fixed metadata, so the same names and bytes
    give the same file. One image is in memory at a time. Raises what ``read`` raises
    (the temp file is removed); :class:`PoolError` for a name given twice.
    """
    ordered = sorted(names)
    repeated = [a for a, b in itertools.pairwise(ordered) if a == b]
    if repeated:
        raise PoolError(f"{path}: image {repeated[0]} would be packed twice")
    with (
        atomic_open(path, "wb") as handle,
        zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as pack,
    ):
        for name in ordered:
            info = zipfile.ZipInfo(name, date_time=DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = _ATTRIBUTES
            info.create_system = _UNIX
            pack.writestr(info, read(name))


@dataclass(frozen=True)
class Member:
    """One image inside a pack.

    Attributes:
        pack: the pack file.
        listed: what the manifest says the pack holds (checked when it is opened).
        name: the member, ``<content_hash><ext>``.
    """

    pack: Path
    listed: Pack
    name: str


# Where an image can be read from: a file (an original, a loose copy) or a pack member.
Source = Path | Member


class _Closing:
    """A context manager that calls ``self.close()`` on exit (packs stay open until then)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError


class Packs(_Closing):
    """Open packs, each opened and checked against its manifest entry once; close when done
    (a context manager). Not thread-safe."""

    def __init__(self) -> None:
        self._open: dict[Path, zipfile.ZipFile] = {}
        self._names: dict[Path, frozenset[str]] = {}

    def close(self) -> None:
        """Close every pack opened so far."""
        for pack in self._open.values():
            pack.close()
        self._open.clear()
        self._names.clear()

    def names(self, pack: Path, listed: Pack) -> frozenset[str]:
        """The member names of ``pack``, which must hold what ``listed`` says."""
        if pack not in self._names:
            self._names[pack] = frozenset(self._opened(pack, listed).namelist())
        return self._names[pack]

    def read(self, member: Member) -> bytes:
        """A member's bytes (its CRC checked by ``zipfile``); PoolError naming the pack
        if it is missing, damaged, not the listed pack, or lacks the member."""
        pack = self._opened(member.pack, member.listed)
        try:
            return pack.read(member.name)
        except KeyError:
            raise PoolError(
                f"{member.pack} lacks the image {member.name} (its manifest lists it)"
            ) from None
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise PoolError(f"{member.pack}: image {member.name} is damaged: {err}") from err

    def _opened(self, path: Path, listed: Pack) -> zipfile.ZipFile:
        if path in self._open:
            return self._open[path]
        try:
            pack = zipfile.ZipFile(path)
        except FileNotFoundError:
            raise PoolError(
                f"{path} is missing; bring the version back with `dvc checkout`"
            ) from None
        except (zipfile.BadZipFile, OSError) as err:
            raise PoolError(f"{path} is not a readable image pack (ZIP): {err}") from err
        names = pack.namelist()
        if len(names) != listed.members or members_fingerprint(names) != listed.fingerprint:
            pack.close()
            raise PoolError(
                f"{path} holds other images than the manifest lists ({len(names)} members, "
                f"listed {listed.members}; fingerprint {members_fingerprint(names)[:12]}, listed "
                f"{listed.fingerprint[:12]}): the folder mixes two versions, or the pack was edited"
            )
        self._open[path] = pack
        return pack


def read_source(source: Source, packs: Packs) -> bytes:
    """The bytes at ``source`` (unchecked); PoolError naming the file if it cannot be read."""
    if isinstance(source, Member):
        return packs.read(source)
    try:
        return source.read_bytes()
    except OSError as err:
        raise PoolError(f"cannot read {source}: {err}") from err


def same_content(data: bytes, content_hash: str) -> bool:
    """True when ``data``'s sha256 is ``content_hash``."""
    return hashlib.sha256(data).hexdigest() == content_hash


def describe(source: Source) -> str:
    """A source as an error message names it: a file, or ``pack (member name)``."""
    return f"{source.pack} ({source.name})" if isinstance(source, Member) else str(source)


class PoolImages(_Closing):
    """The images of the pool in ``pool_dir``: where each row's image is, and its bytes.

    ``manifest`` is the version to read: by default the folder's, or that of a stage
    marked complete (as :func:`datapool.store.load_pool` reads it); None for a pool
    without one (a pool before the shards, a new pool). A context
    manager: packs stay open until :meth:`close`. Rows are pool rows (a ``pd.Series``
    with ``content_hash``, ``filenames``, ``batch_id``, ``source``).
    """

    def __init__(
        self, pool_dir: Path, *, manifest: Manifest | Literal["folder"] | None = "folder"
    ) -> None:
        self.pool_dir = pool_dir
        self._overlay: Path | None = None
        if manifest == "folder":
            staged = pool_dir / INCOMING
            if (staged / COMPLETE).exists() and (staged / MANIFEST).is_file():
                self._overlay, manifest = staged, read_manifest(staged)
            else:
                manifest = read_manifest(pool_dir)
        self.manifest = manifest
        listed = manifest.packs if manifest is not None else []
        self._by_batch = {p.batch_id: p for p in listed}
        self.packs = Packs()

    def close(self) -> None:
        """Close the packs opened so far."""
        self.packs.close()

    def own_copy(self, *, content_hash: str, filename: str, batch_id: str) -> Source | None:
        """The pool's own copy of an image (a member of its batch's pack, or a loose file in
        a pool before the packs), or None when the folder does not hold it (a pack is not
        opened here). PoolError if ``content_hash`` is not one (it would name a file
        outside the pool)."""
        digest = _checked(content_hash, self.pool_dir)
        if self.manifest is None or self.manifest.loose:
            loose = stored_image(self.pool_dir, content_hash=digest, filename=filename)
            return loose if loose.is_file() else None
        listed = self._by_batch.get(batch_id)
        if listed is None:
            return None
        path = self.pool_dir / listed.file
        if self._overlay is not None and (self._overlay / listed.file).is_file():
            path = self._overlay / listed.file
        if not path.is_file():
            return None
        return Member(path, listed, image_name(digest, filename))

    def locate(self, row: pd.Series) -> Source:
        """Where ``row``'s image is: the pool's copy, else the original ``source/filenames``
        (which need not exist)."""
        own = self.own_copy(
            content_hash=str(row["content_hash"]),
            filename=str(row["filenames"]),
            batch_id=str(row["batch_id"]),
        )
        return own or Path(str(row["source"])) / str(row["filenames"])

    def read(self, row: pd.Series) -> bytes:
        """``row``'s image, checked against its content hash. Raises :class:`PoolError`
        naming the pack (or file) when it is neither in the pool nor at its source,
        is damaged, or is not the row's image."""
        source = self.locate(row)
        if isinstance(source, Path) and not source.is_file():
            raise PoolError(
                f"the image of {row['filenames']!r} is neither in {self.pool_dir} nor at {source}"
            )
        data = read_source(source, self.packs)
        if not same_content(data, str(row["content_hash"])):
            raise PoolError(
                f"the image of {row['filenames']!r} ({describe(source)}) does not hash to its "
                f"content_hash {row['content_hash']}: it changed since it was pooled, or is "
                "another file"
            )
        return data


def _checked(digest: str, pool_dir: Path) -> str:
    if not is_content_hash(digest):
        raise PoolError(
            f"{digest!r} is not a content hash (64 lowercase hex digits), so it names no "
            f"image of {pool_dir}"
        )
    return digest


def read_image(pool_dir: Path, row: pd.Series) -> bytes:
    """One row's image from the pool in ``pool_dir`` (see :class:`PoolImages`); for many
    rows, use one :class:`PoolImages` (it opens each pack once)."""
    with PoolImages(pool_dir) as images:
        return images.read(row)


def extract_images(pool_dir: Path, rows: pd.DataFrame, folder: Path) -> list[Path]:
    """Write each of ``rows``' images into ``folder`` as ``<position><ext>`` (a name made
    here, never a value read from the pool) and return the files in row order: for code
    that decodes files by path (training, embedding). Raises as :meth:`PoolImages.read`.
    """
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    with PoolImages(pool_dir) as images:
        for position, (_, row) in enumerate(rows.iterrows()):
            data = images.read(row)  # checks the content hash first: the name below is safe
            name = image_name(str(row["content_hash"]), str(row["filenames"]))
            path = folder / f"{position}{name[64:]}"  # the suffix image_name made safe
            path.write_bytes(data)
            paths.append(path)
    return paths
