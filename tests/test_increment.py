"""One increment: selection conditioned on the pool, idempotent merge, compatibility checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from datapool.errors import InputError, PoolError
from datapool.increment import (
    StoppingCondition,
    describe_stop,
    merge_increment,
    new_candidates,
    select_increment,
)
from datapool.pool import embeddings_of

from .test_pool import pool_table


def candidates(n: int, dim: int = 3, *, seed: int = 1, batch: str = "b2") -> pd.DataFrame:
    table = pool_table(n, dim, seed=seed, batch=batch)
    return table.drop(columns=["pick_rank", "pick_distance"])


def test_stopping_condition_validation() -> None:
    with pytest.raises(InputError, match="never stop"):
        StoppingCondition(n_samples=0, min_distance=0.0)
    with pytest.raises(InputError, match="min_distance"):
        StoppingCondition(n_samples=3, min_distance=-0.1)
    with pytest.raises(InputError, match="min_distance"):
        StoppingCondition(n_samples=3, min_distance=float("nan"))
    with pytest.raises(InputError, match="n_samples"):
        StoppingCondition(n_samples=-1, min_distance=0.5)


def test_picks_are_farthest_first_and_conditioned_on_pool() -> None:
    # Pool sits at +x; candidates: one near +x, one at -x, one at +y.
    pool = pool_table(1, 2)
    pool[["embedding_0", "embedding_1"]] = [[1.0, 0.0]]
    cands = candidates(3, 2)
    cands[["embedding_0", "embedding_1"]] = [[0.99, 0.14], [-1.0, 0.0], [0.0, 1.0]]
    picks = select_increment(cands, pool, StoppingCondition(n_samples=2, min_distance=0.0))
    assert list(picks["filenames"]) == ["img_1_1.png", "img_1_2.png"]
    assert picks["pick_distance"].iloc[0] == pytest.approx(2.0)
    assert picks["pick_distance"].iloc[1] == pytest.approx(np.sqrt(2.0))
    assert list(picks["pick_rank"]) == [1, 2]


def test_min_distance_stops_selection() -> None:
    cands = candidates(3, 2)
    cands[["embedding_0", "embedding_1"]] = [[1.0, 0.0], [-1.0, 0.0], [0.995, 0.0998]]
    picks = select_increment(cands, None, StoppingCondition(n_samples=0, min_distance=0.5))
    assert len(picks) == 2
    assert "min_distance" in describe_stop(picks, n_fresh=3, stop=StoppingCondition(0, 0.5))


def test_images_already_in_pool_are_not_candidates() -> None:
    pool = pool_table(3, 3, seed=0)
    cands = pd.concat(
        [
            candidates(2, 3, seed=5),
            pool.drop(columns=["pick_rank", "pick_distance"]).assign(batch_id="b2"),
        ],
        ignore_index=True,
    )
    assert len(new_candidates(cands, pool)) == 2
    picks = select_increment(cands, pool, StoppingCondition(n_samples=10, min_distance=0.0))
    assert set(picks["content_hash"]) <= {"h5_0", "h5_1"}


def test_merge_is_idempotent_per_batch() -> None:
    pool = pool_table(3, 3, seed=0, batch="b1")
    cands = candidates(5, 3, seed=1, batch="b2")
    stop = StoppingCondition(n_samples=2, min_distance=0.0)
    once = merge_increment(pool, cands, select_increment(cands, pool, stop), weak_labels=True)
    again = merge_increment(once, cands, select_increment(cands, once, stop), weak_labels=True)
    pd.testing.assert_frame_equal(once, again)
    assert len(once) == 5
    # A smaller n_samples on a re-run shrinks this batch's share instead of adding to it.
    fewer = StoppingCondition(n_samples=1, min_distance=0.0)
    redone = merge_increment(once, cands, select_increment(cands, once, fewer), weak_labels=True)
    assert len(redone) == 4 and (redone["batch_id"] == "b1").sum() == 3


def test_weak_labels_switch() -> None:
    cands = candidates(3)
    picks = select_increment(cands, None, StoppingCondition(n_samples=3, min_distance=0.0))
    assert set(merge_increment(None, cands, picks, weak_labels=True)["labels"]) == {"cat"}
    assert set(merge_increment(None, cands, picks, weak_labels=False)["labels"]) == {""}


def test_merge_keeps_pick_embeddings() -> None:
    cands = candidates(4)
    picks = select_increment(cands, None, StoppingCondition(n_samples=4, min_distance=0.0))
    merged = merge_increment(None, cands, picks, weak_labels=True)
    by_hash = cands.set_index("content_hash")
    expected = embeddings_of(by_hash.loc[merged["content_hash"]].reset_index())
    np.testing.assert_array_equal(embeddings_of(merged), expected)


def test_dimension_mismatch_is_refused() -> None:
    pool = pool_table(3, 3)
    with pytest.raises(PoolError, match="dimension 3 but this batch's have 4"):
        select_increment(candidates(3, 4), pool, StoppingCondition(n_samples=1, min_distance=0.0))
    with pytest.raises(PoolError, match="dimension"):
        merge_increment(
            pool,
            candidates(3, 4),
            pd.DataFrame(
                {"filenames": [], "content_hash": [], "pick_rank": [], "pick_distance": []}
            ),
            weak_labels=True,
        )


def test_model_mismatch_is_refused() -> None:
    pool = pool_table(3, 3)
    cands = candidates(3, 3).assign(model_id="other")
    with pytest.raises(PoolError, match="different models"):
        select_increment(cands, pool, StoppingCondition(n_samples=1, min_distance=0.0))


def test_unknown_pick_is_refused() -> None:
    cands = candidates(3)
    picks = pd.DataFrame(
        {"filenames": ["x"], "content_hash": ["nope"], "pick_rank": [1], "pick_distance": [1.0]}
    )
    with pytest.raises(PoolError, match="not among the candidates"):
        merge_increment(None, cands, picks, weak_labels=True)
