"""What a workspace is, and the checks `datapool` makes before it touches one.

Real git and DVC repositories (``datapool init``); the CLI runs in-process through
Typer's runner. Apart from the one slow test of a run that fails after merge, none
of these tests reaches a stage: each case is refused first, or is a command without
a pipeline run (import, combine, restore of a parked pool) whose commit must leave
the user's own files alone.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from datapool.cli import app
from datapool.errors import InputError
from datapool.exchange import export_pool
from datapool.layout import LOCK, PoolPaths, pool_dir
from datapool.pool import read_pool
from datapool.revisions import lock_pool, parked_paths
from datapool.settings import load_params
from datapool.tools import head, run_tool
from datapool.workspace import (
    MARKER,
    check_workspace,
    create_workspace,
    git_commit,
    workspace_lock,
)
from tests.conftest import draw_image, foreign_dvc_project
from tests.test_combine import make_pool

RUNNER = CliRunner()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh workspace, made once; tests work on copies of it."""
    ws = tmp_path_factory.mktemp("made") / "ws"
    create_workspace(ws)
    return ws


@pytest.fixture
def ws(made: Path, tmp_path: Path) -> Iterator[Path]:
    copy = tmp_path / "ws"
    shutil.copytree(made, copy, symlinks=True)
    yield copy


def cli(*args: str) -> Result:
    return RUNNER.invoke(app, list(args))


