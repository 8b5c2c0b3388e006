"""The container's entrypoint: one increment with the Lightly Docker's invocation.

``docker run --gpus all --rm -v IN:/home/input_dir:ro -v SHARED:/home/shared_dir
-v OUT:/home/output_dir IMAGE datapool.name=my_datapool stopping_condition.min_distance=0.1``

* ``/home/input_dir`` (read-only): this increment's images.
* ``/home/shared_dir``: the workspace (git + DVC), made on first use; it holds
  every pool and its history, so the next run continues from it.
* ``/home/output_dir``: this run's lists, metrics and report.html (see :func:`write_outputs`).

The three folders can be moved with ``DATAPOOL_INPUT_DIR``, ``DATAPOOL_SHARED_DIR``
and ``DATAPOOL_OUTPUT_DIR`` (the tests run this module on plain folders).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from datapool.console import user_errors
from datapool.errors import InputError
from datapool.increment import read_picks
from datapool.layout import PARAMS, REPORT_FILES, PoolPaths, pool_dir
from datapool.pool import POOL_CSV, read_pool
from datapool.settings import check_value, flatten, load_params, parse_settings
from datapool.tools import head
from datapool.workspace import (
    Increment,
    create_workspace,
    run_locked,
    workspace_lock,
    workspace_problem,
)

DEFAULT_DIRS = {
    "input": ("DATAPOOL_INPUT_DIR", "/home/input_dir"),
    "shared": ("DATAPOOL_SHARED_DIR", "/home/shared_dir"),
    "output": ("DATAPOOL_OUTPUT_DIR", "/home/output_dir"),
}


def folder(role: str) -> Path:
    """The input, shared or output folder: its environment variable, else the mount point."""
    variable, default = DEFAULT_DIRS[role]
    return Path(os.environ.get(variable, default))


def ensure_workspace(shared_dir: Path) -> None:
    """Make ``shared_dir`` a workspace unless it is one.

    Anything else is refused, another DVC project included: its pipeline would
    run, and its files be committed, as if they were ours (see
    :func:`datapool.workspace.workspace_problem` for what counts as a workspace).
    Raises :class:`InputError` naming the folder and what it lacks.
    """
    problem = workspace_problem(shared_dir)
    if problem is None:
        return
    if shared_dir.exists() and any(shared_dir.iterdir()):
        raise InputError(
            f"not a datapool workspace: {shared_dir} ({problem}); mount an empty folder "
            "(it becomes the workspace) or one a previous run used"
        )
    create_workspace(shared_dir)


@contextmanager
def shared_folder_lock(shared_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the shared folder itself (its directory).

    The workspace's own lock (:func:`datapool.workspace.workspace_lock`) is a
    file in ``.dvc/tmp``, which an empty folder does not have yet; a lock file
    put in the folder first would make it non-empty, and one beside it may not
    be writable (the parent is outside the mount). So two containers started on
    one empty folder meet here, on the directory, before either makes it a
    workspace. The kernel drops the lock when the process ends, even by SIGKILL.

    Raises :class:`InputError` when another process holds it.
    """
    shared_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(shared_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(
                f"another datapool run is in progress in {shared_dir} (it holds a lock on "
                "the folder); wait for it to finish, then run again"
            ) from None
        yield
    finally:
        os.close(fd)


def run_container(
    overrides: Sequence[str], *, input_dir: Path, shared_dir: Path, output_dir: Path
) -> Increment:
    """Run one increment of ``input_dir`` in the workspace ``shared_dir``; fill ``output_dir``.

    ``overrides`` are ``KEY=VALUE`` settings (``datapool.name=my_datapool``),
    each checked before the shared folder is touched. Raises :class:`InputError`
    for a missing input folder, bad settings, a shared folder that is not a
    workspace (nor empty), another run holding it (:func:`shared_folder_lock`,
    then the workspace's lock), or a failing run (params.yaml is then left as it was).
    """
    if not input_dir.is_dir():
        raise InputError(
            f"input folder {input_dir} does not exist; mount one with -v IN:{input_dir}:ro"
        )
    settings = parse_settings(overrides)
    settings["input_dir"] = check_value("input_dir", str(input_dir.resolve()))
    # Both locks span the whole run: making the workspace (two containers on one empty
    # folder) and reading HEAD for the report (another run could commit in between).
    with shared_folder_lock(shared_dir):
        ensure_workspace(shared_dir)
        with workspace_lock(shared_dir):
            step, done = run_locked(shared_dir, settings)
            revision = head(shared_dir) if done.keep_history else None
            write_outputs(shared_dir, step, output_dir, revision=revision)
    return step


def write_outputs(
    workspace: Path, step: Increment, output_dir: Path, *, revision: str | None
) -> None:
    """This run's results, in the Lightly Docker's spirit, into ``output_dir``:

    what ``merge`` wrote into ``work/NAME/report`` (:data:`datapool.layout.REPORT_FILES`:
    ``sampled_filenames.txt`` in pick order, ``removed_filenames.txt``,
    ``duplicate_filenames.txt``, ``corrupt_filenames.txt`` and their reasons,
    ``selection.csv``, ``report.html``) and ``metrics.json``; ``corrupt.json`` and
    ``duplicates.json`` as ``embed`` wrote them; ``datapool_latest.csv`` (the whole
    pool after the run, written from its shards whatever ``csv_max_rows`` says: the
    output folder is not versioned) and ``report.json`` (pool, rows before/after,
    revision, settings). A workspace whose pipeline predates the report (no
    ``work/NAME/report``) gets the two lists written from the picks, as before.
    """
    from datapool.store import read_any, write_lightly_csv

    paths = PoolPaths(step.pool)
    output_dir.mkdir(parents=True, exist_ok=True)
    picks = read_picks(workspace / paths.picks)
    report_dir = workspace / paths.report
    if report_dir.is_dir():
        for name in REPORT_FILES.values():
            if (report_dir / name).is_file():
                shutil.copyfile(report_dir / name, output_dir / name)
        shutil.copyfile(workspace / paths.metrics, output_dir / "metrics.json")
    else:
        candidates = read_any(workspace / paths.candidates)
        picked = [str(f) for f in picks["filenames"]]
        removed = sorted(set(map(str, candidates["filenames"])) - set(picked))
        for name, lines in ((REPORT_FILES["sampled"], picked), (REPORT_FILES["removed"], removed)):
            (output_dir / name).write_text("".join(f"{n}\n" for n in lines), encoding="utf-8")
    for name in ("corrupt.json", "duplicates.json"):
        shutil.copyfile(workspace / paths.work / "embed" / name, output_dir / name)
    pool = read_pool(pool_dir(workspace, step.pool))
    if pool is not None:
        write_lightly_csv(pool, output_dir / POOL_CSV)
    report = {
        "pool": step.pool,
        "rows_before": step.before,
        "rows_after": step.after,
        "sampled": len(picks),
        "revision": revision,
        "params": flatten(load_params((workspace / PARAMS).read_text(encoding="utf-8"))),
    }
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    (output_dir / "report.json").write_text(text, encoding="utf-8")


def container_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment git and DVC need inside the container, given the one we were started with.

    Analytics off; a writable DVC site cache; git told that the shared folder,
    usually owned by the host's user rather than ours, is safe; and a writable
    HOME when the image runs under an arbitrary uid (``docker run --user``).
    """
    env = dict(environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("DVC_SITE_CACHE_DIR", "/tmp/dvc-site-cache")
    env.update(
        {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*"}
    )
    home = env.get("HOME", "")
    if not home or not os.access(home, os.W_OK):
        env["HOME"] = "/tmp"
    return env


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: ``python -m datapool.container KEY=VALUE ...``; exits 1 on a user error."""
    args = list(sys.argv[1:] if argv is None else argv)
    # Children (git, dvc, the stages) inherit os.environ, so set it before any of them runs.
    os.environ.update(container_env(dict(os.environ)))
    with user_errors("datapool"):
        dirs = {role: folder(role) for role in DEFAULT_DIRS}
        step = run_container(
            args, input_dir=dirs["input"], shared_dir=dirs["shared"], output_dir=dirs["output"]
        )
    print(f"datapool: pool {step.pool} has {step.after} rows (+{step.after - step.before})")


if __name__ == "__main__":
    main()
