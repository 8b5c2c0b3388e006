"""Selection strategies through the real pipeline: params.yaml -> dvc repro -> pool, history.

One workspace (real git, real DVC, small PIL images in two sub-folders) picks with
diversity x typicality (diversity with a radius guard) behind a threshold on a score
CSV; the tests then probe what it recorded and what re-runs when an input changes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from dvc.repo import Repo

from datapool.cli import format_history
from datapool.errors import InputError
from datapool.revisions import history
from datapool.workspace import create_workspace, run_increment, run_tool, set_params, tool_env

from .conftest import draw_image

pytestmark = pytest.mark.slow

NAME = "strategic"
STRATEGIES = [
    {"strategy": "diversity", "strength": 1.0, "guard": 0.9},
    {"strategy": "typicality", "strength": 1.0, "k": 3},
    {"strategy": "threshold", "column": "sharp", "operation": ">=", "value": 0.5},
]


def reproduce(workspace: Path) -> list[str]:
    """Names of the stages `dvc repro` actually ran."""
    with contextlib.chdir(workspace), Repo(".") as repo:
        ran = repo.reproduce()
    return sorted(stage.name for stage in ran)


@dataclass(frozen=True)
class Run:
    ws: Path
    inbox: Path
    first_rev: str


def _scores(ws: Path, inbox: Path, sharp: Callable[[int], float]) -> None:
    names = sorted(p.relative_to(inbox).as_posix() for p in inbox.rglob("*.png"))
    table = pd.DataFrame({"filenames": names, "sharp": [sharp(i) for i in range(len(names))]})
    table.to_csv(ws / "scores.csv", index=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    monkey = pytest.MonkeyPatch()
    monkey.setenv("PATH", tool_env()["PATH"])  # stages run `python` from this venv
    monkey.setenv("DVC_NO_ANALYTICS", "1")
    root = tmp_path_factory.mktemp("strategies")
    inbox = root / "inbox"
    for i in range(16):
        draw_image(inbox / ("a" if i < 8 else "b") / f"img_{i:02d}.png", seed=100 + i)
    ws = root / "ws"
    create_workspace(ws)
    first_rev = run_tool(["git", "rev-parse", "HEAD"], cwd=ws, quiet=True).strip()
    _scores(ws, inbox, lambda i: i / 16)  # the last 8 (sub-folder b) pass sharp >= 0.5
    settings = {
        "input_dir": str(inbox),
        "datapool.name": NAME,
        "embed.image_size": 32,
        "embed.bootstrap_epochs": 0,
        "stopping_condition.n_samples": 4,
        "selection.strategies": STRATEGIES,
        "selection.scores_file": "scores.csv",
    }
    set_params(ws / "params.yaml", settings)
    run_increment(ws, name=NAME, input_dir="inbox")
    yield Run(ws, inbox, first_rev)
    monkey.undo()


def test_picks_respect_the_threshold_and_record_every_score(run: Run) -> None:
    work = run.ws / "work" / NAME
    selection = pd.read_csv(work / "report" / "selection.csv")
    assert len(selection) == 4
    assert all(name.startswith("b/") for name in selection["filename"])  # sharp >= 0.5
    assert {"score_diversity", "score_typicality"} <= set(selection.columns)
    assert selection["score_typicality"].between(0, 1).all()
    info = json.loads((work / "sample" / "selection.json").read_text())
    assert set(info["strategies"]) == {"diversity", "typicality", "threshold:sharp"}
    assert info["strategies"]["diversity"]["guard"] == 0.9  # parsed from params.yaml
    listed = json.loads((work / "select_inputs.json").read_text())
    assert set(listed["files"]) == {"scores_file"}


def test_history_and_params_diff_show_the_strategies(run: Run) -> None:
    (revision,) = history(run.ws, NAME)
    assert revision.strategies == (
        "diversity(guard=0.9)^1, typicality(k=3)^1, threshold(sharp >= 0.5)"
    )
    assert "typicality(k=3)^1" in "\n".join(format_history([revision]))
    shown = run_tool(
        ["dvc", "params", "diff", run.first_rev, "HEAD", "--json"], cwd=run.ws, quiet=True
    )
    changed = json.loads(shown)["params.yaml"]
    # DVC shows a list value as its text
    # the template's default: herding
    assert "'strategy': 'herding'" in changed["selection.strategies"]["old"]
    assert "'typicality', 'strength': 1.0, 'k': 3" in changed["selection.strategies"]["new"]


def test_a_changed_score_file_re_runs_sample_and_nothing_else(run: Run) -> None:
    assert "sample" not in reproduce(run.ws)  # nothing changed: only the listings ran
    _scores(run.ws, run.inbox, lambda i: 1 - i / 16)  # now sub-folder a passes
    ran = reproduce(run.ws)
    assert "sample" in ran and "embed" not in ran
    selection = pd.read_csv(run.ws / "work" / NAME / "report" / "selection.csv")
    assert all(name.startswith("a/") for name in selection["filename"])


def test_similarity_embeds_the_query_folder_with_the_pools_model(
    run: Run, capfd: pytest.CaptureFixture[str]
) -> None:
    queries = run.ws / "queries"
    queries.mkdir()
    _scores(run.ws, run.inbox, lambda i: 1 - i / 16)  # sub-folder a passes the threshold
    similar = [*STRATEGIES, {"strategy": "similarity", "strength": 10.0}]
    set_params(
        run.ws / "params.yaml", {"selection.strategies": similar, "selection.query_dir": "queries"}
    )
    with pytest.raises(InputError, match="dvc repro"):
        run_increment(run.ws, name=NAME, input_dir="inbox")
    assert "selection.query_dir: queries holds no images" in capfd.readouterr().err
    # a query image with the bytes of a/img_01.png: embedded alike, so it is picked first
    draw_image(queries / "q.png", seed=101)
    ran = reproduce(run.ws)
    assert "sample" in ran and "embed" not in ran
    selection = pd.read_csv(run.ws / "work" / NAME / "report" / "selection.csv")
    assert selection["filename"].iloc[0] == "a/img_01.png"
    assert selection["score_similarity"].iloc[0] == pytest.approx(1.0)


def test_a_missing_score_file_stops_the_run_and_leaves_the_pool(
    run: Run, capfd: pytest.CaptureFixture[str]
) -> None:
    pool = run.ws / "pools" / NAME
    before = sorted((p.relative_to(pool), p.stat().st_mtime_ns) for p in pool.rglob("*"))
    set_params(run.ws / "params.yaml", {"selection.scores_file": "absent.csv"})
    with pytest.raises(InputError, match="dvc repro"):
        run_increment(run.ws, name=NAME, input_dir="inbox")
    assert "selection.scores_file: the file absent.csv does not exist" in capfd.readouterr().err
    assert sorted((p.relative_to(pool), p.stat().st_mtime_ns) for p in pool.rglob("*")) == before
