"""The files an increment leaves for people: lists, selection.csv, metrics.json, plots, report.html.

Every number of metrics.json is recomputed here from the embeddings by brute force
(numpy, float64), independently of the selection engine and datapool.metrics.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datapool.increment import StoppingCondition, choose_increment, merge_increment
from datapool.layout import PLOT_FILES, REPORT_FILES
from datapool.metrics import evaluated_limit, evaluated_rows, neighbours
from datapool.pool import embeddings_of
from datapool.report import RunFacts, write_run_report
from tests.conftest import draw_image
from tests.test_pool import pool_table

CORRUPT = {"broken.jpg": "cannot decode: truncated"}
DUPLICATES = {"sub/copy.png": "a.png"}


def _with_images(table: pd.DataFrame, folder: Path, seed: int) -> pd.DataFrame:
    """``table`` whose rows name real PNGs drawn in ``folder``."""
    files = [draw_image(folder / name, seed=seed + i) for i, name in enumerate(table["filenames"])]
    digests = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    return table.assign(source=str(folder), content_hash=digests)


def _increment(tmp_path: Path, *, pool_rows: int, n_samples: int, min_distance: float = 0.0):
    """A pool of ``pool_rows`` (batch b1), 12 candidates of batch b2 of which 2 are already
    in the pool; returns the report's facts, its metrics and the tables used."""
    dim = 5
    prior = _with_images(pool_table(pool_rows, dim, seed=0), tmp_path / "old", 100)
    cands = _with_images(pool_table(12, dim, seed=7, batch="b2"), tmp_path / "inbox", 200)
    cands = cands.drop(columns=["pick_rank", "pick_distance"])
    cands["labels"] = ["dog"] * 6 + ["cat"] * 6
    if pool_rows >= 2:  # two candidates whose content the pool already holds
        cands.loc[:1, "content_hash"] = prior["content_hash"].iloc[:2].to_numpy()
    pool = prior if pool_rows else None
    stop = StoppingCondition(n_samples=n_samples, min_distance=min_distance)
    choice = choose_increment(cands, pool, stop)
    after = merge_increment(pool, cands, choice.picks, weak_labels=True)
    fresh = cands[~cands["content_hash"].isin(prior["content_hash"])].reset_index(drop=True)
    facts = RunFacts(
        pool_dir=tmp_path / "pools" / "cats",
        prior=pool,
        after=after,
        candidates=cands,
        fresh=fresh,
        picks=choice.picks,
        next_distance=choice.next_distance,
        corrupt=CORRUPT,
        duplicates=DUPLICATES,
        seconds={"embed": 2.5, "merge": 0.25},
        settings={
            "stopping_condition.n_samples": n_samples,
            "stopping_condition.min_distance": min_distance,
        },
    )
    out = tmp_path / "work"
    numbers = write_run_report(
        facts, report_dir=out / "report", metrics_file=out / "metrics.json", plots_dir=out / "plots"
    )
    return facts, numbers, out


