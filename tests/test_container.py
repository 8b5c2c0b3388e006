"""The container's entrypoint, run on plain folders with the seed's arguments.

CI has no Docker engine, so the command the image runs (``python -m
datapool.container``) is tested directly: the three mounts are folders named by
DATAPOOL_INPUT_DIR / _SHARED_DIR / _OUTPUT_DIR.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from datapool.container import container_env, ensure_workspace, run_container
from datapool.errors import InputError
from datapool.pool import POOL_CSV, read_pool
from datapool.tools import head, run_tool, tool_env
from tests.conftest import foreign_dvc_project

ROOT = Path(__file__).resolve().parent.parent
SEED_ARGS = ["datapool.name=my_datapool", "stopping_condition.min_distance=0.1"]
FAST = ["embed.image_size=32", "embed.num_workers=0", "embed.bootstrap_epochs=0"]


def entrypoint(args: list[str], *, inbox: Path, shared: Path, out: Path) -> str:
    env = tool_env() | {
        "DATAPOOL_INPUT_DIR": str(inbox),
        "DATAPOOL_SHARED_DIR": str(shared),
        "DATAPOOL_OUTPUT_DIR": str(out),
    }
    result = subprocess.run(
        [sys.executable, "-m", "datapool.container", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_seed_invocation_grows_a_pool_in_the_shared_dir(tmp_path: Path, digits: Path) -> None:
    shared, out1, out2 = tmp_path / "shared", tmp_path / "out1", tmp_path / "out2"
    shared.mkdir()  # an empty mount becomes the workspace
    inbox = tmp_path / "inbox"
    shutil.copytree(digits / "batch_1", inbox)
    first = entrypoint([*SEED_ARGS, *FAST], inbox=inbox, shared=shared, out=out1)
    assert "pool my_datapool has" in first
    report = json.loads((out1 / "report.json").read_text())
    assert report["pool"] == "my_datapool" and report["rows_before"] == 0
    assert report["params"]["stopping_condition.min_distance"] == 0.1
    sampled = (out1 / "sampled_filenames.txt").read_text().splitlines()
    removed = (out1 / "removed_filenames.txt").read_text().splitlines()
    assert len(sampled) == report["rows_after"] > 0
    assert all((inbox / name).is_file() for name in sampled + removed)
    assert (out1 / POOL_CSV).read_bytes() == (shared / "pools/my_datapool" / POOL_CSV).read_bytes()
    assert json.loads((out1 / "corrupt.json").read_text()) == {}
    # The report opens from the output folder: self-contained, with the run's numbers.
    page = (out1 / "report.html").read_text()
    assert page.count("<svg") == 4 and "data:image/jpeg;base64," in page
    metrics = json.loads((out1 / "metrics.json").read_text())
    assert metrics["pool"]["rows_after"] == report["rows_after"]
    assert metrics["selection"]["picked"] == len(sampled)
    selection = (out1 / "selection.csv").read_text().splitlines()
    assert [line.split(",")[1] for line in selection[1:]] == sampled
    for name in ("duplicate_filenames.txt", "corrupt_filenames.txt", "corrupt_filenames.json"):
        assert (out1 / name).is_file(), name
    # Second week: a new inbox in the same mount point; the pool and history carry on.
    shutil.rmtree(inbox)
    shutil.copytree(digits / "batch_2", inbox)
    entrypoint(SEED_ARGS, inbox=inbox, shared=shared, out=out2)
    second = json.loads((out2 / "report.json").read_text())
    assert second["rows_before"] == report["rows_after"] < second["rows_after"]
    pool = read_pool(shared / "pools" / "my_datapool")
    assert pool is not None and len(pool) == second["rows_after"]
    log = run_tool(["git", "log", "--format=%s"], cwd=shared, quiet=True).splitlines()
    assert len(log) == 3 and log[0].startswith("pool my_datapool:")
    assert report["revision"] != second["revision"]


def test_a_non_empty_folder_is_not_made_a_workspace(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"not a datapool workspace: .*mount an empty folder"):
        ensure_workspace(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_foreign_dvc_project_is_refused_and_nothing_of_it_runs(tmp_path: Path) -> None:
    # Someone else's DVC project mounted by mistake: its pipeline must not run.
    shared, inbox = tmp_path / "shared", tmp_path / "inbox"
    inbox.mkdir()
    foreign_dvc_project(shared)
    params, rev = (shared / "params.yaml").read_bytes(), head(shared)
    with pytest.raises(InputError, match=r"not a datapool workspace: .* no \.datapool marker"):
        run_container([], input_dir=inbox, shared_dir=shared, output_dir=tmp_path / "out")
    assert not (shared / "PWNED").exists() and head(shared) == rev
    assert (shared / "params.yaml").read_bytes() == params


@pytest.mark.parametrize(
    "setting",
    ["stopping_condition.min_distance=3", "datapool.name=../../x", "embed.bogus=1"],
)
def test_bad_settings_are_refused_before_the_shared_folder_is_touched(
    tmp_path: Path, setting: str
) -> None:
    shared, inbox = tmp_path / "shared", tmp_path / "inbox"
    shared.mkdir()
    inbox.mkdir()
    with pytest.raises(InputError, match=setting.split("=")[0]):
        run_container([setting], input_dir=inbox, shared_dir=shared, output_dir=tmp_path / "o")
    assert list(shared.iterdir()) == []


def test_a_run_on_a_shared_folder_another_run_holds_is_refused_untouched(tmp_path: Path) -> None:
    # Two containers on one empty folder: the one that holds the folder's lock makes
    # the workspace; the other is refused before it creates or runs anything.
    shared, inbox = tmp_path / "shared", tmp_path / "inbox"
    shared.mkdir()
    inbox.mkdir()
    holder = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a running container holds
        with pytest.raises(InputError, match="another datapool run is in progress in"):
            run_container([], input_dir=inbox, shared_dir=shared, output_dir=tmp_path / "out")
    finally:
        os.close(holder)
    assert list(shared.iterdir()) == [] and not (tmp_path / "out").exists()


def test_a_missing_input_folder_is_reported(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist; mount one"):
        run_container(
            [], input_dir=tmp_path / "nope", shared_dir=tmp_path / "s", output_dir=tmp_path / "o"
        )
    assert not (tmp_path / "s").exists()


def test_dockerfile_runs_the_entrypoint_as_a_non_root_user() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["python", "-m", "datapool.container"]' in text
    assert "\nUSER datapool\n" in text
    assert "DVC_NO_ANALYTICS=1" in text and "safe.directory" in text


def test_container_env_makes_git_and_dvc_usable_under_any_uid(tmp_path: Path) -> None:
    env = container_env({"HOME": "/nonexistent/home", "PATH": "/usr/bin"})
    assert env["HOME"] == "/tmp" and env["PATH"] == "/usr/bin"
    assert env["DVC_NO_ANALYTICS"] == "1" and env["DVC_SITE_CACHE_DIR"]
    assert (env["GIT_CONFIG_KEY_0"], env["GIT_CONFIG_VALUE_0"]) == ("safe.directory", "*")
    assert container_env({"HOME": str(tmp_path)})["HOME"] == str(tmp_path)
