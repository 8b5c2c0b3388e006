"""Lightly embeddings CSV: export a pool, import it back, and the checks on the way in."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datapool.errors import PoolError
from datapool.exchange import export_names, export_pool, import_pool, import_table
from datapool.images import content_hash
from datapool.pool import IMAGES_DIR, embeddings_of, read_pool
from tests.conftest import draw_image
from tests.test_combine import SHARD, craft_hash, make_pool


def test_export_names_are_unique_and_stay_inside_the_folder() -> None:
    table = pd.DataFrame(
        {
            "filenames": ["a/x.png", "a/x.png", "../up.png", "/abs/y.jpg"],
            "content_hash": ["1" * 64, "2" * 64, "3" * 64, "4" * 64],
        }
    )
    names = export_names(table)
    assert names[0] == "a/x.png"
    assert names[1] == "a/x_222222222222.png"
    assert len(set(names)) == 4
    assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)


def test_export_then_import_round_trips(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "a", [1, 2, 3])
    done = export_pool(pool, tmp_path / "out")
    assert done.rows == 3
    header = done.csv.read_text().splitlines()[0]
    assert header == "filenames,embedding_0,embedding_1,embedding_2,embedding_3,labels"
    listed = done.file_list.read_text().splitlines()
    assert sorted(listed) == sorted(
        p.relative_to(done.images).as_posix() for p in done.images.rglob("*.png")
    )
    # Loose files, out of the pool's pack, byte for byte the originals.
    for name in listed:
        assert (done.images / name).read_bytes() == (tmp_path / "inbox_a" / name).read_bytes()
    rows, duplicates = import_pool(done.csv, done.images, tmp_path / "pools" / "b")
    assert (rows, duplicates) == (3, 0)
    before, after = read_pool(pool), read_pool(tmp_path / "pools" / "b")
    assert before is not None and after is not None
    assert list(after["content_hash"]) == list(before["content_hash"])
    assert list(after["labels"]) == list(before["labels"])
    np.testing.assert_allclose(embeddings_of(after), embeddings_of(before), atol=1e-6)
    assert after["model_id"].str.startswith("imported-").all()
    assert list(after["pick_rank"]) == [1, 2, 3]


def test_import_accepts_masked_and_selected_and_normalises(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    for seed in (1, 2):
        draw_image(images / f"{seed}.png", seed=seed)
    draw_image(images / "copy.png", seed=1)  # same bytes as 1.png
    csv = tmp_path / "e.csv"
    csv.write_text(
        "filenames,embedding_0,embedding_1,labels,masked,selected\n"
        "1.png,3,4,cat,0,1\n2.png,0,2,dog,1,0\ncopy.png,1,0,cat,0,0\n"
    )
    table, files, duplicates = import_table(csv, images)
    assert duplicates == 1 and len(table) == 2
    assert "masked" not in table.columns and "selected" not in table.columns
    np.testing.assert_allclose(embeddings_of(table), [[0.6, 0.8], [0.0, 1.0]], atol=1e-7)
    assert files[table["content_hash"][0]] == images / "1.png"
    assert table["content_hash"][0] == content_hash(images / "1.png")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("missing.png,1,0,x\n", "row 1 names 'missing.png'"),
        ("1.png,0,0,x\n", "all-zero embedding"),
        ("1.png,nan,0,x\n", "not a finite number"),
    ],
)
def test_import_refuses_bad_rows(tmp_path: Path, body: str, message: str) -> None:
    draw_image(tmp_path / "1.png", seed=1)
    csv = tmp_path / "e.csv"
    csv.write_text("filenames,embedding_0,embedding_1,labels\n" + body)
    with pytest.raises(PoolError, match=message):
        import_pool(csv, tmp_path, tmp_path / "pools" / "x")
    assert not (tmp_path / "pools" / "x").exists()


def test_export_refuses_a_folder_that_holds_an_export(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "a", [1])
    export_pool(pool, tmp_path / "out")
    with pytest.raises(PoolError, match="already holds an export"):
        export_pool(pool, tmp_path / "out")


# ----------------------------------------------------------------- import stays in its folder


def _escapes(tmp_path: Path, images: Path, how: str) -> str:
    """A CSV filename that reaches ``tmp_path/secret.png`` (outside ``images``) by ``how``."""
    secret = draw_image(tmp_path / "secret" / "secret.png", seed=7)
    if how == "absolute":
        return str(secret)
    if how == "dotdot":
        return "../secret/secret.png"
    if how == "inner dotdot":
        return "sub/../../secret/secret.png"
    if how == "file link":
        (images / "link.png").symlink_to(secret)
        return "link.png"
    (images / "folder").symlink_to(secret.parent)  # a linked folder
    return "folder/secret.png"


@pytest.mark.parametrize("how", ["absolute", "dotdot", "inner dotdot", "file link", "folder link"])
def test_import_refuses_files_outside_the_images_folder(tmp_path: Path, how: str) -> None:
    images = tmp_path / "imgs"
    draw_image(images / "sub" / "1.png", seed=1)
    name = _escapes(tmp_path, images, how)
    csv = tmp_path / "e.csv"
    csv.write_text(f"filenames,embedding_0,embedding_1,labels\nsub/1.png,1,0,a\n{name},0,1,b\n")
    with pytest.raises(PoolError, match=rf"e\.csv: row 2 names '{re.escape(name)}'.* outside"):
        import_pool(csv, images, tmp_path / "pools" / "x")
    assert not (tmp_path / "pools").exists()


def test_import_follows_links_that_stay_inside_the_images_folder(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    real = draw_image(images / "real" / "1.png", seed=1)
    (images / "alias.png").symlink_to(real)
    csv = tmp_path / "e.csv"
    csv.write_text("filenames,embedding_0,embedding_1,labels\nalias.png,1,0,a\n")
    assert import_pool(csv, images, tmp_path / "pools" / "x") == (1, 0)
    table = read_pool(tmp_path / "pools" / "x")
    assert table is not None and list(table["filenames"]) == ["alias.png"]
    assert list(table["content_hash"]) == [content_hash(real)]


# --------------------------------------------------------------- crafted content hash on export


def test_export_refuses_a_crafted_content_hash(tmp_path: Path) -> None:
    # The pool's copy is images/<content_hash><ext>: an absolute "hash" once made
    # export copy any file the user can read (here a stand-in secret) into the export.
    pool = make_pool(tmp_path, "a", [1, 2, 3])
    secret = draw_image(tmp_path / "secret.png", seed=9)
    craft_hash(pool, row=2, value=str(secret.with_suffix("")))
    value = re.escape(repr(str(secret.with_suffix(""))))
    with pytest.raises(PoolError, match=rf"{SHARD}: row 2 .*content_hash: {value}"):
        export_pool(pool, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_original_that_is_not_the_pooled_image(tmp_path: Path) -> None:
    # With the pool's copy gone, export falls back to source/filenames; that file
    # must still hash to the row's content_hash, or any file could be exported.
    pool = make_pool(tmp_path, "a", [1, 2])
    table = read_pool(pool)
    assert table is not None
    for pack in (pool / IMAGES_DIR).iterdir():  # the pool's copies gone (not checked out)
        pack.unlink()
    draw_image(tmp_path / "inbox_a" / "img_2.png", seed=99)  # another image at the original path
    with pytest.raises(PoolError, match=r"'img_2\.png'.*does not hash to its content_hash"):
        export_pool(pool, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ integer labels for Lightly


def lightly_style_read(csv_path: Path) -> tuple[list[str], list[int], np.ndarray]:
    """Read an embeddings CSV as Lightly's ``load_embeddings`` does: csv module, int() labels."""
    with csv_path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    header, body = rows[0], rows[1:]
    assert header[0] == "filenames" and header[-1] == "labels"
    assert all(c == c.strip() for c in header)
    names = [r[0] for r in body]
    labels = [int(r[-1]) for r in body]
    vectors = np.array([r[1:-1] for r in body]).astype(np.float32)
    return names, labels, vectors


