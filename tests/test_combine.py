"""Combining pools: duplicates dropped, models never mixed, optional thinning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datapool.combine import combine_pools, images_of
from datapool.errors import PoolError
from datapool.images import content_hash
from datapool.increment import StoppingCondition
from datapool.pool import POOL_CSV, column_order, read_pool, stored_image
from datapool.transaction import create_pool
from tests.conftest import draw_image


def make_pool(root: Path, name: str, seeds: list[int], *, model: str = "m1", dim: int = 4) -> Path:
    """A pool of drawn images (one per seed) with random unit embeddings, via create_pool."""
    inbox = root / f"inbox_{name}"
    rng = np.random.default_rng(len(name) + sum(seeds))
    rows, files = [], {}
    for seed in seeds:
        path = draw_image(inbox / f"img_{seed}.png", seed=seed)
        digest = content_hash(path)
        files[digest] = path
        vector = rng.normal(size=dim)
        vector /= np.linalg.norm(vector)
        rows.append(
            {
                "filenames": path.name,
                **{f"embedding_{i}": v for i, v in enumerate(vector)},
                "labels": "x",
                "content_hash": digest,
                "batch_id": f"b_{name}",
                "model_id": model,
                "source": str(inbox),
                "pick_rank": len(rows) + 1,
                "pick_distance": 0.5,
            }
        )
    table = pd.DataFrame(rows).reindex(columns=column_order(dim))
    create_pool(root / "pools" / name, table, sources=files, checkpoint=None)
    return root / "pools" / name


def test_duplicates_by_content_are_dropped(tmp_path: Path) -> None:
    a = make_pool(tmp_path, "a", [1, 2, 3])
    b = make_pool(tmp_path, "b", [3, 4])
    done = combine_pools(a, b)
    assert done.duplicates == 1 and done.reembedded == 0 and done.thinned == 0
    pool_a, pool_b = read_pool(a), read_pool(b)
    assert pool_a is not None and pool_b is not None
    expected = [*pool_a["content_hash"], pool_b["content_hash"].iloc[1]]
    assert list(done.table["content_hash"]) == expected
    # The first pool's row wins, embedding included.
    assert done.table.iloc[2]["embedding_0"] == pool_a.iloc[2]["embedding_0"]


def test_different_models_are_refused_without_reembed(tmp_path: Path) -> None:
    a = make_pool(tmp_path, "a", [1, 2])
    b = make_pool(tmp_path, "b", [3], model="m2")
    with pytest.raises(PoolError, match=r"never mixed.*--reembed"):
        combine_pools(a, b)


def test_reembed_needs_the_first_pools_checkpoint(tmp_path: Path) -> None:
    a = make_pool(tmp_path, "a", [1, 2])
    b = make_pool(tmp_path, "b", [3], model="m2")
    with pytest.raises(PoolError, match=r"no checkpoint_latest\.ckpt"):
        combine_pools(a, b, reembed_second=True)


def test_thinning_keeps_the_most_diverse_rows_in_order(tmp_path: Path) -> None:
    a = make_pool(tmp_path, "a", [1, 2, 3, 4])
    b = make_pool(tmp_path, "b", [5, 6, 7])
    done = combine_pools(a, b, stop=StoppingCondition(n_samples=3, min_distance=0.0))
    assert len(done.table) == 3 and done.thinned == 4
    everything = combine_pools(a, b).table
    positions = [list(everything["content_hash"]).index(h) for h in done.table["content_hash"]]
    assert positions == sorted(positions) and positions[0] == 0  # k-center starts at row 0


def test_create_pool_copies_images_by_content_and_refuses_overwrite(tmp_path: Path) -> None:
    a = make_pool(tmp_path, "a", [1, 2])
    b = make_pool(tmp_path, "b", [2, 3])
    done = combine_pools(a, b)
    files = images_of([a, b], done.table)
    target = tmp_path / "pools" / "c"
    create_pool(target, done.table, sources=files, checkpoint=None)
    for _, row in done.table.iterrows():
        image = stored_image(target, content_hash=row["content_hash"], filename=row["filenames"])
        assert content_hash(image) == row["content_hash"]
    with pytest.raises(PoolError, match="already exists"):
        create_pool(target, done.table, sources=files, checkpoint=None)


def test_create_pool_rejects_a_changed_image_and_leaves_nothing(tmp_path: Path) -> None:
    a = make_pool(tmp_path, "a", [1])
    table = read_pool(a)
    assert table is not None
    wrong = draw_image(tmp_path / "other.png", seed=99)
    with pytest.raises(PoolError, match="changed since it was embedded"):
        create_pool(
            tmp_path / "pools" / "c",
            table,
            sources={table["content_hash"][0]: wrong},
            checkpoint=None,
        )
    assert not (tmp_path / "pools" / "c").exists()
    assert [p.name for p in (tmp_path / "pools").iterdir()] == ["a"]
    assert (a / POOL_CSV).is_file()
