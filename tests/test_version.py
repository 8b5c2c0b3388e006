"""The version transaction: exact commits, rollback on failure, recovery after SIGKILL.

Real git and DVC in small workspaces made by ``datapool init``, whose pipeline is
replaced by one tiny ``merge`` stage (``FAKE_MERGE``: a pool of the inbox's
files with made-up embeddings, written by :func:`datapool.transaction.save_pool`),
so a whole ``datapool run`` takes a couple of seconds. Crashes are real: the
command runs in a subprocess and kills itself with SIGKILL at a named step
(``DATAPOOL_TEST_CRASH_AT``, see :func:`datapool.version.crash_point`), or a
pipeline stage kills it mid-``dvc repro``; the next command must say what it
found and leave the workspace at the previous version or the new one.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from datapool.cli import app
from datapool.exchange import export_pool
from datapool.layout import PoolPaths, pool_dir
from datapool.revisions import current_record, history, park, parked_paths, record_at
from datapool.store import row_count
from datapool.tools import git_commit, head, run_tool, tool_env
from datapool.version import CRASH_AT, JOURNAL, read_journal
from datapool.workspace import create_workspace
from tests.conftest import draw_image
from tests.test_combine import make_pool

PIPELINE = """stages:
  merge:
    cmd: python stages/merge.py '${input_dir}' '${datapool.name}' '${stopping_condition.n_samples}'
    deps:
    - stages/merge.py
    - '${input_dir}'
    params:
    - stopping_condition.n_samples
    outs:
    - pools/${datapool.name}:
        persist: true
"""
RUNNER = CliRunner()
FAKE_MERGE = """import hashlib, sys
from pathlib import Path

import numpy as np
import pandas as pd

from datapool.pool import read_pool
from datapool.transaction import save_pool

inbox, name, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
folder = Path("pools") / name
pool = read_pool(folder) if folder.is_dir() else None
known = set() if pool is None else set(pool["content_hash"])
files = [f for f in sorted(inbox.iterdir())[:n]]
hashes = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
new = [(f, h) for f, h in zip(files, hashes) if h not in known]
vectors = np.random.default_rng(len(known)).normal(size=(len(new), 4)).astype(np.float32)
vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
rows = pd.DataFrame(vectors, columns=[f"embedding_{i}" for i in range(4)])
rows.insert(0, "filenames", [f.name for f, _ in new])
rows["labels"] = ""
rows["content_hash"] = [h for _, h in new]
rows["batch_id"] = inbox.name
rows["model_id"] = "m"
rows["source"] = str(inbox)
rows["pick_rank"] = range(1, len(new) + 1)
rows["pick_distance"] = 1.0
table = rows if pool is None else pd.concat([pool, rows], ignore_index=True)
save_pool(folder, table, checkpoint=None, sources={h: f for f, h in new})
"""
# A stage merge waits for that kills the `datapool run` holding the workspace
# lock (its pid is in the lock file), then fails: datapool killed mid-repro.
KILL = (
    'python -c "import os, signal; '
    "os.kill(int(open('.dvc/tmp/datapool.lock').read()), signal.SIGKILL)\"; exit 1"
)
KILLING_PIPELINE = (
    PIPELINE.replace("    - stages/merge.py\n", "    - stages/merge.py\n    - gate\n")
    + f"  kill:\n    cmd: {KILL}\n    outs:\n    - gate\n"
)
FAILING_PIPELINE = PIPELINE.replace("cmd: python stages/merge.py", "cmd: exit 1 #")


def tiny_workspace(root: Path) -> Path:
    """``root/ws``: a workspace with the tiny pipeline (its fake merge writes a real pool
    through save_pool), committed, and inboxes ``root/in1`` (3 images), ``root/in2`` (2)."""
    ws = root / "ws"
    create_workspace(ws)
    (ws / "dvc.yaml").write_text(PIPELINE)
    (ws / "stages" / "merge.py").write_text(FAKE_MERGE)
    git_commit(ws, "the tiny pipeline", paths=["dvc.yaml", "stages/merge.py"])
    for name, seeds in (("in1", [1, 2, 3]), ("in2", [4, 5])):
        for seed in seeds:
            draw_image(root / name / f"img_{seed}.png", seed=seed)
    return ws


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with the tiny pipeline and two inboxes beside it, made once."""
    root = tmp_path_factory.mktemp("made")
    tiny_workspace(root)
    return root


