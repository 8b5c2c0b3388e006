"""One increment: selection conditioned on the pool, idempotent merge, compatibility checks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datapool.errors import InputError, PoolError
from datapool.increment import (
    SelectionInputs,
    StoppingCondition,
    batch_identity,
    choose_increment,
    describe_stop,
    effective_pool,
    merge_increment,
    new_candidates,
    read_picks,
    select_increment,
)
from datapool.pool import embedding_columns, embeddings_of, read_table, write_table

from .test_pool import pool_table, stored_table


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


def test_only_the_latest_increment_is_redone_an_identical_inbox_is_new() -> None:
    pool = pd.concat([pool_table(3, seed=0, batch="aaaa"), pool_table(2, seed=1, batch="bbbb")])
    assert batch_identity(content_id="bbbb", pool=pool) == "bbbb"  # run again: a redo
    assert batch_identity(content_id="cccc", pool=pool) == "cccc"  # new content
    assert batch_identity(content_id="aaaa", pool=None) == "aaaa"
    # week1's inbox again after week2: its own increment, whose rows are not week1's.
    again = batch_identity(content_id="aaaa", pool=pool)
    assert again == "aaaa-2"
    grown = pd.concat([pool, pool_table(1, seed=2, batch=again)], ignore_index=True)
    assert batch_identity(content_id="aaaa", pool=grown) == "aaaa-2"  # and that one redone
    later = pd.concat([grown, pool_table(1, seed=3, batch="dddd")], ignore_index=True)
    assert batch_identity(content_id="aaaa", pool=later) == "aaaa-3"


def test_identical_inbox_leaves_the_earlier_batch_alone() -> None:
    week1 = candidates(4, seed=0, batch="aaaa")
    stop = StoppingCondition(n_samples=2, min_distance=0.0)
    pool = merge_increment(None, week1, select_increment(week1, None, stop), weak_labels=True)
    week2 = candidates(2, seed=1, batch="bbbb")
    pool = merge_increment(pool, week2, select_increment(week2, pool, stop), weak_labels=True)
    pool.loc[0, "labels"] = "edited"
    repeat = week1.assign(batch_id=batch_identity(content_id="aaaa", pool=pool))
    picks = select_increment(repeat, pool, stop)
    grown = merge_increment(pool, repeat, picks, weak_labels=True)
    pd.testing.assert_frame_equal(grown.iloc[: len(pool)], pool)
    assert len(grown) == 6  # the two week1 images not picked the first time
    assert set(picks["content_hash"]).isdisjoint(pool["content_hash"])


def _reembedded(pool: pd.DataFrame, path: Path) -> pd.DataFrame:
    """What ``embed`` writes after training: the pool's rows, new embeddings, new model."""
    fresh = pool.copy()
    columns = embedding_columns(3)
    fresh[columns] = -fresh[columns].to_numpy()
    fresh["model_id"] = "m2"
    write_table(fresh, path)
    return fresh


def test_effective_pool_keeps_edits_made_after_embed(tmp_path: Path) -> None:
    write_table(stored_table(4), tmp_path / "pool.csv")
    pool = read_table(tmp_path / "pool.csv")
    fresh = _reembedded(pool, tmp_path / "reembedded.csv")
    # After embed ran, the user relabels a row, adds a column and deletes a row.
    pool.loc[1, "labels"] = "dog"
    pool["reviewed"] = ["yes", "no", "", "yes"]
    pool = pool.drop(index=3).reset_index(drop=True)

    seen = effective_pool(pool, tmp_path / "reembedded.csv")

    assert seen is not None
    assert list(seen["labels"]) == ["cat", "dog", "cat"]
    assert list(seen["reviewed"]) == ["yes", "no", ""]
    np.testing.assert_array_equal(embeddings_of(seen), embeddings_of(fresh)[:3])
    assert set(seen["model_id"]) == {"m2"}
    assert effective_pool(pool, tmp_path / "absent.csv") is pool