def _nn(queries: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Brute-force Euclidean distance of each query to its nearest centre (float64)."""
    if len(centres) == 0:
        return np.full(len(queries), np.inf)
    diff = queries[:, None, :].astype(np.float64) - centres[None, :, :].astype(np.float64)
    return np.sqrt((diff**2).sum(axis=2)).min(axis=1)


@pytest.mark.parametrize(
    ("pool_rows", "n_samples", "min_distance"),
    [(6, 4, 0.0), (6, 0, 0.9), (0, 3, 0.0), (6, 50, 0.0)],
)
def test_metrics_json_recomputed_by_brute_force(
    tmp_path: Path, pool_rows: int, n_samples: int, min_distance: float
) -> None:
    facts, _, out = _increment(
        tmp_path, pool_rows=pool_rows, n_samples=n_samples, min_distance=min_distance
    )
    got = json.loads((out / "metrics.json").read_text())
    prior = embeddings_of(facts.prior) if facts.prior is not None else np.zeros((0, 5))
    fresh = embeddings_of(facts.fresh)
    picked = embeddings_of(facts.fresh.set_index("content_hash").loc[facts.picks["content_hash"]])
    before = _nn(fresh, prior)
    after = _nn(fresh, np.concatenate([prior, picked]))
    expected_picks = len(picked)
    assert got["pool"] == {
        "rows_before": pool_rows,
        "rows_after": pool_rows + expected_picks,
        "added": expected_picks,
    }
    already = 2 if pool_rows else 0
    assert got["candidates"] == {
        "decoded": 12,
        "new": 12 - already,
        "already_in_pool": already,
        "duplicates": 1,
        "corrupt": 1,
    }
    sel = got["selection"]
    assert sel["picked"] == expected_picks == min(n_samples or 99, len(picked))
    if pool_rows:
        assert sel["coverage_radius_before"] == pytest.approx(before.max(), abs=1e-5)
    else:
        assert sel["coverage_radius_before"] is None  # nothing to measure against: infinite
    assert sel["coverage_radius_after"] == pytest.approx(after.max(), abs=1e-5)
    assert sel["stop_distance"] == pytest.approx(after.max(), abs=1e-5)
    if min_distance:
        assert sel["stop_distance"] < min_distance <= sel["last_pick_distance"]
    assert got["seconds"] == {"embed": 2.5, "merge": 0.25}


def test_lists_and_selection_csv(tmp_path: Path) -> None:
    facts, _, out = _increment(tmp_path, pool_rows=6, n_samples=4)
    folder = out / "report"
    sampled = (folder / REPORT_FILES["sampled"]).read_text().splitlines()
    assert sampled == list(facts.picks["filenames"])  # pick order
    removed = (folder / REPORT_FILES["removed"]).read_text().splitlines()
    assert sorted(removed + sampled) == sorted(facts.candidates["filenames"])
    assert (folder / REPORT_FILES["duplicates"]).read_text() == "sub/copy.png\n"
    assert (folder / REPORT_FILES["corrupt"]).read_text() == "broken.jpg\n"
    assert json.loads((folder / REPORT_FILES["corrupt_reasons"]).read_text()) == CORRUPT
    assert json.loads((folder / REPORT_FILES["duplicate_reasons"]).read_text()) == DUPLICATES
    table = pd.read_csv(folder / REPORT_FILES["selection"])
    assert list(table.columns) == ["pick_rank", "filename", "distance_at_pick", "score_diversity"]
    assert list(table["pick_rank"]) == [1, 2, 3, 4]
    assert list(table["filename"]) == sampled
    assert np.all(np.diff(table["distance_at_pick"]) <= 1e-6)  # farthest first


def test_plot_data(tmp_path: Path) -> None:
    facts, _, out = _increment(tmp_path, pool_rows=6, n_samples=4)
    plots = {role: pd.read_csv(out / "plots" / name) for role, name in PLOT_FILES.items()}
    assert list(plots["picks"]["pick_rank"]) == [1, 2, 3, 4]
    fresh = len(facts.fresh)
    assert plots["nn"]["before"].sum() == plots["nn"]["after"].sum() == fresh
    labels = dict(zip(plots["labels"]["label"], plots["labels"]["rows"], strict=True))
    assert sum(labels.values()) == len(facts.after)
    assert labels == facts.after["labels"].value_counts().to_dict()
    assert len(plots["map_pool"]) == 6 and len(plots["map_picked"]) == 4
    assert len(plots["map_new"]) == fresh - 4


def test_neighbours_match_brute_force_and_sample_evenly() -> None:
    rng = np.random.default_rng(3)
    fresh, prior = rng.normal(size=(40, 6)), rng.normal(size=(30, 6))
    near = neighbours(fresh, prior, fresh[[5, 9]], limit=25)
    assert len(near.rows) == 25 and near.rows[0] == 0 and near.rows[-1] == 39
    queries = fresh[near.rows]
    np.testing.assert_allclose(near.before, _nn(queries, prior), rtol=1e-4)
    centres = np.concatenate([prior, fresh[[5, 9]]])
    np.testing.assert_allclose(near.after, _nn(queries, centres), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(queries - centres[near.after_index], axis=1), near.after, atol=1e-4
    )
    assert list(evaluated_rows(3, 5)) == [0, 1, 2]
    assert [evaluated_limit(r) for r in (0, 10_000, 100_000, 10**6)] == [20_000] * 2 + [
        2_000,
        1_000,
    ]


def test_report_html_is_self_contained(tmp_path: Path) -> None:
    facts, _, out = _increment(tmp_path, pool_rows=6, n_samples=4)
    page = (out / "report" / REPORT_FILES["html"]).read_text()
    # Nothing fetched: the only URL is SVG's namespace name, which is never loaded.
    assert set(re.findall(r"https?://[^\"' ]+", page)) <= {"http://www.w3.org/2000/svg"}
    assert page.count("<svg") == 4
    assert page.count('src="data:image/jpeg;base64,') == 4 + 2 * 6  # picks + redundant pairs
    for name in facts.picks["filenames"]:
        assert name in page
    assert "stopping_condition.n_samples" in page


def test_a_run_without_new_candidates_still_reports(tmp_path: Path) -> None:
    prior = _with_images(pool_table(5, 4, seed=0), tmp_path / "old", 100)
    cands = prior.iloc[:0].drop(columns=["pick_rank", "pick_distance"]).assign(batch_id="b2")
    picks = choose_increment(cands, prior, StoppingCondition(n_samples=3, min_distance=0.0)).picks
    facts = RunFacts(
        pool_dir=tmp_path / "pools" / "p",
        prior=prior,
        after=prior,
        candidates=cands,
        fresh=cands,
        picks=picks,
        next_distance=0.0,
        corrupt={},
        duplicates={},
        seconds={},
        settings={},
    )
    out = tmp_path / "work"
    numbers = write_run_report(
        facts, report_dir=out / "report", metrics_file=out / "metrics.json", plots_dir=out / "plots"
    )
    assert numbers["selection"]["picked"] == 0
    assert numbers["selection"]["coverage_radius_after"] == 0.0
    assert (out / "report" / REPORT_FILES["sampled"]).read_text() == ""
    assert "No candidate was left out" in (out / "report" / REPORT_FILES["html"]).read_text()


@pytest.mark.slow  # 12k images drawn, 1,000 picks: 20-45 s
def test_a_10k_candidate_run_makes_a_light_page(tmp_path: Path) -> None:
    prior = _with_images(pool_table(2_000, 64, seed=0), tmp_path / "old", 20_000)
    cands = _with_images(pool_table(10_000, 64, seed=7, batch="b2"), tmp_path / "inbox", 0)
    cands = cands.drop(columns=["pick_rank", "pick_distance"])
    choice = choose_increment(cands, prior, StoppingCondition(n_samples=1_000, min_distance=0.0))
    after = merge_increment(prior, cands, choice.picks, weak_labels=True)
    facts = RunFacts(
        pool_dir=tmp_path / "pool",
        prior=prior,
        after=after,
        candidates=cands,
        fresh=cands,
        picks=choice.picks,
        next_distance=choice.next_distance,
        corrupt={},
        duplicates={},
        seconds={},
        settings={},
    )
    out = tmp_path / "work"
    write_run_report(
        facts, report_dir=out / "report", metrics_file=out / "metrics.json", plots_dir=out / "plots"
    )
    page = out / "report" / REPORT_FILES["html"]
    assert page.stat().st_size < 3_000_000
    assert page.read_text().count("data:image/jpeg;base64,") == 240 + 2 * 12  # capped


def test_selection_csv_carries_every_strategy_score_after_the_distance() -> None:
    from datapool.metrics import selection_table

    picks = pd.DataFrame(
        {
            "filenames": ["a.png", "b.png"],
            "content_hash": ["h1", "h2"],
            "pick_rank": [1, 2],
            "pick_distance": [np.inf, 0.5],
            "score_typicality": [np.nan, 0.25],  # NaN: a pre-selected row
            "score_weights:uncertainty": [1.0, 0.5],
        }
    )
    table = selection_table(picks)
    assert list(table.columns) == [
        "pick_rank",
        "filename",
        "distance_at_pick",
        "score_diversity",
        "score_typicality",
        "score_weights:uncertainty",
    ]
    assert list(table["score_diversity"]) == [np.inf, 0.5]
    assert table["score_typicality"].iloc[1] == 0.25 and np.isnan(table["score_typicality"].iloc[0])