def refused(result: Result, message: str) -> None:
    """Exit 1 with ``message`` on the output, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_init_marks_the_workspace_and_commits_the_marker(ws: Path) -> None:
    assert (ws / MARKER).is_file()
    tracked = run_tool(["git", "ls-files"], cwd=ws, quiet=True).split()
    assert MARKER in tracked
    check_workspace(ws)


def test_this_checkout_is_a_workspace() -> None:
    # The README offers the source checkout itself as a workspace.
    check_workspace(Path(__file__).resolve().parent.parent)


@pytest.mark.parametrize(
    "command",
    [
        ["run"],
        ["run", "--input-dir", "."],
        ["history", "A"],
        ["restore", "A", "HEAD"],
        ["combine", "A", "B", "--into", "C"],
        ["export", "A", "--out", "out"],
        ["import", "x.csv", "--name", "C"],
        ["push"],
        ["pull"],
    ],
)
def test_outside_a_workspace_every_command_says_so(tmp_path: Path, command: list[str]) -> None:
    result = cli(*command, "--workspace", str(tmp_path))
    refused(result, f"not a datapool workspace: {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_dvc_project_is_not_a_workspace(tmp_path: Path) -> None:
    foreign_dvc_project(tmp_path)
    with pytest.raises(InputError, match=r"not a datapool workspace: .* no \.datapool marker"):
        check_workspace(tmp_path)
    refused(cli("run", "--workspace", str(tmp_path)), "not a datapool workspace")
    assert not (tmp_path / "PWNED").exists()


def test_a_workspace_made_before_the_marker_is_still_one(ws: Path) -> None:
    # Older `datapool init` wrote no marker; its first commit says what made it.
    (ws / MARKER).unlink()
    git_commit(ws, "drop the marker", paths=[MARKER])
    check_workspace(ws)


def test_a_workspace_missing_its_pipeline_is_not_one(ws: Path) -> None:
    (ws / "dvc.yaml").unlink()
    with pytest.raises(InputError, match=r"not a datapool workspace: .*lacks dvc.yaml"):
        check_workspace(ws)


def test_a_workspace_with_the_stages_of_an_older_datapool_is_still_one(ws: Path) -> None:
    (ws / "stages" / "inbox.py").unlink(missing_ok=True)  # added to the template later
    git_commit(ws, "the pipeline of an older datapool", paths=["stages/inbox.py"])
    check_workspace(ws)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("stopping_condition.min_distance=2.5", "min_distance must be a number in [0, 2]"),
        ("stopping_condition.n_samples=-1", "n_samples must be a whole number >= 0"),
        ("datapool.name=x$(touch PWNED)", "is not a usable pool name"),
        ("embed.device=gpu", "embed.device must be auto or a torch device"),
        ("stopping_condition.n_sample=3", "unknown setting"),
    ],
)
def test_a_bad_setting_is_refused_before_anything_runs(
    ws: Path, tmp_path: Path, setting: str, message: str
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    params, rev = (ws / "params.yaml").read_bytes(), head(ws)
    result = cli("run", "--input-dir", str(inbox), setting, "--workspace", str(ws))
    refused(result, message)
    assert (ws / "params.yaml").read_bytes() == params
    assert head(ws) == rev and not (ws / "work").exists() and not (ws / "dvc.lock").exists()
    assert not list(ws.rglob("PWNED"))


def test_a_bad_params_file_is_refused_before_anything_runs(ws: Path, tmp_path: Path) -> None:
    text = (ws / "params.yaml").read_text().replace("n_samples: 30", "n_samples: 0")
    (ws / "params.yaml").write_text(text)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    result = cli("run", "--input-dir", str(inbox), "--workspace", str(ws))
    refused(result, "with neither, selection would never stop")
    assert (ws / "params.yaml").read_text() == text and not (ws / "work").exists()


def test_a_missing_input_folder_is_refused_before_anything_runs(ws: Path, tmp_path: Path) -> None:
    params = (ws / "params.yaml").read_bytes()
    result = cli("run", "--input-dir", str(tmp_path / "nope"), "--workspace", str(ws))
    refused(result, f"input_dir {tmp_path / 'nope'} is not a folder")
    assert (ws / "params.yaml").read_bytes() == params and not (ws / "work").exists()


def test_an_input_folder_with_a_quote_is_refused(ws: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "it's here"
    inbox.mkdir()
    params = (ws / "params.yaml").read_bytes()
    result = cli("run", "--input-dir", str(inbox), "--workspace", str(ws))
    refused(result, "the pipeline's shell commands cannot carry")
    assert (ws / "params.yaml").read_bytes() == params


@pytest.mark.parametrize(
    "command", [["run", "--input-dir", "."], ["restore", "A", "HEAD"], ["pull"]]
)
def test_a_second_run_is_refused_while_another_holds_the_workspace(
    ws: Path, command: list[str]
) -> None:
    params, rev = (ws / "params.yaml").read_bytes(), head(ws)
    with workspace_lock(ws):
        result = cli(*command, "--workspace", str(ws))
    refused(result, "another datapool command is in progress in")
    assert (ws / "params.yaml").read_bytes() == params and head(ws) == rev
    with workspace_lock(ws):  # released: the next one gets it
        pass


@pytest.mark.parametrize(
    "command",
    [
        ["history", "../x"],
        ["export", "a/../../x", "--out", "out"],
        ["import", "x.csv", "--name", "../x"],
        ["combine", "A", "B", "--into", ".hidden"],
        ["restore", "../a", "HEAD"],
        # New names get the strict rule.
        ["import", "x.csv", "--name", "my pool"],
        ["combine", "A", "B", "--into", "données"],
    ],
)
def test_pool_names_are_checked_where_they_enter(ws: Path, command: list[str]) -> None:
    result = cli(*command, "--workspace", str(ws))
    refused(result, "is not a usable pool name")


def test_pools_named_before_the_strict_rule_can_still_be_read_and_restored(
    parked: Path, tmp_path: Path
) -> None:
    # import and combine once took any name without '/' or a leading '.'.
    ws, name = parked, "my pool"
    first = revision(ws, "first")  # "my pool": 2 rows there, 1 now
    listed = cli("history", name, "--workspace", str(ws))
    assert listed.exit_code == 0 and first[:7] in listed.output, listed.output
    exported = cli("export", name, "--out", str(tmp_path / "out"), "--workspace", str(ws))
    assert exported.exit_code == 0 and "1 rows of pool my pool" in exported.output, exported.output
    restored = cli("restore", name, first, "--workspace", str(ws))
    assert restored.exit_code == 0, restored.output
    assert "(2 rows)" in restored.output


@pytest.mark.parametrize(
    ("edit", "setting"),
    [
        # What ruamel writes for 0.00001, and what a user may write by hand.
        ("learning_rate: 0.001", "embed.learning_rate=0.00001"),
        ("learning_rate: 1e-4", "stopping_condition.n_samples=5"),
    ],
)
def test_settings_in_exponent_form_are_numbers(
    ws: Path, tmp_path: Path, edit: str, setting: str
) -> None:
    # Read as YAML 1.2, as DVC reads them; PyYAML would see the text '1e-05'.
    params = ws / "params.yaml"
    params.write_text(params.read_text().replace("learning_rate: 0.001", edit))
    before = params.read_bytes()
    result = cli("run", "--input-dir", str(tmp_path / "nope"), setting, "--workspace", str(ws))
    # Past every setting check: the next one refuses the missing folder.
    refused(result, f"input_dir {tmp_path / 'nope'} is not a folder")
    assert params.read_bytes() == before


def test_demo_checks_its_settings_and_puts_params_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # demo goes the way of `datapool run`: a missing example folder is refused
    # before the pipeline runs, and params.yaml stays as `datapool init` wrote it.
    import datapool.cli

    monkeypatch.setattr(datapool.cli, "EXAMPLE_DIR", tmp_path / "no-examples")
    where = tmp_path / "demo"
    result = cli("demo", "--workspace", str(where))
    refused(result, f"input_dir {tmp_path / 'no-examples' / 'batch_1'} is not a folder")
    template = (Path(datapool.cli.__file__).parent / "pipeline" / "params.yaml").read_bytes()
    assert (where / "params.yaml").read_bytes() == template
    assert not (where / "work").exists() and not (where / "dvc.lock").exists()


@pytest.mark.slow
def test_a_run_that_fails_after_merge_keeps_the_settings_dvc_lock_records(
    ws: Path, digits: Path
) -> None:
    # A stage after merge fails, as a Ctrl-C landing after merge wrote dvc.lock would:
    # dvc.lock records the pool made with n_samples=7, so params.yaml must say so too.
    dvc_yaml = ws / "dvc.yaml"
    after_merge = "\n  after_merge:\n    cmd: exit 3\n    deps:\n      - pools/${datapool.name}\n"
    text = dvc_yaml.read_text()
    end = min((text.find(f"\n{k}:") for k in ("metrics", "plots") if f"\n{k}:" in text), default=-1)
    # the stage goes at the end of `stages:`, before the top-level metrics/plots sections
    dvc_yaml.write_text(text + after_merge if end < 0 else text[:end] + after_merge + text[end:])
    git_commit(ws, "a stage after merge", paths=["dvc.yaml"])
    fast = ["embed.image_size=32", "embed.num_workers=0", "embed.bootstrap_epochs=0"]
    result = cli(
        "run", "--input-dir", str(digits / "batch_1"), *fast, "stopping_condition.n_samples=7",
        "--workspace", str(ws),
    )  # fmt: skip
    refused(result, "dvc repro` failed")
    assert lock_pool((ws / LOCK).read_text()) is not None
    pool = read_pool(pool_dir(ws, "my_datapool"))
    assert pool is not None and len(pool) == 7
    params = load_params((ws / "params.yaml").read_text())
    assert params["stopping_condition"]["n_samples"] == 7
    assert params["embed"]["image_size"] == 32


def test_an_older_unquoted_pipeline_gets_only_plain_input_folders(ws: Path, tmp_path: Path) -> None:
    # Workspaces made before dvc.yaml quoted its values keep their own dvc.yaml.
    dvc_yaml = ws / "dvc.yaml"
    dvc_yaml.write_text(re.sub(r"'(\S*\$\{[^}]+\}\S*)'", r"\1", dvc_yaml.read_text()))
    git_commit(ws, "an older pipeline", paths=["dvc.yaml"])
    inbox = tmp_path / "x$(touch PWNED)"
    inbox.mkdir()
    params = (ws / "params.yaml").read_bytes()
    result = cli("run", "--input-dir", str(inbox), "--workspace", str(ws))
    refused(result, "passes values unquoted; copy dvc.yaml from a new `datapool init`")
    assert (ws / "params.yaml").read_bytes() == params and not list(tmp_path.rglob("PWNED"))


# --- what the commands commit -----------------------------------------------------------------


def test_init_commits_every_file_of_the_workspace(ws: Path) -> None:
    # init names its files one by one; none may be left out of the first commit.
    assert run_tool(["git", "status", "--porcelain"], cwd=ws, quiet=True) == ""
    tracked = set(run_tool(["git", "ls-files"], cwd=ws, quiet=True).split())
    assert {"dvc.yaml", "params.yaml", ".datapool", ".gitignore", ".dvc/config"} <= tracked


def leave_user_changes(ws: Path) -> list[str]:
    """A stray file, an edited tracked file and a change the user staged; their status."""
    (ws / "notes.txt").write_text("ideas for the next batch\n")
    draw_image(ws / "scratch.png", seed=7)
    with (ws / ".dvcignore").open("a") as ignore:
        ignore.write("# the user's comment\n")
    (ws / "todo.txt").write_text("label the new images\n")
    run_tool(["git", "add", "todo.txt"], cwd=ws, quiet=True)
    return [" M .dvcignore", "?? notes.txt", "?? scratch.png", "A  todo.txt"]


def committed(ws: Path) -> list[str]:
    """``STATUS\\tPATH`` of every file HEAD changed."""
    show = ["git", "show", "--format=", "--name-status", "--no-renames", "HEAD"]
    text = run_tool(show, cwd=ws, quiet=True)
    return sorted(line for line in text.splitlines() if line)


def user_changes(ws: Path) -> list[str]:
    return sorted(run_tool(["git", "status", "--porcelain"], cwd=ws, quiet=True).splitlines())


def test_import_commits_the_new_pools_record_only(ws: Path, tmp_path: Path) -> None:
    exported = export_pool(make_pool(tmp_path, "a", [1, 2, 3]), tmp_path / "out")
    left = leave_user_changes(ws)
    result = cli("import", str(exported.csv), "--name", "X", "--workspace", str(ws))
    assert result.exit_code == 0, result.output
    assert committed(ws) == ["A\tpools/.gitignore", "A\tpools/X.dvc"]
    assert user_changes(ws) == left


# Parked pools in two committed revisions, tagged: ``first`` and ``second``.
PARKED = {
    "first": {"P": [1, 2], "Q": [2, 3], "my pool": [1, 2]},
    "second": {"P": [3], "my pool": [3]},
}


@pytest.fixture(scope="module")
def made_parked(made: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`made` with the pools of :data:`PARKED` parked and committed, made once.

    Each revision parks its pools with one `dvc add` of all their folders (what
    :func:`~datapool.revisions.park` runs for one), ~1 s where a park per pool took
    ~1 s each; three tests start from it. "my pool" is a name from before the strict rule.
    """
    root = tmp_path_factory.mktemp("parked")
    ws = root / "ws"
    shutil.copytree(made, ws, symlinks=True)
    for tag, pools in PARKED.items():
        for name, seeds in pools.items():
            shutil.rmtree(pool_dir(ws, name), ignore_errors=True)
            pool_dir(ws, name).parent.mkdir(exist_ok=True)
            shutil.move(make_pool(root / tag, name, seeds), pool_dir(ws, name))
        run_tool(["dvc", "add", *(PoolPaths(n).folder for n in pools)], cwd=ws, quiet=True)
        git_commit(ws, tag, paths=[path for name in pools for path in parked_paths(name)])
        run_tool(["git", "tag", tag], cwd=ws, quiet=True)
    return ws


def revision(ws: Path, tag: str) -> str:
    """The commit id ``tag`` names (the commands are given ids, as a user copies them)."""
    return run_tool(["git", "rev-parse", tag], cwd=ws, quiet=True).strip()


@pytest.fixture
def parked(made_parked: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of :func:`made_parked`: the workspace at revision ``second``."""
    shutil.copytree(made_parked, tmp_path / "ws", symlinks=True)
    yield tmp_path / "ws"


def test_combine_commits_the_new_pools_record_only(parked: Path) -> None:
    ws = parked
    left = leave_user_changes(ws)
    result = cli("combine", "P", "Q", "--into", "R", "--workspace", str(ws))
    assert result.exit_code == 0, result.output
    assert committed(ws) == ["A\tpools/R.dvc", "M\tpools/.gitignore"]
    assert user_changes(ws) == left


def test_restoring_a_parked_version_commits_its_record_only(parked: Path) -> None:
    ws = parked
    left = leave_user_changes(ws)
    result = cli("restore", "P", revision(ws, "first"), "--workspace", str(ws))
    assert result.exit_code == 0, result.output
    assert committed(ws) == ["M\tpools/P.dvc"]
    assert user_changes(ws) == left