def test_user_columns_survive_merges_exactly(tmp_path: Path) -> None:
    pool = pool_table(2, seed=0, batch="b1")
    pool["score"] = [12345678901, 7]  # integers a float column would mangle
    pool["note"] = ["keep", ""]
    cands = candidates(2, seed=1, batch="b2")
    stop = StoppingCondition(n_samples=2, min_distance=0.0)

    merged = merge_increment(pool, cands, select_increment(cands, pool, stop), weak_labels=True)

    assert list(merged.columns[-2:]) == ["score", "note"]
    write_table(merged, tmp_path / "pool.csv")
    text = pd.read_csv(tmp_path / "pool.csv", dtype=str, keep_default_na=False)
    assert list(text["score"]) == ["12345678901", "7", "", ""]
    assert list(text["note"]) == ["keep", "", "", ""]
    # Redoing the increment keeps the values of its own rows picked again, too.
    merged.loc[2, "note"] = "mine"
    redone = merge_increment(merged, cands, select_increment(cands, merged, stop), weak_labels=True)
    assert list(redone["note"]) == ["keep", "", "mine", ""]


def test_redoing_the_latest_increment_keeps_the_labels_edited_on_it() -> None:
    pool = pool_table(2, seed=0, batch="b1")
    cands = candidates(4, seed=1, batch="b2")
    two = StoppingCondition(n_samples=2, min_distance=0.0)
    merged = merge_increment(pool, cands, select_increment(cands, pool, two), weak_labels=True)
    merged.loc[2, "labels"] = "dog-fixed-by-user"
    merged.loc[3, "labels"] = ""  # a label removed on purpose stays removed
    assert batch_identity(content_id="b2", pool=merged) == "b2"

    # The user raises n_samples: the same batch is redone, its rows replaced.
    three = StoppingCondition(n_samples=3, min_distance=0.0)
    redone = merge_increment(
        merged, cands, select_increment(cands, merged, three), weak_labels=True
    )

    assert len(redone) == 5
    pd.testing.assert_frame_equal(
        redone.iloc[:4].drop(columns=["pick_rank", "pick_distance"]),
        merged.drop(columns=["pick_rank", "pick_distance"]),
    )
    assert list(redone["labels"]) == ["cat", "cat", "dog-fixed-by-user", "", "cat"]
    # Without weak labels a redo still keeps what the pool's rows were given.
    plain = merge_increment(
        merged, cands, select_increment(cands, merged, three), weak_labels=False
    )
    assert list(plain["labels"]) == ["cat", "cat", "dog-fixed-by-user", "", ""]


def test_the_recorded_latest_increment_decides_what_a_run_may_redo() -> None:
    week1, week2 = pool_table(2, seed=0, batch="aaaa"), pool_table(2, seed=1, batch="bbbb")
    in_order = pd.concat([week1, week2], ignore_index=True)
    # Week 3's inbox (cccc) picked nothing and left no row, but the manifest records it:
    # week2's inbox again is a new increment, and week 3's again is its redo.
    assert batch_identity(content_id="bbbb", pool=in_order, latest="cccc") == "bbbb-2"
    assert batch_identity(content_id="cccc", pool=in_order, latest="cccc") == "cccc"
    # Rows reordered (week1 last) do not move the latest increment when it is recorded.
    resorted = pd.concat([week2, week1], ignore_index=True)
    assert batch_identity(content_id="bbbb", pool=resorted, latest="bbbb") == "bbbb"
    assert batch_identity(content_id="aaaa", pool=resorted, latest="bbbb") == "aaaa-2"
    # A first increment that picked nothing is still the latest: running it again redoes it.
    assert batch_identity(content_id="aaaa", pool=None, latest="aaaa") == "aaaa"


def test_without_a_record_the_latest_increment_is_the_batch_of_the_last_row() -> None:
    # Pools whose manifest records no latest increment (combined, imported, migrated).
    week1, week2 = pool_table(2, seed=0, batch="aaaa"), pool_table(2, seed=1, batch="bbbb")
    in_order = pd.concat([week1, week2], ignore_index=True)
    assert batch_identity(content_id="bbbb", pool=in_order) == "bbbb"
    resorted = pd.concat([week2, week1], ignore_index=True)
    assert batch_identity(content_id="aaaa", pool=resorted) == "aaaa"
    assert batch_identity(content_id="bbbb", pool=resorted) == "bbbb-2"


