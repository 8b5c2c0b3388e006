"""Tests for datapool.images: discovery, content hashes and decoding to RGB.

Every image is a tiny real file written by Pillow into ``tmp_path``.
"""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import os
import struct
import sys
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL import ImageFile as PilImageFile

from datapool import images
from datapool.errors import DatapoolError, InputError
from datapool.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    ImageFile,
    check_image,
    content_hash,
    discover_images,
    inbox_manifest,
    load_rgb,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _permissions_enforced() -> bool:
    """False when this process reads files regardless of mode bits (root, CAP_DAC_OVERRIDE)."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return True
    probe = Path(os.environ.get("TMPDIR", "/tmp")) / f"datapool-perm-probe-{os.getpid()}"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
    except PermissionError:
        return True
    else:
        return False
    finally:
        probe.unlink()


needs_permissions = pytest.mark.skipif(
    not _permissions_enforced(), reason="this user reads files regardless of permissions"
)


def _save(path: Path, im: Image.Image, **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **params)
    return path


def _touch(root: Path, *relpaths: str) -> None:
    for rel in relpaths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def _pixels(im: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in px) for px in np.asarray(im).reshape(-1, 3)]


def _reason(path: Path, **kwargs: object) -> str:
    with pytest.raises(CorruptImageError) as info:
        load_rgb(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.path == path
    assert str(info.value) == f"{path}: {info.value.reason}"
    return info.value.reason


def _png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A valid 8x8 PNG whose IHDR (and its CRC) is patched to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # Signature (8) + IHDR length (4) + b"IHDR" (4): width and height follow, then
    # 5 more header bytes; the CRC covers the chunk type and its 13 data bytes.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


# --------------------------------------------------------------------------- discovery


def test_discover_is_recursive_sorted_and_labels_by_folder(tmp_path: Path) -> None:
    _touch(tmp_path, "zebra.gif", "cats/b.jpg", "cats/a.jpg", "dogs/big/x.jpeg", "a.png")

    found = discover_images(tmp_path)

    assert [f.relpath for f in found] == [
        "a.png",
        "cats/a.jpg",
        "cats/b.jpg",
        "dogs/big/x.jpeg",
        "zebra.gif",
    ]
    assert [f.label for f in found] == ["", "cats", "cats", "dogs/big", ""]
    for f in found:
        assert isinstance(f, ImageFile)
        assert f.path.is_absolute()
        assert f.path == tmp_path / f.relpath


def test_discover_relative_root_gives_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _touch(tmp_path, "in/cats/a.jpg")
    monkeypatch.chdir(tmp_path)

    (found,) = discover_images(Path("in"))

    assert found.path == tmp_path / "in/cats/a.jpg"
    assert found.relpath == "cats/a.jpg"


def test_discover_matches_every_extension_case_insensitively(tmp_path: Path) -> None:
    names = sorted(f"f{i}{ext}" for i, ext in enumerate(sorted(IMAGE_EXTENSIONS)))
    upper = sorted(f"u{i}{ext.upper()}" for i, ext in enumerate(sorted(IMAGE_EXTENSIONS)))
    _touch(tmp_path, *names, *upper, "Mixed.JpG")

    found = [f.relpath for f in discover_images(tmp_path)]

    assert found == sorted([*names, *upper, "Mixed.JpG"])
    assert {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"} == IMAGE_EXTENSIONS


def test_discover_ignores_other_extensions_and_hidden_entries(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "keep.jpg",
        "notes.txt",
        "jpg",  # a name with no extension
        "archive.jpg.zip",
        "data.csv",
        ".hidden.jpg",
        "._keep.jpg",  # macOS resource fork next to keep.jpg
        ".git/objects/a.png",
        "cats/.thumbs/t.jpg",
        "cats/ok.png",
    )

    assert [f.relpath for f in discover_images(tmp_path)] == ["cats/ok.png", "keep.jpg"]


def test_discover_skips_folders_named_like_images(tmp_path: Path) -> None:
    (tmp_path / "folder.jpg").mkdir()
    _touch(tmp_path, "folder.jpg/inner.png")

    found = discover_images(tmp_path)

    assert [(f.relpath, f.label) for f in found] == [("folder.jpg/inner.png", "folder.jpg")]


def test_discover_hidden_root_itself_is_scanned(tmp_path: Path) -> None:
    _touch(tmp_path, ".inbox/a.jpg")

    assert [f.relpath for f in discover_images(tmp_path / ".inbox")] == ["a.jpg"]


def test_discover_empty_folder_gives_empty_list(tmp_path: Path) -> None:
    assert discover_images(tmp_path) == []


def test_discover_missing_root_raises_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"input folder .*nope does not exist"):
        discover_images(tmp_path / "nope")


def test_discover_file_as_root_raises_input_error(tmp_path: Path) -> None:
    _touch(tmp_path, "a.jpg")

    with pytest.raises(InputError, match="is not a folder"):
        discover_images(tmp_path / "a.jpg")


@pytest.mark.parametrize("target", [".", "a"])
def test_discover_symlink_loop_terminates_and_is_reported(tmp_path: Path, target: str) -> None:
    # a/loop -> root, or a/loop -> a itself.
    _touch(tmp_path, "a/x.jpg")
    (tmp_path / "a" / "loop").symlink_to((tmp_path / target).resolve())
    skipped: list[tuple[Path, str]] = []

    found = discover_images(tmp_path, on_skip=lambda p, r: skipped.append((p, r)))

    assert [f.relpath for f in found] == ["a/x.jpg"]
    assert [p for p, _ in skipped] == [tmp_path / "a" / "loop"]
    assert "already listed" in skipped[0][1]


def test_discover_follows_symlinked_folders_and_files(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    _touch(elsewhere, "cam1/a.jpg", "b.png")
    root = tmp_path / "inbox"
    root.mkdir()
    (root / "cam1").symlink_to(elsewhere / "cam1")
    (root / "linked.png").symlink_to(elsewhere / "b.png")

    found = discover_images(root)

    assert [(f.relpath, f.label) for f in found] == [("cam1/a.jpg", "cam1"), ("linked.png", "")]
    assert found[0].path == root / "cam1" / "a.jpg"  # the link's path, not the target's


def test_discover_folder_linked_twice_is_listed_once_under_first_name(tmp_path: Path) -> None:
    _touch(tmp_path, "b_real/x.jpg")
    (tmp_path / "a_alias").symlink_to(tmp_path / "b_real")

    assert [f.relpath for f in discover_images(tmp_path)] == ["a_alias/x.jpg"]


def test_discover_reports_broken_symlink(tmp_path: Path) -> None:
    _touch(tmp_path, "ok.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "missing.txt")  # not an image: silent
    skipped: list[tuple[Path, str]] = []

    found = discover_images(tmp_path, on_skip=lambda p, r: skipped.append((p, r)))

    assert [f.relpath for f in found] == ["ok.jpg"]
    assert skipped == [(tmp_path / "gone.jpg", "broken symbolic link")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_discover_reports_non_regular_file_with_image_name(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would block a loader forever
    os.mkfifo(tmp_path / "pipe.txt")
    skipped: list[tuple[Path, str]] = []

    found = discover_images(tmp_path, on_skip=lambda p, r: skipped.append((p, r)))

    assert found == []
    assert skipped == [(tmp_path / "pipe.jpg", "not a regular file")]


@needs_permissions
def test_discover_skips_unreadable_subfolder_and_reports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _touch(tmp_path, "ok/a.jpg", "locked/b.jpg")
    locked = tmp_path / "locked"
    locked.chmod(0)
    skipped: list[tuple[Path, str]] = []
    try:
        with caplog.at_level(logging.WARNING, logger="datapool.images"):
            found = discover_images(tmp_path, on_skip=lambda p, r: skipped.append((p, r)))
    finally:
        locked.chmod(0o755)

    assert [f.relpath for f in found] == ["ok/a.jpg"]
    assert [(p, r.split(":")[0]) for p, r in skipped] == [(locked, "cannot read folder")]
    assert str(locked) in caplog.text


@needs_permissions
def test_discover_unreadable_root_raises_input_error(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch(root, "a.jpg")
    root.chmod(0)
    try:
        with pytest.raises(InputError, match="cannot read input folder"):
            discover_images(root)
    finally:
        root.chmod(0o755)


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that stores raw bytes")
def test_discover_skips_names_that_are_not_utf8(tmp_path: Path) -> None:
    _touch(tmp_path, "ok.jpg")
    bad = os.fsencode(tmp_path) + b"/bad\xff.jpg"
    with open(bad, "wb") as fh:  # noqa: PTH123 - a bytes path, which pathlib cannot hold
        fh.write(b"x")
    skipped: list[str] = []

    found = discover_images(tmp_path, on_skip=lambda p, r: skipped.append(r))

    assert [f.relpath for f in found] == ["ok.jpg"]
    assert skipped == ["file name is not valid UTF-8"]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows forbids line breaks in names")
def test_inbox_skips_names_with_a_line_break_and_lists_them_on_one_line(tmp_path: Path) -> None:
    # "evil\nok.png" written one per line would read back as "evil" and "ok.png"
    Image.new("RGB", (8, 8), (200, 0, 0)).save(tmp_path / "ok.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "evil\nok.png")
    listing = inbox_manifest(tmp_path)
    assert [rel for rel, _ in listing.images] == ["ok.png"]
    assert list(listing.skipped) == ["evil\\nok.png"]  # escaped: one line in the list
    assert "line break" in next(iter(listing.skipped.values()))


def _stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    return depth


def test_discover_walks_deep_trees_without_recursion(tmp_path: Path) -> None:
    depth = 300
    leaf = tmp_path.joinpath(*["d"] * depth)
    leaf.mkdir(parents=True)
    (leaf / "deep.png").write_bytes(b"x")
    # Leave 100 frames of head-room: enough for the walk, not for a frame per level.
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + 100)
    try:
        (found,) = discover_images(tmp_path)
    finally:
        sys.setrecursionlimit(old_limit)

    assert found.relpath == "/".join(["d"] * depth + ["deep.png"])


def test_discover_does_not_stat_each_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 200 files in 2 folders: a stat (or Path.is_file) per file would make >= 200 calls.
    _touch(tmp_path, *[f"a/{i}.jpg" for i in range(100)], *[f"b/{i}.png" for i in range(100)])
    calls: list[object] = []
    real_stat = os.stat

    def counting_stat(*args: object, **kwargs: object) -> os.stat_result:
        calls.append(args[0])
        return real_stat(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    found = discover_images(tmp_path)

    assert len(found) == 200
    assert len(calls) <= 10


_NAME = st.text("aAbB.-_ 1é", min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))
_EXT = st.sampled_from(["", ".jpg", ".JPEG", ".Png", ".txt", ".tiff", ".gif.bak", ".webp"])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.lists(_NAME, max_size=3), _NAME, _EXT), max_size=12))
def test_discover_matches_a_plain_os_walk(entries: list[tuple[list[str], str, str]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for folders, stem, ext in entries:
            target = root.joinpath(*folders, stem + ext)
            if any(p.is_file() for p in [target, *target.parents]) or target.is_dir():
                continue  # a name already used by a file/folder of the other kind
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x")
        expected = sorted(
            (Path(d) / f).relative_to(root).as_posix()
            for d, dirs, files in os.walk(root)
            if not any(part.startswith(".") for part in Path(d).relative_to(root).parts)
            for f in files
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS  # noqa: PTH122
        )

        found = discover_images(root)

        assert [f.relpath for f in found] == expected
        assert all(f.label == f.relpath.rpartition("/")[0] for f in found)


# --------------------------------------------------------------------------- content_hash


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7])
def test_content_hash_equals_sha256_of_the_bytes(tmp_path: Path, size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = tmp_path / "f.bin"
    path.write_bytes(data)

    assert content_hash(path) == hashlib.sha256(data).hexdigest()


def test_content_hash_differs_for_different_content(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"same length A")
    (tmp_path / "b").write_bytes(b"same length B")
    (tmp_path / "c").write_bytes(b"same length A")

    assert content_hash(tmp_path / "a") != content_hash(tmp_path / "b")
    assert content_hash(tmp_path / "a") == content_hash(tmp_path / "c")


def test_content_hash_missing_file_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        content_hash(tmp_path / "missing")


# ------------------------------------------------------------------ load_rgb: modes


def _assert_rgb(im: Image.Image, size: tuple[int, int]) -> None:
    assert im.mode == "RGB"
    assert im.size == size


@pytest.mark.parametrize(
    ("mode", "values", "expected"),
    [
        ("1", [0, 1], [0, 255]),
        ("L", [0, 77, 255], [0, 77, 255]),
        # 16-bit: scaled by 65535/255, not clipped (clipping would make 25700 -> 255).
        ("I;16", [0, 257, 25700, 65535], [0, 1, 100, 255]),
        ("I;16B", [0, 257, 25700, 65535], [0, 1, 100, 255]),
        # 32-bit ints in the 16-bit range are treated as 16-bit ...
        ("I", [0, 25700, 65535], [0, 100, 255]),
        # ... and any other range is stretched min-max.
        ("I", [-1000, 0, 1000], [0, 128, 255]),
        ("F", [0.0, 0.5, 1.0], [0, 128, 255]),
        ("F", [0.0, 100.0, 255.0], [0, 100, 255]),
        ("F", [-2.0, 0.0, 2.0], [0, 128, 255]),
    ],
)
def test_grey_modes_become_rgb_with_sensible_values(
    tmp_path: Path, mode: str, values: list[float], expected: list[int]
) -> None:
    dtype = {"1": bool, "L": np.uint8, "I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}
    raw = np.array([values], dtype=dtype[mode])
    src = Image.fromarray(raw) if mode == "1" else Image.frombytes(mode, raw.shape[::-1], raw)
    # PNG keeps 1/L/I;16; TIFF keeps I;16B, I and F.
    path = _save(tmp_path / ("a.png" if mode in ("1", "L", "I;16") else "a.tif"), src)
    with Image.open(path) as check:
        assert check.mode == mode  # the test really exercises this mode

    im = load_rgb(path)

    _assert_rgb(im, (len(values), 1))
    assert _pixels(im) == [(v, v, v) for v in expected]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=64))
def test_16_bit_scaling_is_rounded_division_by_257(values: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = np.array([values], dtype="<u2")
        path = _save(Path(tmp) / "a.png", Image.frombytes("I;16", (len(values), 1), raw))

        grey = np.asarray(load_rgb(path))[0, :, 0]

    assert grey.tolist() == [int(v / 257 + 0.5) for v in values]


def test_rgb_is_unchanged(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = _save(tmp_path / "a.png", Image.fromarray(arr))

    assert np.array_equal(np.asarray(load_rgb(path)), arr)


def test_palette_becomes_its_colours(tmp_path: Path) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([*RED, *BLUE])
    im.putpixel((1, 0), 1)
    path = _save(tmp_path / "p.png", im)

    assert _pixels(load_rgb(path)) == [RED, BLUE]


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_transparency_becomes_white(tmp_path: Path, ext: str) -> None:
    im = Image.new("P", (2, 1))
    im.putpalette([*RED, *BLUE])
    im.putpixel((1, 0), 1)
    path = _save(tmp_path / f"p.{ext}", im, transparency=1)  # blue index is transparent
    with Image.open(path) as check:
        assert check.mode == "P"
        assert "transparency" in check.info

    assert _pixels(load_rgb(path)) == [RED, WHITE]


def test_rgba_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    arr = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 128]]], dtype=np.uint8)
    path = _save(tmp_path / "a.png", Image.fromarray(arr, mode="RGBA"))

    pixels = _pixels(load_rgb(path))

    assert pixels[:2] == [(10, 20, 30), WHITE]
    assert all(abs(v - 127) <= 1 for v in pixels[2])  # half-transparent black over white


def test_la_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    arr = np.array([[[77, 255], [77, 0]]], dtype=np.uint8)
    path = _save(tmp_path / "a.png", Image.fromarray(arr, mode="LA"))

    assert _pixels(load_rgb(path)) == [(77, 77, 77), WHITE]


def test_rgb_with_transparency_key_is_composited(tmp_path: Path) -> None:
    im = Image.new("RGB", (2, 1), RED)
    im.putpixel((1, 0), (1, 2, 3))
    path = _save(tmp_path / "a.png", im, transparency=(1, 2, 3))

    assert _pixels(load_rgb(path)) == [RED, WHITE]


@pytest.mark.parametrize("ext", ["tif", "jpg"])
def test_cmyk_becomes_rgb(tmp_path: Path, ext: str) -> None:
    # C=0 M=255 Y=255 K=0 is pure red.
    path = _save(tmp_path / f"a.{ext}", Image.new("CMYK", (8, 8), (0, 255, 255, 0)))
    with Image.open(path) as check:
        assert check.mode == "CMYK"

    r, g, b = _pixels(load_rgb(path))[0]

    assert r >= 240 and g <= 15 and b <= 15


def test_lab_is_colour_managed_to_rgb(tmp_path: Path) -> None:
    im = Image.new("LAB", (2, 1), (255, 128, 128))  # L=100, a=b=0: white
    im.putpixel((1, 0), (138, 209, 198))  # sRGB red in Pillow's LAB encoding
    path = _save(tmp_path / "a.tif", im)
    with Image.open(path) as check:
        assert check.mode == "LAB"

    white, red = _pixels(load_rgb(path))

    assert min(white) >= 250
    assert red[0] >= 240 and max(red[1:]) <= 20


def test_result_is_independent_of_the_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", Image.new("RGB", (4, 4), GREEN))

    im = load_rgb(path)
    path.unlink()

    assert _pixels(im)[0] == GREEN  # fully decoded: no lazy read from a deleted file


# ------------------------------------------------------------------ load_rgb: frames, EXIF, draft


@pytest.mark.parametrize("ext", ["gif", "webp", "tif"])
def test_animated_and_multipage_give_first_frame(tmp_path: Path, ext: str) -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{ext}"
    params: dict[str, object] = {"lossless": True} if ext == "webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, **params)
    with Image.open(path) as check:
        assert check.n_frames == 3

    assert set(_pixels(load_rgb(path))) == {RED}


def test_multi_picture_jpeg_gives_first_picture_with_draft(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"  # phone cameras write MPO under .jpg
    first, second = Image.new("RGB", (64, 48), RED), Image.new("RGB", (64, 48), BLUE)
    first.save(path, "MPO", save_all=True, append_images=[second])
    with Image.open(path) as check:
        assert (check.format, check.n_frames) == ("MPO", 2)

    im = load_rgb(path, size_hint=8)

    assert im.size == (16, 12)  # 1/4 scale: 1/8 would make the short side 6 < 8
    r, g, b = _pixels(im)[0]
    assert r >= 240 and g <= 15 and b <= 15


def _jpeg_with_orientation(path: Path, orientation: int) -> Path:
    im = Image.new("RGB", (40, 20), BLUE)
    im.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    return _save(path, im, exif=exif, quality=95)


def test_exif_rotation_swaps_width_and_height(tmp_path: Path) -> None:
    path = _jpeg_with_orientation(tmp_path / "a.jpg", 6)  # stored sideways: rotate 90° cw

    im = load_rgb(path)

    _assert_rgb(im, (20, 40))
    r, _, b = im.getpixel((10, 5))  # type: ignore[misc]
    assert r > 200 and b < 60  # the stored left half is now the top half


def test_exif_upside_down_is_rotated_180(tmp_path: Path) -> None:
    path = _jpeg_with_orientation(tmp_path / "a.jpg", 3)

    im = load_rgb(path)

    _assert_rgb(im, (40, 20))
    assert im.getpixel((35, 10))[0] > 200  # type: ignore[index]  # red moved to the right


def test_jpeg_draft_decodes_smaller_but_not_below_size_hint(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.jpg", Image.new("RGB", (800, 600), RED))

    assert load_rgb(path).size == (800, 600)
    assert load_rgb(path, size_hint=64).size == (100, 75)  # 1/8 scale, short side 75 >= 64
    assert load_rgb(path, size_hint=200).size == (400, 300)  # 1/2: 1/4 would give 150 < 200
    assert load_rgb(path, size_hint=600).size == (800, 600)
    assert load_rgb(path, size_hint=5000).size == (800, 600)  # never upscaled


@pytest.mark.parametrize("hint", [1, 7, 32, 33, 100, 149, 150, 151, 299, 300])
def test_jpeg_draft_short_side_is_at_least_size_hint(tmp_path: Path, hint: int) -> None:
    path = _save(tmp_path / "a.jpg", Image.new("RGB", (403, 301), RED))

    im = load_rgb(path, size_hint=hint)

    assert min(im.size) >= hint
    assert im.mode == "RGB"


def test_jpeg_draft_with_exif_rotation(tmp_path: Path) -> None:
    im = Image.new("RGB", (800, 400), RED)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path / "a.jpg", im, exif=exif)

    assert load_rgb(path, size_hint=100).size == (100, 200)  # 1/4 scale, then rotated


def test_grey_jpeg_with_draft_is_rgb(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.jpg", Image.new("L", (256, 256), 90))

    im = load_rgb(path, size_hint=32)

    _assert_rgb(im, (32, 32))
    assert all(abs(v - 90) <= 2 for v in _pixels(im)[0])


def test_size_hint_is_ignored_for_non_jpeg(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", Image.new("RGB", (300, 200), RED))

    assert load_rgb(path, size_hint=32).size == (300, 200)


@pytest.mark.parametrize("hint", [0, -5])
def test_non_positive_size_hint_is_rejected(tmp_path: Path, hint: int) -> None:
    path = _save(tmp_path / "a.jpg", Image.new("RGB", (8, 8), RED))

    with pytest.raises(ValueError, match="size_hint"):
        load_rgb(path, size_hint=hint)


# ------------------------------------------------------------------ load_rgb: corrupt files


def _encoded(fmt: str, size: tuple[int, int] = (64, 64)) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def test_corrupt_image_error_is_not_a_datapool_error() -> None:
    err = CorruptImageError(Path("x.jpg"), "empty file")

    assert not isinstance(err, DatapoolError)
    assert (err.path, err.reason, str(err)) == (Path("x.jpg"), "empty file", "x.jpg: empty file")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"")

    assert _reason(path) == "empty file"


@pytest.mark.parametrize(("fmt", "ext"), [("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif")])
@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_truncated_file(tmp_path: Path, fmt: str, ext: str, fraction: float) -> None:
    data = _encoded(fmt)
    path = tmp_path / f"a.{ext}"
    path.write_bytes(data[: int(len(data) * fraction)])

    assert _reason(path) == "truncated image data"
    assert _reason(path, size_hint=16) == "truncated image data"


def test_random_bytes_with_jpg_extension(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())

    assert _reason(path) == "not a recognised image format"


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_text("this is not a picture\n")

    assert _reason(path) == "not a recognised image format"


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX"])
def test_formats_outside_the_extension_list_are_refused(tmp_path: Path, fmt: str) -> None:
    # Pillow can read these, but discovery never lists them and some Pillow plugins
    # (EPS) run external programs: content must be one of the listed formats.
    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), RED).save(path, fmt)

    assert _reason(path) == "not a recognised image format"


def test_content_decides_the_format_not_the_extension(tmp_path: Path) -> None:
    path = _save(tmp_path / "really_a_png.jpg", Image.new("RGB", (4, 4), RED), format="PNG")

    assert _pixels(load_rgb(path))[0] == RED


def test_bomb_over_the_limit_is_refused_before_decoding(tmp_path: Path) -> None:
    # 3000x3000 is below Pillow's own limit; the pixel data is an 8x8 image's, so
    # decoding would report "truncated": the limit must be checked first.
    path = _png_claiming_size(tmp_path / "a.png", 3000, 3000)

    assert _reason(path, max_pixels=1_000_000) == (
        "decompression bomb: 3000x3000 pixels exceeds limit 1000000"
    )
    assert _reason(path) == "truncated image data"  # under the default limit


def test_bomb_limit_counts_width_times_height(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", Image.new("RGB", (100, 50), RED))

    assert load_rgb(path, max_pixels=5000).size == (100, 50)
    assert _reason(path, max_pixels=4999).startswith("decompression bomb: 100x50 pixels")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bomb_between_pillow_warning_and_error_is_refused(tmp_path: Path) -> None:
    # 10000x10000 = 1e8 pixels: Pillow only warns (limit 89,478,485; errors above twice that).
    path = _png_claiming_size(tmp_path / "a.png", 10_000, 10_000)

    assert _reason(path) == (
        f"decompression bomb: 10000x10000 pixels exceeds limit {images.MAX_IMAGE_PIXELS}"
    )


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_bomb_warning_promoted_to_error_is_still_a_corrupt_image(tmp_path: Path) -> None:
    path = _png_claiming_size(tmp_path / "a.png", 10_000, 10_000)

    assert _reason(path).startswith("decompression bomb: 100000000 pixels exceeds limit")


def test_bomb_pillow_refuses_itself_is_a_corrupt_image(tmp_path: Path) -> None:
    path = _png_claiming_size(tmp_path / "a.png", 20_000, 20_000)

    assert _reason(path) == (
        f"decompression bomb: 400000000 pixels exceeds limit {images.MAX_IMAGE_PIXELS}"
    )


def test_bomb_pillow_refuses_above_a_raised_limit_keeps_its_message(tmp_path: Path) -> None:
    path = _png_claiming_size(tmp_path / "a.png", 20_000, 20_000)

    reason = _reason(path, max_pixels=10**9)

    assert reason.startswith("decompression bomb: Image size (400000000 pixels) exceeds limit")


@needs_permissions
def test_unreadable_file(tmp_path: Path) -> None:
    path = _save(tmp_path / "a.png", Image.new("RGB", (4, 4), RED))
    path.chmod(0)
    try:
        assert _reason(path) == "permission denied"
    finally:
        path.chmod(0o644)


def test_missing_file_and_folder_give_their_os_message(tmp_path: Path) -> None:
    assert _reason(tmp_path / "gone.jpg") == "No such file or directory"
    assert _reason(tmp_path) == "Is a directory"


def test_check_image_returns_reason_or_none(tmp_path: Path) -> None:
    good = _save(tmp_path / "a.png", Image.new("RGB", (4, 4), RED))
    empty = tmp_path / "b.png"
    empty.write_bytes(b"")

    assert check_image(good) is None
    assert check_image(empty) == "empty file"


def _open_fds() -> int:
    return sum(1 for _ in Path("/proc/self/fd").iterdir())


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
def test_no_file_handles_leak(tmp_path: Path) -> None:
    good = _save(tmp_path / "a.jpg", Image.new("RGB", (64, 64), RED))
    anim = tmp_path / "b.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN)]
    frames[0].save(anim, save_all=True, append_images=frames[1:])
    truncated = tmp_path / "c.png"
    truncated.write_bytes(_encoded("PNG")[:300])
    junk = tmp_path / "d.jpg"
    junk.write_bytes(b"junk" * 100)
    bomb = _png_claiming_size(tmp_path / "e.png", 3000, 3000)
    before = _open_fds()

    with warnings.catch_warnings(record=True) as caught:
        # An unclosed file is usually freed at once by reference counting, which the
        # fd count cannot see; its ResourceWarning can.
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(20):
            load_rgb(good, size_hint=16)
            load_rgb(anim)
            for bad in (truncated, junk, bomb):
                assert check_image(bad, max_pixels=1_000_000) is not None
        gc.collect()

    assert _open_fds() == before
    assert [w for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_global_pillow_and_warning_state_is_untouched(tmp_path: Path) -> None:
    max_pixels, load_truncated = Image.MAX_IMAGE_PIXELS, PilImageFile.LOAD_TRUNCATED_IMAGES
    filters = list(warnings.filters)
    truncated = tmp_path / "a.jpg"
    truncated.write_bytes(_encoded("JPEG")[:500])

    check_image(truncated)
    check_image(_png_claiming_size(tmp_path / "b.png", 3000, 3000))
    load_rgb(_save(tmp_path / "c.png", Image.new("RGBA", (4, 4))))

    assert max_pixels == Image.MAX_IMAGE_PIXELS
    assert load_truncated == PilImageFile.LOAD_TRUNCATED_IMAGES
    assert warnings.filters == filters


def test_extreme_aspect_ratio_is_refused_before_decoding(tmp_path: Path) -> None:
    # 100000x1 is only 1e5 pixels, far below the bomb limit, but resizing its short
    # side to a model's input (224) would allocate 224 x 22.4M pixels: MemoryError.
    wide = _save(tmp_path / "wide.png", Image.new("L", (100_000, 1)))
    tall = _png_claiming_size(tmp_path / "tall.png", 1, 5000)
    assert wide.stat().st_size < 400

    assert _reason(wide) == (
        f"extreme aspect ratio: 100000x1 pixels exceeds {images.MAX_ASPECT_RATIO}:1"
    )
    assert _reason(tall).startswith("extreme aspect ratio: 1x5000 pixels")
    limit = images.MAX_ASPECT_RATIO
    assert load_rgb(_save(tmp_path / "ok.png", Image.new("L", (limit, 1)))).size == (limit, 1)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_pipes_and_devices_are_refused_without_blocking(tmp_path: Path) -> None:
    # Discovery skips them, but an entry can be swapped for a pipe before it is read:
    # opening a pipe would wait for a writer forever, /dev/zero would never end.
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "zeros.png").symlink_to("/dev/zero")
    for path in (tmp_path / "pipe.png", tmp_path / "zeros.png"):
        with pytest.raises(OSError, match="not a regular file"):
            content_hash(path)
        assert _reason(path) == "not a regular file"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_inbox_manifest_hashes_images_and_lists_skipped_entries(tmp_path: Path) -> None:
    _touch(tmp_path, "b/two.jpg", "notes.txt")
    (tmp_path / "one.png").write_bytes(b"one")
    os.mkfifo(tmp_path / "pipe.png")  # would block an open(): never opened

    manifest = inbox_manifest(tmp_path)

    assert manifest.images == [
        ("b/two.jpg", content_hash(tmp_path / "b" / "two.jpg")),
        ("one.png", hashlib.sha256(b"one").hexdigest()),
    ]
    assert manifest.skipped == {"pipe.png": "not a regular file"}
    assert json.loads(manifest.to_json()) == {
        "images": [list(image) for image in manifest.images],
        "skipped": manifest.skipped,
    }


def test_inbox_manifest_follows_content_not_timestamps(tmp_path: Path) -> None:
    one = tmp_path / "one.png"
    one.write_bytes(b"one")
    first = inbox_manifest(tmp_path, listed_at_ns=_later())
    st = one.stat()
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes
    touched = inbox_manifest(tmp_path, known=first.signatures, listed_at_ns=_later())
    assert touched.to_json() == first.to_json()
    one.write_bytes(b"two")
    changed = inbox_manifest(tmp_path, known=touched.signatures, listed_at_ns=_later())
    assert changed.to_json() != first.to_json()


def test_inbox_manifest_reads_only_files_whose_signature_changed(tmp_path: Path) -> None:
    (tmp_path / "one.png").write_bytes(b"one")
    (tmp_path / "two.png").write_bytes(b"two")
    listing = inbox_manifest(tmp_path, listed_at_ns=_later())
    cache_file = tmp_path / "cache.json"
    cache_file.write_text(listing.cache_json(), encoding="utf-8")
    cache = images.read_hash_cache(cache_file, root=tmp_path)
    assert cache == listing.signatures
    assert set(cache) == {"one.png", "two.png"}
    # A cached hash is trusted while the signature matches: proof it was not re-read.
    signature, _ = cache["one.png"]
    cache["one.png"] = (signature, "f" * 64)

    assert dict(inbox_manifest(tmp_path, known=cache).images)["one.png"] == "f" * 64


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"a.png": [1, 2, 3, "xyz"]}'])
def test_a_broken_hash_cache_only_means_hashing_again(tmp_path: Path, text: str) -> None:
    (tmp_path / "cache.json").write_text(text, encoding="utf-8")
    assert images.read_hash_cache(tmp_path / "cache.json", root=tmp_path) == {}
    assert images.read_hash_cache(tmp_path / "absent.json", root=tmp_path) == {}
    assert images.read_hash_cache(tmp_path, root=tmp_path) == {}  # a folder


# A listing time well after every file of a test was written: their timestamps are then
# outside the "racily clean" window, so the listing may cache them.
def _later() -> int:
    return time.time_ns() + 60 * 10**9


def _rewrite_keeping_mtime(path: Path, colour: str) -> None:
    """Replace ``path`` in place by an image of the same size, its mtime restored (``cp -p``)."""
    before = path.stat()
    Image.new("RGB", (8, 8), colour).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


def test_a_same_size_rewrite_with_its_mtime_restored_is_hashed_again(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image = inbox / "x.bmp"  # BMPs of one size have one file size
    Image.new("RGB", (8, 8), "red").save(image)
    first = inbox_manifest(inbox)
    cache_file = tmp_path / "cache.json"
    cache_file.write_text(first.cache_json(), encoding="utf-8")

    _rewrite_keeping_mtime(image, "blue")
    again = inbox_manifest(inbox, known=images.read_hash_cache(cache_file, root=inbox))

    assert again.images == [("x.bmp", content_hash(image))]
    assert again.to_json() != first.to_json()


def test_the_cache_signature_includes_ctime_which_no_one_can_restore(tmp_path: Path) -> None:
    image = tmp_path / "x.bmp"
    Image.new("RGB", (8, 8), "red").save(image)
    first = inbox_manifest(tmp_path, listed_at_ns=_later())
    assert set(first.signatures) == {"x.bmp"}  # cached: listed long after it was written

    _rewrite_keeping_mtime(image, "blue")
    again = inbox_manifest(tmp_path, known=first.signatures, listed_at_ns=_later())

    assert again.images == [("x.bmp", content_hash(image))] != first.images
    st = image.stat()
    signature, _ = again.signatures["x.bmp"]
    assert signature == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def test_files_changed_within_two_seconds_of_the_listing_are_not_cached(tmp_path: Path) -> None:
    # On a file system with coarse timestamps (FAT: 2 s) a file rewritten right after
    # the listing keeps its mtime; git's "racily clean" rule: such entries are re-read.
    (tmp_path / "old.png").write_bytes(b"old")
    now = time.time_ns()
    os.utime(tmp_path / "old.png", ns=(now, now))
    (tmp_path / "new.png").write_bytes(b"new")

    listing = inbox_manifest(tmp_path, listed_at_ns=now + 10**9)
    assert [rel for rel, _ in listing.images] == ["new.png", "old.png"]
    assert listing.signatures == {}
    cache = json.loads(listing.cache_json())
    assert cache["files"] == {}

    later = inbox_manifest(tmp_path, listed_at_ns=now + 3 * 10**9)
    assert set(later.signatures) == {"new.png", "old.png"}


def test_a_cache_made_for_another_input_folder_is_ignored(tmp_path: Path) -> None:
    for folder in ("week1", "week2"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "one.png").write_bytes(folder.encode())
    listing = inbox_manifest(tmp_path / "week1", listed_at_ns=_later())
    cache_file = tmp_path / "cache.json"
    cache_file.write_text(listing.cache_json(), encoding="utf-8")

    assert images.read_hash_cache(cache_file, root=tmp_path / "week1") == listing.signatures
    assert images.read_hash_cache(cache_file, root=tmp_path / "week2") == {}
    # The same folder reached through a link is the same folder.
    (tmp_path / "link").symlink_to(tmp_path / "week1")
    assert images.read_hash_cache(cache_file, root=tmp_path / "link") == listing.signatures


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,  # nesting deeper than the recursion limit: RecursionError
        '{"files": ' + "[" * 100_000,
        '{"input_dir": 3, "files": {}}',
        '{"input_dir": "ROOT", "files": []}',
        '{"input_dir": "ROOT", "files": {"a.png": {"size": 1}}}',
        '{"input_dir": "ROOT", "files": {"a.png": [1, 2, 3, 4, 5, "' + "A" * 64 + '"]}}',
        '{"input_dir": "ROOT", "files": {"a.png": [1, 2, 3, 4, 5, "' + "g" * 64 + '"]}}',
        '{"input_dir": "ROOT", "files": {"a.png": [-1, 2, 3, 4, 5, "' + "a" * 64 + '"]}}',
        '{"input_dir": "ROOT", "files": {"a.png": [1, 2, 3, -4, 5, "' + "a" * 64 + '"]}}',
        '{"input_dir": "ROOT", "files": {"a.png": [1, 2.5, 3, 4, 5, "' + "a" * 64 + '"]}}',
        '{"input_dir": "ROOT", "files": {"a.png": [true, 2, 3, 4, 5, "' + "a" * 64 + '"]}}',
        '{"input_dir": "ROOT", "files": {"a.png": [1, 2, 3, 4, "' + "a" * 64 + '"]}}',
        '{"a.png": [1, 2, 3, "' + "a" * 64 + '"]}',  # the cache of an earlier version
    ],
)
def test_a_crafted_hash_cache_only_means_hashing_again(tmp_path: Path, text: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.png").write_bytes(b"a")
    cache_file = tmp_path / "cache.json"
    cache_file.write_text(text.replace("ROOT", str(inbox.resolve())), encoding="utf-8")

    assert images.read_hash_cache(cache_file, root=inbox) == {}
    known = images.read_hash_cache(cache_file, root=inbox)
    assert inbox_manifest(inbox, known=known).images == [("a.png", content_hash(inbox / "a.png"))]


def test_a_valid_entry_is_kept_beside_a_malformed_one(tmp_path: Path) -> None:
    entry = [1, -2, -3, 4, 5, "a" * 64]  # timestamps before 1970 are real
    cache = {"input_dir": str(tmp_path.resolve()), "files": {"a.png": entry, "b.png": [1]}}
    (tmp_path / "cache.json").write_text(json.dumps(cache), encoding="utf-8")
    assert images.read_hash_cache(tmp_path / "cache.json", root=tmp_path) == {
        "a.png": ((1, -2, -3, 4, 5), "a" * 64)
    }