@pytest.fixture
def ws(made: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of the made workspace (inboxes at ``ws.parent / in1``, ``in2``)."""
    shutil.copytree(made, tmp_path / "root", symlinks=True)
    yield tmp_path / "root" / "ws"


@pytest.fixture(scope="module")
def made_parked(made: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`made` with two parked pools committed (:func:`two_parked_pools`: two
    `dvc add`, ~2 s), made once for the tests that start from them."""
    root = tmp_path_factory.mktemp("parked")
    shutil.copytree(made, root / "root", symlinks=True)
    two_parked_pools(root / "root" / "ws", root)
    return root / "root"


@pytest.fixture
def parked(made_parked: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of :func:`made_parked`'s workspace: pools P (2 rows) and Q (2) parked."""
    shutil.copytree(made_parked, tmp_path / "root", symlinks=True)
    yield tmp_path / "root" / "ws"


def killed(ws: Path, *args: str, crash_at: str | None = None) -> None:
    """``python -m datapool ARGS --workspace WS`` in a subprocess that must die by SIGKILL:
    at ``crash_at`` (:data:`CRASH_AT`), or by a pipeline stage."""
    env = tool_env()
    env.pop(CRASH_AT, None)
    if crash_at is not None:
        env[CRASH_AT] = crash_at
    result = subprocess.run(
        [sys.executable, "-m", "datapool", *args, "--workspace", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, result.stdout + result.stderr


def cli(ws: Path, *args: str, code: int = 0) -> str:
    """``datapool ARGS --workspace WS`` in this process; asserts the exit status and
    returns what it wrote (stdout and stderr)."""
    result = RUNNER.invoke(app, [*args, "--workspace", str(ws)])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return result.output


def run_args(ws: Path, inbox: str, *settings: str) -> list[str]:
    return ["run", "--input-dir", str(ws.parent / inbox), *settings]


def state(ws: Path) -> dict[str, bytes | None]:
    """Every file a version may consist of (and the pool folders' file lists)."""
    files = ["dvc.lock", "params.yaml", "pools/.gitignore"]
    files += sorted(f"pools/{p.name}" for p in (ws / "pools").glob("*.dvc"))
    found: dict[str, bytes | None] = {
        f: (ws / f).read_bytes() if (ws / f).is_file() else None for f in files
    }
    for folder in sorted((ws / "pools").glob("*")) if (ws / "pools").is_dir() else []:
        if folder.is_dir():
            listing = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
            found[f"{folder.name}/"] = "\n".join(listing).encode()
    return found


def subject(ws: Path) -> str:
    return run_tool(["git", "log", "-1", "--format=%s"], cwd=ws, quiet=True).strip()


def committed(ws: Path) -> list[str]:
    """``STATUS<tab>PATH`` of every file HEAD changed."""
    show = ["git", "show", "--format=", "--name-status", "--no-renames", "HEAD"]
    return sorted(run_tool(show, cwd=ws, quiet=True).splitlines())


def status(ws: Path) -> list[str]:
    return sorted(run_tool(["git", "status", "--porcelain"], cwd=ws, quiet=True).splitlines())


def exported_csv(ws: Path, tmp_path: Path) -> Path:
    return export_pool(make_pool(tmp_path, "src", [7, 8, 9]), tmp_path / "export").csv


def two_parked_pools(ws: Path, tmp_path: Path) -> None:
    """Pools P (images 1, 2) and Q (2, 3) parked and committed, by one `dvc add` of both
    folders (what :func:`~datapool.revisions.park` runs for one; a second costs ~1 s)."""
    for name, seeds in (("P", [1, 2]), ("Q", [2, 3])):
        shutil.move(make_pool(tmp_path / name, name, seeds), pool_dir(ws, name))
    run_tool(["dvc", "add", PoolPaths("P").folder, PoolPaths("Q").folder], cwd=ws, quiet=True)
    git_commit(ws, "two pools", paths=[*parked_paths("P"), *parked_paths("Q")])


# --- what a transaction commits ---------------------------------------------------------------


def test_a_run_commits_exactly_the_version_and_clears_its_journal(ws: Path) -> None:
    (ws / "notes.txt").write_text("a stray file of the user's\n")
    (ws / "todo.txt").write_text("staged by the user for their own commit\n")
    run_tool(["git", "add", "todo.txt"], cwd=ws, quiet=True)
    out = cli(ws, *run_args(ws, "in1", "datapool.name=A", "stopping_condition.n_samples=2"))
    assert "pool A: 2 rows (+2) after adding from" in out
    assert committed(ws) == ["A\tdvc.lock", "A\tpools/.gitignore", "M\tparams.yaml"]
    assert status(ws) == ["?? notes.txt", "A  todo.txt"]
    assert not (ws / JOURNAL).exists()
    revisions = history(ws, "A")  # read through DVC's API, from the shard layout
    assert [(r.rows, r.added) for r in revisions] == [(2, 2)]


def test_import_then_history_reads_the_new_layout_through_dvc(ws: Path, tmp_path: Path) -> None:
    cli(ws, "import", str(exported_csv(ws, tmp_path)), "--name", "X")
    assert committed(ws) == ["A\tpools/.gitignore", "A\tpools/X.dvc"]
    assert subject(ws) == "pool X: 3 rows imported from embeddings.csv (0 duplicates)"
    assert [(r.rows, r.added, r.removed) for r in history(ws, "X")] == [(3, 3, 0)]


# --- a failing step rolls back, every command ------------------------------------------------


def test_a_run_whose_merge_fails_puts_every_file_back(parked: Path) -> None:
    ws = parked
    # Adopting P drops its record; then the merge stage fails for real (exit 1).
    (ws / "dvc.yaml").write_text(FAILING_PIPELINE)
    git_commit(ws, "a failing merge", paths=["dvc.yaml"])
    before, rev = state(ws), head(ws)
    out = cli(ws, *run_args(ws, "in2", "datapool.name=P"), code=1)
    assert "dvc repro" in out
    assert state(ws) == before and head(ws) == rev and status(ws) == []
    assert not (ws / JOURNAL).exists()


def test_restore_combine_import_that_fail_put_every_file_back(parked: Path, tmp_path: Path) -> None:
    ws = parked
    first = head(ws)
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text().replace("my_datapool", "P"))
    git_commit(ws, "P is the pipeline's pool now", paths=["params.yaml"])
    before, rev = state(ws), head(ws)
    failures = [
        (["restore", "P", first], "is now the pipeline's pool"),
        (["combine", "P", "nope", "--into", "R"], "nope"),
        (["import", str(tmp_path / "no.csv"), "--name", "Y"], "no.csv"),
    ]
    for args, message in failures:
        assert message in cli(ws, *args, code=1)
        assert state(ws) == before and head(ws) == rev and not (ws / JOURNAL).exists()


@pytest.mark.slow
def test_a_stage_failing_after_merge_keeps_and_commits_the_version(ws: Path) -> None:
    after = "  after:\n    cmd: exit 3\n    deps:\n    - pools/${datapool.name}\n"
    (ws / "dvc.yaml").write_text(PIPELINE + after)
    args = run_args(ws, "in1", "datapool.name=A", "stopping_condition.n_samples=2")
    assert "dvc repro" in cli(ws, *args, code=1)
    assert subject(ws).startswith("pool A: grown from")  # dvc.lock records merge: kept
    assert current_record(ws, "A") == record_at(ws, "HEAD", "A") is not None
    assert not (ws / JOURNAL).exists()


# --- a crash, then the next command ----------------------------------------------------------


def test_a_run_killed_after_repro_is_finished_by_the_next_command(ws: Path) -> None:
    rev = head(ws)
    args = run_args(ws, "in1", "datapool.name=A", "stopping_condition.n_samples=2")
    killed(ws, *args, crash_at="after-repro")
    journal = read_journal(ws)
    assert journal is not None and journal.command == "run" and journal.pool == "A"
    assert head(ws) == rev  # recorded by dvc.lock, not committed
    out = cli(ws, "recover")
    assert f"finished the interrupted `run` of pool A: revision {head(ws)[:7]}" in out
    assert subject(ws) == f"pool A: grown from {ws.parent / 'in1'} (finished after an interruption)"
    assert committed(ws) == ["A\tdvc.lock", "A\tpools/.gitignore", "M\tparams.yaml"]
    assert not (ws / JOURNAL).exists() and status(ws) == []


def test_a_run_killed_mid_repro_before_merge_is_rolled_back_byte_for_byte(
    parked: Path,
) -> None:
    ws = parked
    (ws / "dvc.yaml").write_text(KILLING_PIPELINE)
    git_commit(ws, "a stage that kills datapool", paths=["dvc.yaml"])
    before, rev = state(ws), head(ws)
    killed(ws, *run_args(ws, "in2", "datapool.name=P"))  # params edited, P adopted, killed
    assert state(ws) != before and read_journal(ws) is not None
    # The next command of any kind recovers first, then goes on (and fails here).
    out = cli(ws, "import", str(ws / "missing.csv"), "--name", "Y", code=1)
    said = "rolled back the interrupted `run` of pool P: the workspace is at its previous version"
    assert f"{said} ({rev[:7]})" in out
    assert state(ws) == before and head(ws) == rev and status(ws) == []


@pytest.mark.parametrize("step", ["done", pytest.param("begun", marks=pytest.mark.slow)])
def test_an_import_killed_before_its_record_is_complete_is_rolled_back(
    ws: Path, tmp_path: Path, step: str
) -> None:
    csv = exported_csv(ws, tmp_path)
    before, rev = state(ws), head(ws)
    killed(ws, "import", str(csv), "--name", "X", crash_at=step)
    assert "rolled back the interrupted `import` of pool X" in cli(ws, "recover")
    assert state(ws) == before and head(ws) == rev and not pool_dir(ws, "X").exists()
    cli(ws, "import", str(csv), "--name", "X")  # the name is free again


@pytest.mark.parametrize(
    ("step", "said"),
    [("recorded", "finished"), pytest.param("committed", "was already", marks=pytest.mark.slow)],
)
def test_an_import_killed_after_its_record_is_complete_is_kept(
    ws: Path, tmp_path: Path, step: str, said: str
) -> None:
    killed(ws, "import", str(exported_csv(ws, tmp_path)), "--name", "X", crash_at=step)
    out = cli(ws, "recover")
    assert said in out and "`import` of pool X" in out
    assert subject(ws) == "pool X: 3 rows imported from embeddings.csv (0 duplicates)"
    assert committed(ws) == ["A\tpools/.gitignore", "A\tpools/X.dvc"]
    assert not (ws / JOURNAL).exists() and status(ws) == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["restore", "combine"])
def test_restore_and_combine_write_a_journal_and_roll_back_after_a_kill(
    parked: Path, tmp_path: Path, command: str
) -> None:
    ws = parked
    first = head(ws)
    shutil.rmtree(pool_dir(ws, "P"))
    shutil.move(make_pool(tmp_path / "P2", "P", [5]), pool_dir(ws, "P"))
    park(ws, "P")
    git_commit(ws, "P again", paths=parked_paths("P"))
    before, rev = state(ws), head(ws)
    args = ["restore", "P", first] if command == "restore" else ["combine", "P", "Q", "--into", "R"]
    killed(ws, *args, crash_at="done")
    journal = read_journal(ws)
    assert journal is not None and journal.command == command
    assert f"rolled back the interrupted `{command}`" in cli(ws, "recover")
    assert state(ws) == before and head(ws) == rev and status(ws) == []


def test_a_journal_that_cannot_be_read_is_refused_with_its_name(ws: Path) -> None:
    (ws / JOURNAL).parent.mkdir(parents=True, exist_ok=True)
    (ws / JOURNAL).write_text('{"format": "datapool-journal/1", "command": ')
    before, rev = state(ws), head(ws)
    for args in (["recover"], run_args(ws, "in1"), ["import", "x.csv", "--name", "Y"]):
        out = cli(ws, *args, code=1)
        assert f"{ws / JOURNAL} records an interrupted datapool command but cannot" in out
        assert "delete that file" in out
    assert state(ws) == before and head(ws) == rev
    (ws / JOURNAL).write_text(json.dumps({"format": "something else"}))
    assert "cannot be read" in cli(ws, "recover", code=1)


def test_recover_with_nothing_to_do_says_so(ws: Path) -> None:
    assert "nothing to do" in cli(ws, "recover")


HOLD_DVC_LOCK = """
import sys
from dvc.repo import Repo
with Repo(sys.argv[1]).lock:
    print("locked", flush=True)
    sys.stdin.read()
"""


@pytest.mark.slow  # DVC retries its lock for a few seconds before giving up
def test_recovery_waits_while_a_dvc_command_still_runs(ws: Path, tmp_path: Path) -> None:
    # A killed datapool's `dvc repro` outlives it and may still write dvc.lock:
    # nothing is decided while DVC's repository lock is held.
    killed(ws, "import", str(exported_csv(ws, tmp_path)), "--name", "X", crash_at="done")
    before = state(ws)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_DVC_LOCK, str(ws)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        out = cli(ws, "recover", code=1)
        assert "a DVC command still holds the repository's lock" in out
        assert state(ws) == before and read_journal(ws) is not None
    finally:
        holder.communicate("")
    assert "rolled back the interrupted `import` of pool X" in cli(ws, "recover")


def test_a_run_rolled_back_after_merge_wrote_the_pool_leaves_the_recorded_version(
    ws: Path,
) -> None:
    # merge wrote the pool, then the stage failed before DVC recorded it (Ctrl-C while
    # DVC caches, a full disk): the rows must not fold into the next run's commit.
    cli(ws, *run_args(ws, "in1", "datapool.name=A", "stopping_condition.n_samples=9"))
    before = state(ws)
    failing = PIPELINE.replace(
        "${stopping_condition.n_samples}'", "${stopping_condition.n_samples}' && exit 1"
    )
    (ws / "dvc.yaml").write_text(failing)
    cli(ws, *run_args(ws, "in2"), code=1)
    (ws / "dvc.yaml").write_text(PIPELINE)
    assert state(ws) == before  # records and the pool's files as HEAD has them
    assert row_count(pool_dir(ws, "A")) == 3
    assert "Data and pipelines are up to date" in run_tool(["dvc", "status"], cwd=ws, quiet=True)


def test_a_failing_clean_up_keeps_the_commands_own_error(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datapool.version as version

    def broken(*args: object, **kwargs: object) -> str:
        raise OSError("disk full while putting files back")

    monkeypatch.setattr(version, "roll_back", broken)
    failing = pytest.raises(RuntimeError, match="the command's own failure")
    with failing as caught, version.transaction(ws) as txn:
        txn.begin(command="run", pool="A", message="m", parked=False)
        raise RuntimeError("the command's own failure")
    assert "could not finish cleaning up: disk full" in "".join(caught.value.__notes__)
    assert read_journal(ws) is not None  # left for the next command to recover