def test_export_writes_integer_labels_and_a_label_map(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "a", [1, 2, 3, 4], labels=["dogs", "cats", "", "dogs"])
    done = export_pool(pool, tmp_path / "out")
    names, labels, vectors = lightly_style_read(done.csv)
    label_map = json.loads(done.label_map.read_text())
    # Sorted names, numbered from 0, as torchvision's ImageFolder numbers class folders.
    assert label_map == {"0": "", "1": "cats", "2": "dogs"}
    table = read_pool(pool)
    assert table is not None
    assert [label_map[str(n)] for n in labels] == list(table["labels"])
    assert names == export_names(table)
    np.testing.assert_allclose(vectors, embeddings_of(table), atol=1e-7)


def test_import_restores_names_from_the_label_map_beside_the_csv(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, "a", [1, 2, 3], labels=["dogs", "cats", "dogs"])
    done = export_pool(pool, tmp_path / "out")
    import_pool(done.csv, done.images, tmp_path / "pools" / "named")
    named = read_pool(tmp_path / "pools" / "named")
    assert named is not None and list(named["labels"]) == ["dogs", "cats", "dogs"]
    # Without the map the integers stay as they are.
    done.label_map.unlink()
    import_pool(done.csv, done.images, tmp_path / "pools" / "numbered")
    numbered = read_pool(tmp_path / "pools" / "numbered")
    assert numbered is not None and list(numbered["labels"]) == ["1", "0", "1"]


@pytest.mark.parametrize(
    ("label", "label_map", "message"),
    [
        ("5", '{"0": "cats"}', r"e\.csv: row 1 has label '5', which .*labels\.json does not name"),
        ("cats", '{"0": "cats"}', r"e\.csv: row 1 has label 'cats', which .*labels\.json"),
        ("0", '["cats"]', r"labels\.json is not a label map"),
        ("0", '{"zero": "cats"}', r"labels\.json is not a label map"),
        ("0", '{"0": 7}', r"labels\.json is not a label map"),
        ("0", "{not json", r"labels\.json is not a label map"),
    ],
)
def test_import_refuses_labels_its_label_map_cannot_name(
    tmp_path: Path, label: str, label_map: str, message: str
) -> None:
    draw_image(tmp_path / "1.png", seed=1)
    csv_path = tmp_path / "e.csv"
    csv_path.write_text(f"filenames,embedding_0,embedding_1,labels\n1.png,1,0,{label}\n")
    (tmp_path / "labels.json").write_text(label_map)
    with pytest.raises(PoolError, match=message):
        import_pool(csv_path, tmp_path, tmp_path / "pools" / "x")
    assert not (tmp_path / "pools").exists()


def test_import_refuses_a_link_loop(tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").symlink_to(images / "b.png")
    (images / "b.png").symlink_to(images / "a.png")
    csv_path = tmp_path / "e.csv"
    csv_path.write_text("filenames,embedding_0,embedding_1,labels\na.png,1,0,x\n")
    with pytest.raises(PoolError, match=r"e\.csv: row 1 names 'a\.png'"):
        import_pool(csv_path, images, tmp_path / "pools" / "x")
    assert not (tmp_path / "pools").exists()
