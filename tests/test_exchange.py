"""Lightly embeddings CSV: export a pool, import it back, and the checks on the way in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datapool.errors import PoolError
from datapool.exchange import export_names, export_pool, import_pool, import_table
from datapool.images import content_hash
from datapool.pool import embeddings_of, read_pool
from tests.conftest import draw_image
from tests.test_combine import make_pool


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