def test_picks_or_candidates_that_repeat_an_image_are_refused_naming_the_file(
    tmp_path: Path,
) -> None:
    from datapool.store import read_any, write_rows

    picks = pd.DataFrame(
        {"filenames": ["a.png", "b.png"], "content_hash": ["a" * 64] * 2, "pick_rank": [1, 2]}
    ).assign(pick_distance=1.0)
    write_rows(picks, tmp_path / "picks.arrow")
    with pytest.raises(PoolError, match=r"picks\.arrow: row 2 \(filenames='b.png'\) picks"):
        read_picks(tmp_path / "picks.arrow")
    cands = pool_table(3)
    cands["content_hash"] = [hashlib.sha256(b"x").hexdigest()] * 3
    write_rows(cands, tmp_path / "candidates.arrow")
    with pytest.raises(PoolError, match=r"candidates\.arrow: row 2 .* repeats the content_hash"):
        read_any(tmp_path / "candidates.arrow", required=("content_hash",))


# --------------------------------------------------------------------------- strategies (issue 11)


def _cluster_and_outlier() -> pd.DataFrame:
    """Ten candidates tightly around +x (two sub-folders) and one outlier at +z (last)."""
    rng = np.random.default_rng(3)
    vectors = np.array([1.0, 0.0, 0.0]) + rng.normal(scale=0.05, size=(10, 3))
    vectors = np.vstack([vectors, [0.0, 0.0, 1.0]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cands = candidates(11, 3)
    cands[embedding_columns(3)] = vectors.astype(np.float32)
    cands["labels"] = ["a"] * 5 + ["b"] * 6
    return cands


def _scores(tmp_path: Path, cands: pd.DataFrame, **columns: Sequence[object]) -> Path:
    path = tmp_path / "scores.csv"
    pd.DataFrame({"filenames": cands["filenames"], **columns}).to_csv(path, index=False)
    return path


def _strategies(*entries: dict[str, object]) -> tuple[object, ...]:
    from datapool.strategies import parse_strategies

    return parse_strategies(list(entries))


def test_plain_diversity_is_greedy_k_center_with_no_extra_scores() -> None:
    from datapool.selection import k_center_greedy

    pool, cands = pool_table(4, 3, seed=0), candidates(30, 3, seed=7)
    choice = choose_increment(cands, pool, StoppingCondition(5, 0.0))
    direct = k_center_greedy(embeddings_of(cands), pool=embeddings_of(pool), n_samples=5)
    assert list(choice.picks["filenames"]) == list(cands["filenames"].iloc[direct.indices])
    assert np.array_equal(choice.picks["pick_distance"].to_numpy(), direct.min_distances)
    assert [c for c in choice.picks.columns if c.startswith("score_")] == []
    assert choice.strategies == {"diversity": {"strategy": "diversity", "strength": 1.0}}


def test_typicality_skips_the_outlier_that_diversity_takes() -> None:
    cands, stop = _cluster_and_outlier(), StoppingCondition(3, 0.0)
    plain = choose_increment(cands, None, stop)
    assert "img_1_10.png" in set(plain.picks["filenames"])
    mixed = SelectionInputs(
        strategies=_strategies({"strategy": "diversity"}, {"strategy": "typicality", "k": 3})
    )
    typical = choose_increment(cands, None, stop, mixed)
    assert "img_1_10.png" not in set(typical.picks["filenames"])
    assert typical.picks["score_typicality"].between(0, 1).all()
    assert set(typical.strategies) == {"diversity", "typicality"}


def test_weights_threshold_and_files_steer_the_picks(tmp_path: Path) -> None:
    cands = _cluster_and_outlier()
    weight = [float(i) for i in range(11)]
    scores = _scores(tmp_path, cands, weight=weight, sharp=[i % 2 for i in range(11)])
    masked = tmp_path / "masked.txt"
    masked.write_text("img_1_9.png\n")
    selection = SelectionInputs(
        strategies=_strategies(
            {"strategy": "weights", "column": "weight", "strength": 5.0},
            {"strategy": "threshold", "column": "sharp", "operation": ">", "value": 0.5},
        ),
        scores_file=scores,
        masked_file=masked,
    )
    choice = choose_increment(cands, None, StoppingCondition(3, 0.0), selection)
    # odd rows only (sharp = 1), heaviest first, the masked img_1_9 never
    assert list(choice.picks["filenames"]) == ["img_1_7.png", "img_1_5.png", "img_1_3.png"]
    # normalised over the candidates the threshold and the mask leave (max 7)
    assert list(choice.picks["score_weights:weight"]) == pytest.approx([1, 5 / 7, 3 / 7])


def test_relevant_and_preselected_files(tmp_path: Path) -> None:
    cands = _cluster_and_outlier()
    relevant, chosen = tmp_path / "relevant.txt", tmp_path / "chosen.csv"
    relevant.write_text("img_1_0.png\nimg_1_1.png\nimg_1_2.png\nnot_a_candidate.png\n")
    chosen.write_text("filenames,selected\nimg_1_10.png,true\nimg_1_4.png,false\n")
    selection = SelectionInputs(relevant_file=relevant, selected_file=chosen)
    choice = choose_increment(cands, None, StoppingCondition(3, 0.0), selection)
    names = list(choice.picks["filenames"])
    assert names[0] == "img_1_10.png" and choice.preselected == 1  # pre-selected come first
    assert set(names[1:]) <= {"img_1_0.png", "img_1_1.png", "img_1_2.png"} and len(names) == 3


def test_balance_over_weak_labels_hits_the_target() -> None:
    selection = SelectionInputs(
        strategies=_strategies(
            {"strategy": "diversity"},
            {"strategy": "balance", "target": {"a": 0.75, "b": 0.25}, "strength": 3.0},
        )
    )
    choice = choose_increment(_cluster_and_outlier(), None, StoppingCondition(4, 0.0), selection)
    labels = [name for name in choice.picks["filenames"]]
    a_picks = [n for n in labels if int(n.split("_")[2].split(".")[0]) < 5]
    assert len(a_picks) == 3 and len(labels) == 4


def test_similarity_picks_near_the_queries_first() -> None:
    cands = _cluster_and_outlier()
    selection = SelectionInputs(
        strategies=_strategies({"strategy": "similarity", "strength": 4.0}),
        queries=np.array([[0.0, 0.1, 0.99]], dtype=np.float32),
    )
    choice = choose_increment(cands, None, StoppingCondition(1, 0.0), selection)
    assert list(choice.picks["filenames"]) == ["img_1_10.png"]


def test_proportion_samples_is_a_rounded_up_share_of_the_new_candidates() -> None:
    stop = StoppingCondition(0, 0.0, proportion_samples=0.3)
    assert stop.count(10) == 3 and stop.count(11) == 4 and stop.count(0) == 0
    choice = choose_increment(candidates(10, 3), None, stop)
    assert len(choice.picks) == 3
    assert "proportion_samples=0.3" in describe_stop(choice.picks, n_fresh=10, stop=stop)
    with pytest.raises(InputError, match="not both"):
        StoppingCondition(3, 0.0, proportion_samples=0.5)
    with pytest.raises(InputError, match="proportion_samples must be in"):
        StoppingCondition(0, 0.0, proportion_samples=1.5)


@pytest.mark.parametrize(
    ("entries", "columns", "message"),
    [
        ([{"strategy": "weights", "column": "nope"}], {"w": 1.0}, "has no column 'nope'"),
        ([{"strategy": "weights", "column": "w"}], {"w": float("nan")}, "not a finite number"),
        ([{"strategy": "weights", "column": "w"}], {"w": -1.0}, "must be a finite number >= 0"),
        (
            [{"strategy": "threshold", "column": "w", "operation": "<", "value": 0}],
            {"w": 1.0},
            "leaves none of the 11 candidates",
        ),
        (
            [{"strategy": "balance", "column": "", "target": {"a": 0.5, "zebra": 0.5}}],
            {"w": 1.0},
            "names label 'zebra'",
        ),
        ([{"strategy": "similarity"}], {"w": 1.0}, "similarity needs query embeddings"),
    ],
)
def test_bad_selection_inputs_are_refused_clearly(
    tmp_path: Path, entries: list[dict[str, object]], columns: dict[str, float], message: str
) -> None:
    cands = _cluster_and_outlier()
    scores = _scores(tmp_path, cands, **{k: [v] * len(cands) for k, v in columns.items()})
    selection = SelectionInputs(strategies=_strategies(*entries), scores_file=scores)
    with pytest.raises(InputError, match=message):
        choose_increment(cands, None, StoppingCondition(3, 0.0), selection)


def test_a_missing_score_file_is_refused_even_without_new_candidates(tmp_path: Path) -> None:
    selection = SelectionInputs(
        strategies=_strategies({"strategy": "weights", "column": "w"}),
        scores_file=tmp_path / "absent.csv",
    )
    with pytest.raises(InputError, match=r"absent\.csv does not exist"):
        choose_increment(candidates(0, 3), None, StoppingCondition(3, 0.0), selection)
