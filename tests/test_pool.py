"""The pool's file format: validation naming row and column, atomic writes, fresh-clone guard."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from datapool.errors import PoolError
from datapool.pool import (
    IMAGES_DIR,
    POOL_CSV,
    column_order,
    embeddings_of,
    ensure_pool_present,
    read_pool,
    read_table,
    stored_image,
    write_table,
)


def pool_table(n: int = 4, dim: int = 3, *, seed: int = 0, batch: str = "b1") -> pd.DataFrame:
    """A valid pool table of ``n`` unit vectors."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pd.DataFrame(vectors, columns=[f"embedding_{i}" for i in range(dim)])
    table.insert(0, "filenames", [f"img_{seed}_{i}.png" for i in range(n)])
    table["labels"] = ["cat"] * n
    table["content_hash"] = [f"h{seed}_{i}" for i in range(n)]
    table["batch_id"] = batch
    table["model_id"] = "m1"
    table["source"] = "/inbox"
    table["pick_rank"] = np.arange(1, n + 1)
    table["pick_distance"] = np.linspace(1.0, 0.5, n)
    return table[column_order(dim)]


def stored_table(n: int = 4, dim: int = 3, *, seed: int = 0) -> pd.DataFrame:
    """:func:`pool_table` with real-looking content hashes (64 hex digits), as a file must hold."""
    table = pool_table(n, dim, seed=seed)
    table["content_hash"] = [hashlib.sha256(h.encode()).hexdigest() for h in table["content_hash"]]
    return table


def test_round_trip_keeps_float32_embeddings_exactly(tmp_path: Path) -> None:
    table = stored_table(50, 8)
    write_table(table, tmp_path / POOL_CSV)
    back = read_pool(tmp_path)
    assert back is not None
    np.testing.assert_array_equal(embeddings_of(back), embeddings_of(table))
    assert list(back.columns) == list(table.columns)
    assert list(back.columns[:2]) == ["filenames", "embedding_0"]


def test_missing_pool_reads_as_none(tmp_path: Path) -> None:
    assert read_pool(tmp_path / "nothing") is None


@settings(max_examples=40, deadline=None)
@given(
    names=st.lists(
        st.text(min_size=1, max_size=12).filter(lambda s: "\x00" not in s and "\r" not in s),
        min_size=1,
        max_size=5,
    )
)
def test_awkward_filenames_round_trip(
    tmp_path_factory: pytest.TempPathFactory, names: list[str]
) -> None:
    folder = tmp_path_factory.mktemp("names")
    table = stored_table(len(names))
    table["filenames"] = names
    table["labels"] = list(reversed(names))
    write_table(table, folder / POOL_CSV)
    back = read_pool(folder)
    assert back is not None
    assert list(back["filenames"]) == names
    assert list(back["labels"]) == list(reversed(names))


def test_missing_column_is_named(tmp_path: Path) -> None:
    write_table(stored_table().drop(columns=["content_hash"]), tmp_path / POOL_CSV)
    with pytest.raises(PoolError, match=r"lacks column.*content_hash"):
        read_pool(tmp_path)


def test_gap_in_embedding_columns_is_named(tmp_path: Path) -> None:
    write_table(stored_table(dim=4).drop(columns=["embedding_2"]), tmp_path / POOL_CSV)
    with pytest.raises(PoolError, match="embedding_2 is missing"):
        read_pool(tmp_path)


@pytest.mark.parametrize("bad", ["nan", "inf", "", "abc"])
def test_non_finite_embedding_names_row_and_column(tmp_path: Path, bad: str) -> None:
    table = stored_table().astype({"embedding_1": object})
    table.loc[2, "embedding_1"] = bad
    write_table(table, tmp_path / POOL_CSV)
    with pytest.raises(PoolError, match=r"row 3 \(filenames='img_0_2.png'\), column embedding_1"):
        read_pool(tmp_path)


def test_repeated_image_is_refused(tmp_path: Path) -> None:
    table = stored_table()
    table.loc[3, "content_hash"] = table.loc[1, "content_hash"]
    write_table(table, tmp_path / POOL_CSV)
    with pytest.raises(PoolError, match=r"row 4 .* repeats the content_hash"):
        read_pool(tmp_path)


def test_not_a_csv_is_refused(tmp_path: Path) -> None:
    (tmp_path / POOL_CSV).write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PoolError, match=POOL_CSV):
        read_table(tmp_path / POOL_CSV)


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / POOL_CSV
    write_table(stored_table(), path)
    before = path.read_bytes()

    class Exploding(pd.DataFrame):
        def to_csv(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_table(Exploding(stored_table(9)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [POOL_CSV]  # no temp file left behind


def _lock(tmp_path: Path, nfiles: int) -> Path:
    lock = {
        "schema": "2.0",
        "stages": {
            "merge": {
                "cmd": "x",
                "outs": [{"path": "pools/p", "hash": "md5", "md5": "abc.dir", "nfiles": nfiles}],
            }
        },
    }
    path = tmp_path / "dvc.lock"
    path.write_text(yaml.safe_dump(lock))
    return path


def test_guard_refuses_recorded_pool_that_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PoolError, match="dvc pull"):
        ensure_pool_present(Path("pools/p"), lock_file=_lock(tmp_path, 2))


def test_guard_allows_new_pool_and_present_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    ensure_pool_present(Path("pools/p"), lock_file=tmp_path / "no.lock")
    ensure_pool_present(Path("pools/other"), lock_file=_lock(tmp_path, 2))
    ensure_pool_present(Path("pools/p"), lock_file=_lock(tmp_path, 0))
    write_table(stored_table(), tmp_path / "pools/p" / POOL_CSV)
    ensure_pool_present(Path("pools/p"), lock_file=_lock(tmp_path, 2))


def test_stored_image_cannot_escape_the_pool(tmp_path: Path) -> None:
    for name in ("../../etc/passwd", "/abs/x.jpg", "a/../../b.png", "x.p/ng", "weird.j pg"):
        path = stored_image(tmp_path, content_hash="ab" * 32, filename=name)
        assert path.parent == tmp_path / IMAGES_DIR
        assert path.name.startswith("ab" * 32)


@pytest.mark.parametrize(
    "bad",
    ["/etc/passwd", "../../../x", "AB" * 32, "a" * 63, "a" * 65, "g" * 64, "", " " + "a" * 63],
)
def test_content_hash_must_be_64_lowercase_hex_digits(tmp_path: Path, bad: str) -> None:
    # The hash names the pool's copy of an image (images/<hash><ext>); anything but
    # a sha256 digest could name a file outside the pool.
    table = stored_table()
    table.loc[2, "content_hash"] = bad
    write_table(table, tmp_path / POOL_CSV)
    where = rf"row 3 \(filenames='img_0_2.png'\), column content_hash: {re.escape(repr(bad))}"
    expected = rf"{POOL_CSV}: {where}"
    with pytest.raises(PoolError, match=expected):
        read_pool(tmp_path)
    # Candidates are read by the same function: the check holds for them too.
    write_table(table.drop(columns=["pick_rank", "pick_distance"]), tmp_path / "cands.csv")
    with pytest.raises(PoolError, match=expected.replace(POOL_CSV, "cands.csv")):
        read_table(tmp_path / "cands.csv", required=())


def test_stored_image_refuses_what_is_not_a_content_hash(tmp_path: Path) -> None:
    for bad in ("/etc/passwd", "../" * 3 + "x", "AB" * 32):
        with pytest.raises(PoolError, match=re.escape(repr(bad))):
            stored_image(tmp_path, content_hash=bad, filename="x.png")
