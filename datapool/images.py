"""Finding image files in a folder tree, hashing them and decoding them to RGB.

Three jobs, each kept independent of torch so that the embedding code and the
corruptness check share one decoder:

* :func:`discover_images` lists the image files under an input folder, fast
  enough for millions of files (one ``os.scandir`` pass, no ``stat`` per file);
* :func:`content_hash` gives a file's identity for duplicate detection and
  batch ids;
* :func:`load_rgb` decodes one file to a fully loaded RGB image, or raises
  :class:`CorruptImageError` with a short reason meant for the corrupt list.

Nothing here changes Pillow's global settings (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``) or the process's warning filters, so it is
safe to call from several threads. The pixel limit is :data:`MAX_IMAGE_PIXELS`,
checked explicitly per file from the header. It equals Pillow's own limit, so every
file for which Pillow emits its ``DecompressionBombWarning`` is refused too; Pillow
still emits that warning (once, under the default filters), because silencing it
would mean ``warnings.catch_warnings``, which swaps process-wide state and is not
thread-safe. Under ``-W error`` the warning arrives as an exception and is turned
into the same :class:`CorruptImageError`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from datapool.errors import InputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_ASPECT_RATIO",
    "MAX_IMAGE_PIXELS",
    "RACY_WINDOW_NS",
    "TRANSPARENT_BACKGROUND",
    "CorruptImageError",
    "ImageFile",
    "InboxManifest",
    "Signature",
    "check_image",
    "content_hash",
    "discover_images",
    "inbox_manifest",
    "load_rgb",
    "printable_relpath",
    "read_hash_cache",
]

logger = logging.getLogger(__name__)

#: File-name extensions (lowercase, with the dot) that :func:`discover_images` picks up.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
)

#: Largest image, in pixels (width x height), that :func:`load_rgb` decodes.
#: Pillow's default limit (about 0.25 GiB of 24-bit pixels); anything larger is
#: reported as a decompression bomb rather than risking the worker's memory.
MAX_IMAGE_PIXELS: int = 89_478_485

#: Largest ratio of an image's long side to its short side that :func:`load_rgb` decodes.
#: Every consumer resizes the short side to the model's input size first, so a tiny
#: file of 100000x1 pixels (370 bytes, far below the pixel limit) would become a
#: 224 x 22.4-million-pixel image: a MemoryError that stops the run. At 100:1 that
#: intermediate stays below 16 MB at 224 pixels; the centre crop of anything longer
#: would show the model under 1% of the picture anyway.
MAX_ASPECT_RATIO: int = 100

#: RGB colour that transparent pixels are composited onto. White, because that is
#: how browsers and most labelling tools show transparent images, so the model
#: sees what the person labelling it sees.
TRANSPARENT_BACKGROUND: tuple[int, int, int] = (255, 255, 255)

#: Pillow decoders :func:`load_rgb` may use: those of :data:`IMAGE_EXTENSIONS` ("JPEG"
#: also opens MPO, the multi-picture JPEG of phone cameras). Others are refused even if
#: Pillow has them: a file named ``.png`` must not reach e.g. the EPS plugin, which runs
#: Ghostscript.
_DECODERS = ("JPEG", "PNG", "BMP", "WEBP", "TIFF", "GIF")

_HASH_CHUNK = 1 << 20  # 1 MiB: large enough to amortise syscalls, small enough for RAM

# Exceptions Pillow's decoders raise on malformed input. Pillow is not consistent
# (plugins use SyntaxError, struct.error, IndexError … for bad data), and one bad
# file must never stop a run, so all of them mean "corrupt file".
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True, slots=True)
class ImageFile:
    """One image file found by :func:`discover_images`.

    Attributes:
        path: absolute path of the file (symbolic links inside the tree are not resolved).
        relpath: POSIX path relative to the discovery root, e.g. ``"cats/a.jpg"``.
        label: the folder part of ``relpath`` (``"cats"``, ``"a/b"``); ``""`` at the root.
    """

    path: Path
    relpath: str
    label: str


SkipCallback = Callable[[Path, str], None]


def discover_images(root: Path, *, on_skip: SkipCallback | None = None) -> list[ImageFile]:
    """List every image file under ``root``, recursively, sorted by ``relpath``.

    A file is an image when its extension, lower-cased, is in :data:`IMAGE_EXTENSIONS`.
    Names starting with ``"."`` (hidden files and folders, macOS ``._*`` files) are
    ignored. Symbolic links are followed, to files and to folders; each folder is
    entered at most once (tracked by device and inode), so link loops terminate and
    a folder reachable by two paths is listed once, under the path met first by a
    depth-first walk in name order. Links to the same file are listed once per link
    (duplicate content is for :func:`content_hash` to find).

    Skipped, each logged as a warning and passed to ``on_skip(path, reason)``: folders
    that cannot be read, image-named entries that are broken links or not regular
    files (a named pipe would block a loader), names that are not valid UTF-8
    (they could not be written to the pool's CSV) and names with a line break
    (Lightly's lists hold one name per line).

    Cost: one ``readdir`` record per entry and one ``stat`` per folder; roughly 4-8 s
    and 400 bytes per image for a million entries on 2 cores.

    Raises:
        InputError: ``root`` does not exist, is not a folder, or cannot be read.
    """
    root_path = Path(root).absolute()
    if not root_path.exists():
        raise InputError(f"input folder {root_path} does not exist")
    if not root_path.is_dir():
        raise InputError(f"input folder {root_path} is not a folder")
    try:
        with os.scandir(root_path):
            pass
    except OSError as exc:
        raise InputError(f"cannot read input folder {root_path}: {exc.strerror}") from exc

    def skip(path: str, reason: str) -> None:
        # A name that is not UTF-8 holds lone surrogates, which a log handler (or a
        # test runner's worker channel) cannot encode: log its bytes as \xNN instead.
        shown = os.fsencode(path).decode("utf-8", "backslashreplace")
        logger.warning("skipping %s: %s", shown, reason)
        if on_skip is not None:
            on_skip(Path(path), reason)

    found: list[ImageFile] = []
    visited: set[tuple[int, int]] = set()
    # Depth-first with an explicit stack (deep trees must not hit the recursion limit).
    stack: list[tuple[Path, str]] = [(root_path, "")]
    while stack:
        dir_path, label = stack.pop()
        if not _first_visit(dir_path, visited, skip):
            continue
        subdirs = _scan_dir(dir_path, label, found, skip)
        # Reverse-sorted push = visiting in name order, so which path of a folder
        # linked twice wins does not depend on the file system's listing order.
        for name in sorted(subdirs, reverse=True):
            stack.append((dir_path / name, f"{label}/{name}" if label else name))
    found.sort(key=attrgetter("relpath"))
    return found


# Extensions without the dot, so the per-file test is one rpartition and a set lookup.
_EXTENSIONS = frozenset(ext[1:] for ext in IMAGE_EXTENSIONS)


def _scan_dir(
    dir_path: Path, label: str, found: list[ImageFile], skip: Callable[[str, str], None]
) -> list[str]:
    """Append the images directly in ``dir_path`` to ``found``; return its sub-folder names.

    Uses ``DirEntry.is_dir``/``is_file``, which read the type from the directory
    listing (``d_type``) and only ``stat`` symbolic links, so a million files cost a
    million ``readdir`` records, not a million ``stat`` calls. This loop is the hot
    path at scale (about 4 us a file, half of it building the ``Path``).
    """
    prefix = f"{label}/" if label else ""
    subdirs: list[str] = []
    try:
        with os.scandir(dir_path) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        subdirs.append(name)
                        continue
                    _, dot, ext = name.rpartition(".")
                    if not dot or ext.lower() not in _EXTENSIONS:
                        continue
                    relpath = prefix + name
                    if not entry.is_file():
                        broken = entry.is_symlink() and not os.path.exists(entry.path)  # noqa: PTH110
                        skip(entry.path, "broken symbolic link" if broken else "not a regular file")
                    elif not _is_utf8(relpath):
                        skip(entry.path, "file name is not valid UTF-8")
                    elif "\n" in relpath or "\r" in relpath:
                        skip(entry.path, _LINE_BREAK)
                    else:
                        found.append(ImageFile(dir_path / name, relpath, label))
                except OSError as exc:  # e.g. a link whose target cannot be stat-ed
                    skip(entry.path, exc.strerror or str(exc))
    except OSError as exc:
        skip(str(dir_path), f"cannot read folder: {exc.strerror or exc}")
    return subdirs


def _first_visit(
    dir_path: Path, visited: set[tuple[int, int]], skip: Callable[[str, str], None]
) -> bool:
    """Record the folder as visited; False if it was already (a link loop or alias).

    One ``stat`` per folder, never per file.
    """
    try:
        st = dir_path.stat()
    except OSError as exc:
        skip(str(dir_path), f"cannot read folder: {exc.strerror or exc}")
        return False
    key = (st.st_dev, st.st_ino)
    if key in visited:
        skip(str(dir_path), "folder already listed (symbolic link loop or second link to it)")
        return False
    visited.add(key)
    return True


# Lightly's name lists (sampled_filenames.txt, ...) hold one name per line.
_LINE_BREAK = "file name contains a line break, which a list of one name per line cannot hold"


def _is_utf8(text: str) -> bool:
    """True if ``text`` encodes to UTF-8 (os.fsdecode turns undecodable bytes into surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_relpath(path: Path, *, root: Path) -> str:
    """``path`` relative to ``root`` as valid UTF-8 text, for the corrupt list.

    A name that is not UTF-8 comes from ``os.fsdecode`` with lone surrogates, which
    no JSON or CSV writer can encode; its undecodable bytes are written as ``\\xNN``,
    and line breaks as ``\\n`` / ``\\r`` (the corrupt list holds one name per line).
    """
    try:
        rel = path.relative_to(root)
    except ValueError:  # not under root: a folder reached through a link, keep it whole
        rel = path
    text = os.fsencode(rel.as_posix()).decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")


#: What ``stat`` says of a file: (size, mtime_ns, ctime_ns, inode, device). The inbox
#: stage trusts an unchanged signature to mean unchanged bytes. The mtime alone is not
#: enough: ``cp -p``, ``rsync -t``, ``tar -x`` and ``touch -r`` put an old mtime on new
#: bytes, and images of one format and size (BMP, TIFF) have one file size. The ctime
#: cannot be set by users: any write or ``utime`` moves it to the present. The device
#: makes an inode number from another file system (a remounted or swapped disk) differ.
Signature = tuple[int, int, int, int, int]

#: A file whose mtime or ctime is this close to the listing's start (or later) is hashed
#: but not cached: on a file system with coarse timestamps (FAT: 2 s, some network
#: file systems: 1 s) a write just after the listing keeps the same timestamps. This is
#: git's "racily clean" rule. It assumes the file system's clock is not more than this
#: behind the machine's; timestamps ahead of it (a clock in the future) are never cached.
RACY_WINDOW_NS = 2 * 10**9


@dataclass(frozen=True, slots=True)
class InboxManifest:
    """What the pipeline tracks of an inbox in place of its bytes (see :func:`inbox_manifest`).

    Attributes:
        images: ``(relpath, content hash)`` of every image file, sorted by relpath.
        skipped: ``{entry: reason}`` of every entry skipped or unreadable.
        signatures: ``{relpath: (signature, content hash)}`` of the files that the next
            listing may trust without reading them (not those changed just before this
            listing, see :data:`RACY_WINDOW_NS`); not part of the manifest, so a touched
            file changes nothing.
        input_dir: the listed folder, symbolic links resolved: the cache is only used
            for the folder it was made for.
    """

    images: list[tuple[str, str]]
    skipped: dict[str, str]
    signatures: dict[str, tuple[Signature, str]]
    input_dir: str

    def to_json(self) -> str:
        """One line per image, then the skipped entries: diffs of the file stay readable."""
        lines = [json.dumps(list(image), ensure_ascii=False) for image in self.images]
        body = ",\n".join(lines)
        skipped = json.dumps(self.skipped, ensure_ascii=False, indent=1)
        return f'{{"images": [\n{body}\n],\n"skipped": {skipped}}}\n'

    def cache_json(self) -> str:
        """:attr:`signatures` and :attr:`input_dir` as JSON, for :func:`read_hash_cache`."""
        files = {rel: [*sig, digest] for rel, (sig, digest) in self.signatures.items()}
        return json.dumps({"input_dir": self.input_dir, "files": files}, ensure_ascii=False) + "\n"


def read_hash_cache(path: Path, *, root: Path) -> dict[str, tuple[Signature, str]]:
    """The signatures a previous :meth:`InboxManifest.cache_json` wrote for ``root``.

    It is only a cache, so nothing here raises: ``{}`` (hash everything again) when
    the file is missing, unreadable, not JSON (or nested too deep to parse), not of
    the expected shape, or made for another folder than ``root`` (compared with
    symbolic links resolved). An entry other than ``[size, mtime_ns, ctime_ns, inode,
    device, 64 lowercase hex digits]`` with integer fields, size, inode and device
    >= 0 (timestamps before 1970 are negative), is dropped on its own.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: "[[[[..." nested deep
        return {}
    if (
        not isinstance(data, dict)
        or data.get("input_dir") != str(Path(root).resolve())
        or not isinstance(data.get("files"), dict)
    ):
        return {}
    cache: dict[str, tuple[Signature, str]] = {}
    for rel, entry in data["files"].items():
        if _valid_cache_entry(entry):
            size, mtime, ctime, inode, device, digest = entry
            cache[rel] = ((size, mtime, ctime, inode, device), digest)
    return cache


def _valid_cache_entry(entry: object) -> bool:
    """True if ``entry`` has the shape :meth:`InboxManifest.cache_json` writes."""
    if not isinstance(entry, list) or len(entry) != 6:
        return False
    numbers, digest = entry[:5], entry[5]
    if not all(type(v) is int for v in numbers):  # type(), not isinstance: no bools
        return False
    size, _, _, inode, device = numbers
    return (
        min(size, inode, device) >= 0
        and isinstance(digest, str)
        and bool(_SHA256.fullmatch(digest))
    )


_SHA256 = re.compile(r"[0-9a-f]{64}")


def inbox_manifest(
    root: Path,
    *,
    known: Mapping[str, tuple[Signature, str]] | None = None,
    threads: int = 8,
    listed_at_ns: int | None = None,
) -> InboxManifest:
    """List ``root`` for the pipeline's ``inbox`` stage: each image's content hash.

    Files are found by :func:`discover_images` and hashed by :func:`content_hash`,
    which opens regular files only; a file whose :data:`Signature` equals its entry
    in ``known`` (a previous listing's cache) is not read again. ``listed_at_ns`` is
    when the listing started (default: now), for :data:`RACY_WINDOW_NS`. DVC hashing
    the folder itself would open every entry: a named pipe there hangs ``dvc repro``
    forever, a link to ``/dev/zero`` reads without end, and a socket or a name that
    is not UTF-8 stops it. Here those are skipped and listed with their reason.

    Raises:
        InputError: ``root`` does not exist, is not a folder, or cannot be read.
    """
    root_path = Path(root).absolute()
    known = known or {}
    settled_before = (time.time_ns() if listed_at_ns is None else listed_at_ns) - RACY_WINDOW_NS
    skipped: dict[str, str] = {}

    def on_skip(path: Path, reason: str) -> None:
        skipped[printable_relpath(path, root=root_path)] = reason

    def one(item: ImageFile) -> tuple[Signature, str] | None:
        try:
            st = item.path.stat()
            signature = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
            cached = known.get(item.relpath)
            if cached is not None and cached[0] == signature:
                return cached
            return signature, content_hash(item.path)
        except OSError as exc:  # vanished, unreadable, or swapped for a pipe since listed
            skipped[item.relpath] = exc.strerror or str(exc)
            return None

    files = discover_images(root_path, on_skip=on_skip)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL
        results = list(pool.map(one, files))
    hashed = {f.relpath: r for f, r in zip(files, results, strict=True) if r is not None}
    return InboxManifest(
        images=[(rel, digest) for rel, (_, digest) in hashed.items()],
        skipped=dict(sorted(skipped.items())),
        signatures={
            rel: entry
            for rel, entry in hashed.items()
            if max(entry[0][1], entry[0][2]) < settled_before  # mtime, ctime
        },
        input_dir=str(root_path.resolve()),
    )


# --------------------------------------------------------------------------- hashing


def content_hash(path: Path) -> str:
    """SHA-256 of the file's bytes, as 64 lowercase hex digits.

    Streams the file in 1 MiB chunks, so memory use does not grow with file size.

    Raises:
        OSError: the file cannot be opened or read, or is not a regular file (a named
            pipe or device put where discovery saw an image would block or never end).
    """
    digest = hashlib.sha256()
    with _open_regular(Path(path)) as fh:
        # Most images are far below 1 MiB: sizing the buffer to the file saves zeroing
        # a whole MiB per call. A file that grows meanwhile is still read to its end.
        size = os.fstat(fh.fileno()).st_size
        buffer = bytearray(min(max(size, 1), _HASH_CHUNK))
        view = memoryview(buffer)
        while n := fh.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _open_regular(path: Path) -> io.FileIO:
    """Open ``path`` unbuffered for reading if it is a regular file; OSError otherwise.

    Opening a named pipe blocks until a writer appears, and a device such as
    ``/dev/zero`` never ends, so the file is opened without blocking and its type
    checked on the open descriptor (no window for swapping the file in between).
    ``O_NONBLOCK`` changes nothing for reads of a regular file.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):  # the message a plain open() gives
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return io.FileIO(fd, "rb", closefd=True)
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------- decoding


class CorruptImageError(Exception):
    """A file that cannot be decoded to an image; ``reason`` is short and human-readable.

    Deliberately not a :class:`~datapool.errors.DatapoolError`: it is caught per file,
    the file goes on the corrupt list and the run continues.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_rgb(
    path: Path, *, size_hint: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode the image at ``path`` into a fully loaded RGB image (first frame).

    Args:
        path: the image file.
        size_hint: side length, in pixels, the caller will resize to. JPEGs are then
            decoded at a reduced scale (``Image.draft``) whose short side is still at
            least ``size_hint`` — several times faster for large photos. ``None``
            decodes at full size.
        max_pixels: largest width x height accepted, checked from the header before
            any pixel is decoded. Raising it past Pillow's ``Image.MAX_IMAGE_PIXELS``
            does not lift Pillow's own hard limit (twice that).

    The EXIF orientation is applied. Every mode becomes RGB: alpha is composited onto
    :data:`TRANSPARENT_BACKGROUND`; 16-bit and 32-bit integer images are scaled to 8
    bits (not clipped); see :func:`_to_rgb` for the exact rules.

    Raises:
        CorruptImageError: the file is empty, truncated, not an image (only JPEG, PNG,
            BMP, WebP, TIFF and GIF content is decoded, whatever the name), larger than
            ``max_pixels``, longer than :data:`MAX_ASPECT_RATIO` times its width (or
            the reverse), unreadable, or fails to decode for any other reason.
        ValueError: ``size_hint`` or ``max_pixels`` is not positive.
    """
    if size_hint is not None and size_hint <= 0:
        raise ValueError(f"size_hint must be positive, got {size_hint}")
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    path = Path(path)
    try:
        with io.BufferedReader(_open_regular(path)) as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise CorruptImageError(path, "empty file")
            with Image.open(fh, formats=_DECODERS) as im:
                return _decode(im, path, size_hint, max_pixels)
    except CorruptImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise CorruptImageError(path, _bomb_reason(str(exc), max_pixels)) from exc
    except Image.DecompressionBombWarning as exc:  # warnings promoted to errors (-W error)
        raise CorruptImageError(path, _bomb_reason(str(exc), max_pixels)) from exc
    except UnidentifiedImageError as exc:
        raise CorruptImageError(path, "not a recognised image format") from exc
    except PermissionError as exc:
        raise CorruptImageError(path, "permission denied") from exc
    except _DECODER_ERRORS as exc:
        raise CorruptImageError(path, _error_reason(exc)) from exc


def check_image(
    path: Path, *, size_hint: int | None = None, max_pixels: int = MAX_IMAGE_PIXELS
) -> str | None:
    """Decode ``path`` as :func:`load_rgb` would; return the corrupt reason, or None if fine."""
    try:
        load_rgb(path, size_hint=size_hint, max_pixels=max_pixels)
    except CorruptImageError as exc:
        return exc.reason
    return None


def _decode(im: Image.Image, path: Path, size_hint: int | None, max_pixels: int) -> Image.Image:
    """Check size, decode (reduced for JPEG), orient and convert an opened image."""
    width, height = im.size
    if width * height > max_pixels:
        raise CorruptImageError(
            path, f"decompression bomb: {width}x{height} pixels exceeds limit {max_pixels}"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise CorruptImageError(
            path,
            f"extreme aspect ratio: {width}x{height} pixels exceeds {MAX_ASPECT_RATIO}:1",
        )
    if size_hint is not None and im.format in ("JPEG", "MPO"):
        # draft picks the largest DCT scale (1/2, 1/4, 1/8) that keeps both sides
        # >= the requested box, so the short side stays >= size_hint.
        im.draft("RGB", (size_hint, size_hint))
    im.load()
    return _to_rgb(_apply_exif_orientation(im))


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip ``im`` per its EXIF Orientation tag; unchanged if the EXIF is broken.

    A malformed EXIF block does not make the pixels unusable, so it is not an error.
    """
    try:
        oriented = ImageOps.exif_transpose(im)
    except _DECODER_ERRORS as exc:
        logger.debug("ignoring unreadable EXIF orientation: %s", exc)
        return im
    return oriented if oriented is not None else im


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to a new RGB image.

    * alpha (RGBA, LA, PA, RGBa, La, P or L/RGB with a transparency key): composited
      onto :data:`TRANSPARENT_BACKGROUND`;
    * ``I;16*``: 0-65535 scaled to 0-255; ``I`` (32-bit): the same when all values lie
      in 0-65535 (16-bit files often open as ``I``), else min-max stretched;
    * ``F``: values in 0-1 scaled by 255, values in 0-255 kept, else min-max stretched;
    * everything else (1, L, P, CMYK, YCbCr, LAB, HSV, RGBX): Pillow's own conversion.
      Embedded ICC profiles are ignored, as torchvision's loaders do.
    """
    if im.mode.startswith("I") or im.mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode), mode="L").convert("RGB")
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, TRANSPARENT_BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


def _to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Map a 2-D array of 16/32-bit int or float samples to uint8 (see :func:`_to_rgb`)."""
    data = values.astype(np.float64)
    data[~np.isfinite(data)] = 0.0
    lo, hi = (float(data.min()), float(data.max())) if data.size else (0.0, 0.0)
    if mode.startswith("I;16") or (mode == "I" and lo >= 0 and hi <= 65535):
        scaled = data / 257.0  # 65535 / 255: the exact inverse of 8-to-16-bit scaling
    elif mode == "F" and lo >= 0 and hi <= 1:
        scaled = data * 255.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scaled = data
    elif hi > lo:
        scaled = (data - lo) * (255.0 / (hi - lo))
    else:
        scaled = np.zeros_like(data)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _bomb_reason(pillow_message: str, max_pixels: int) -> str:
    """Reason for a bomb Pillow refused itself while reading the header.

    Pillow's error does not give width and height, only their product.
    """
    match = _BOMB_PIXELS.search(pillow_message)
    if match and int(match.group(1)) > max_pixels:
        return f"decompression bomb: {match.group(1)} pixels exceeds limit {max_pixels}"
    return f"decompression bomb: {pillow_message}"  # max_pixels was raised past Pillow's


def _error_reason(exc: BaseException) -> str:
    """Short reason for a decoder failure: 'truncated image data' or the error's message."""
    message = str(exc.strerror if isinstance(exc, OSError) and exc.strerror else exc)
    lowered = message.lower()
    if "truncated" in lowered or "broken data stream" in lowered or isinstance(exc, EOFError):
        return "truncated image data"
    return message or type(exc).__name__
