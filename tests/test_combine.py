"""Combining pools: duplicates dropped, models never mixed, optional thinning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datapool.combine import combine_pools, images_of
from datapool.embedding.model import ModelConfig, build_model, save_checkpoint
from datapool.errors import PoolError
from datapool.images import content_hash
from datapool.increment import StoppingCondition
from datapool.packs import read_image
from datapool.pool import CHECKPOINT, IMAGES_DIR, POOL_CSV, column_order, read_pool
from datapool.transaction import create_pool
from tests.conftest import draw_image

from .synthetic import write_unchecked


def make_pool(
    root: Path,
    name: str,
    seeds: list[int],
    *,
    model: str = "m1",
    dim: int = 4,
    labels: list[str] | None = None,
) -> Path:
    """A pool of drawn images (one per seed) with random unit embeddings, via create_pool.

    Every row is labelled ``x`` unless ``labels`` gives one label per seed.
    """
    inbox = root / f"inbox_{name}"
    rng = np.random.default_rng(len(name) + sum(seeds))
    rows, files = [], {}
    for seed, label in zip(seeds, labels or ["x"] * len(seeds), strict=True):
        path = draw_image(inbox / f"img_{seed}.png", seed=seed)
        digest = content_hash(path)
        files[digest] = path
        vector = rng.normal(size=dim)
        vector /= np.linalg.norm(vector)
        rows.append(
            {
                "filenames": path.name,
                **{f"embedding_{i}": v for i, v in enumerate(vector)},
                "labels": label,
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
    assert (
        sorted(p.suffix for p in (target / IMAGES_DIR).iterdir()) == [".zip"] * 2
    )  # a pack per batch
    for _, row in done.table.iterrows():
        image = read_image(target, row)  # checked against the row's content hash
        assert image == (tmp_path / f"inbox_{row['batch_id'][2:]}" / row["filenames"]).read_bytes()
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


SHARD = r"shards/batch-[0-9a-f]{16}\.arrow"  # how errors name a pool's shard


def craft_hash(pool_dir: Path, *, row: int, value: str) -> None:
    """Overwrite one row's content_hash in the pool's shard, as a hand edit or an attacker would."""
    table = read_pool(pool_dir)
    assert table is not None
    table.loc[row - 1, "content_hash"] = value
    write_unchecked(pool_dir, table)


def test_a_crafted_content_hash_cannot_make_combine_write_outside(tmp_path: Path) -> None:
    # The pool's copy of an image is images/<content_hash><ext>: an absolute "hash"
    # once made the new pool's image land (and its folder be created) anywhere.
    a = make_pool(tmp_path, "a", [1, 2])
    b = make_pool(tmp_path, "b", [3, 4])
    outside = tmp_path / "outside" / "evil"
    craft_hash(b, row=2, value=str(outside))
    with pytest.raises(PoolError, match=rf"{SHARD}: row 2 .*content_hash: '{outside}'"):
        done = combine_pools(a, b)
        create_pool(
            tmp_path / "pools" / "c",
            done.table,
            sources=images_of([a, b], done.table),
            checkpoint=None,
        )
    assert not (tmp_path / "outside").exists()
    assert not (tmp_path / "pools" / "c").exists()


def test_a_crafted_content_hash_cannot_make_reembed_write_outside(tmp_path: Path) -> None:
    # Re-embedding copies the second pool's images into a scratch folder; an
    # absolute "hash" in the file name once sent the copy anywhere on disk.
    a = make_pool(tmp_path, "a", [1, 2])
    save_checkpoint(
        build_model(ModelConfig(arch="resnet18", embedding_dim=4, image_size=32), seed=0),
        a / CHECKPOINT,
    )
    b = make_pool(tmp_path, "b", [3, 4], model="m2")
    escaped = tmp_path / "escaped"
    craft_hash(b, row=1, value=str(escaped))
    with pytest.raises(PoolError, match=rf"{SHARD}: row 1 .*content_hash: '{escaped}'"):
        combine_pools(a, b, reembed_second=True, device="cpu")
    assert not escaped.with_suffix(".png").exists()
