"""A datapool workspace: a git + DVC repository holding the pipeline, params and pools.

Creating one, editing its params, running one increment and recording it as a
revision. Git and DVC are driven as the user would drive them (subprocesses),
so what happens here is exactly what ``git log`` and ``dvc`` show afterwards.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from datapool.atomic import atomic_open
from datapool.errors import InputError
from datapool.pool import read_pool
from datapool.revisions import (
    Record,
    current_record,
    forget_history,
    merge_entry,
    switch_to,
    version_paths,
)
from datapool.settings import RunSettings, check_params, flatten, load_params
from datapool.tools import git_commit, git_output, run_tool, tool_env

__all__ = [
    "MARKER",
    "Increment",
    "check_workspace",
    "create_workspace",
    "git_commit",
    "run_increment",
    "run_locked",
    "run_tool",
    "run_with_settings",
    "set_params",
    "tool_env",
    "workspace_lock",
]

# What a workspace is made of; copied from the source tree that holds this package.
TEMPLATE_FILES = (
    "dvc.yaml",
    "params.yaml",
    "stages/inbox.py",
    "stages/embed.py",
    "stages/sample.py",
    "stages/merge.py",
)
GITIGNORE = "/work/\n"
# What `dvc init` writes (and stages); the first commit records them with the template.
DVC_INIT_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore")
# What tells a datapool workspace from any other DVC project: `datapool init` writes it.
MARKER = ".datapool"
MARKER_TEXT = (
    "datapool workspace 1\n"
    "# Written by `datapool init`: datapool and its container run the pipeline only in\n"
    "# folders that hold this file (or were made by `datapool init` before it existed).\n"
)
# The first commit `datapool init` makes; how workspaces made before MARKER are recognised.
FIRST_COMMIT = "datapool workspace"
# What an input_dir may hold when the workspace's dvc.yaml predates quoted values.
PLAIN_PATH = re.compile(r"[A-Za-z0-9._/+@,:=-]+")
# Held for the whole params-edit -> repro -> commit of a run (see workspace_lock);
# under .dvc/tmp, which DVC's own .gitignore keeps out of every commit.
LOCK_FILE = Path(".dvc") / "tmp" / "datapool.lock"


def template_dir() -> Path:
    """The folder whose dvc.yaml, params.yaml and stages/ a new workspace copies.

    ``datapool/pipeline/`` holds symlinks to the repository's top-level files,
    which a wheel build turns into copies, so installed and source trees agree.
    Raises :class:`InputError` if the files are missing.
    """
    root = Path(__file__).resolve().parent / "pipeline"
    missing = [name for name in TEMPLATE_FILES if not (root / name).is_file()]
    if missing:
        raise InputError(
            f"cannot find the pipeline files ({', '.join(missing)}) in {root}; reinstall datapool"
        )
    return root


def create_workspace(dest: Path) -> None:
    """Make ``dest`` a new workspace: git + DVC initialised, pipeline copied, first commit.

    Raises :class:`InputError` if ``dest`` exists and is not empty.
    """
    if dest.exists() and any(dest.iterdir()):
        raise InputError(f"{dest} is not empty; choose a new folder for the workspace")
    source = template_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for name in TEMPLATE_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dest / name)
    (dest / ".gitignore").write_text(GITIGNORE, encoding="utf-8")
    (dest / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    run_tool(["git", "init", "-q"], cwd=dest, quiet=True)
    run_tool(["dvc", "init", "-q"], cwd=dest, quiet=True)
    run_tool(["dvc", "config", "core.analytics", "false"], cwd=dest, quiet=True)
    git_commit(dest, FIRST_COMMIT, paths=[*TEMPLATE_FILES, ".gitignore", MARKER, *DVC_INIT_FILES])


def workspace_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a datapool workspace, or None if it is one.

    A workspace is a git + DVC repository holding the pipeline (dvc.yaml,
    params.yaml, stages/) and the :data:`MARKER` that ``datapool init`` writes;
    one without the marker counts when its first commit is ``datapool init``'s
    (workspaces made before the marker existed).
    """
    if not folder.is_dir():
        return "no such folder"
    # Not every file of TEMPLATE_FILES: workspaces made by an older datapool have
    # the stages of their day (no stages/inbox.py, say) and must keep working.
    expected = [".git", ".dvc", "dvc.yaml", "params.yaml", "stages"]
    missing = [name for name in expected if not (folder / name).exists()]
    if missing:
        return f"it lacks {', '.join(missing)}"
    marker = folder / MARKER
    if marker.is_file():
        first = marker.read_text(encoding="utf-8", errors="replace").partition("\n")[0]
        return None if first.startswith("datapool workspace") else f"{marker} is not ours"
    roots = (git_output(folder, "log", "--max-parents=0", "--format=%s", "HEAD") or "").split("\n")
    if FIRST_COMMIT in roots:
        return None
    return f"a DVC project with no {MARKER} marker, not made by `datapool init`"


def check_workspace(folder: Path) -> None:
    """Raise :class:`InputError` ``not a datapool workspace: FOLDER (why)`` unless it is one."""
    problem = workspace_problem(folder)
    if problem is not None:
        raise InputError(
            f"not a datapool workspace: {folder.resolve()} ({problem}); "
            "make one with `datapool init DIR`, or pass --workspace DIR"
        )


def has_unquoted_values(workspace: Path) -> bool:
    """True when a stage command of the workspace's dvc.yaml has a value outside quotes.

    ``datapool init`` before issue 15 wrote such commands; the shell then splits
    and expands whatever the value holds.
    """
    import yaml

    stages = (yaml.safe_load((workspace / "dvc.yaml").read_text(encoding="utf-8")) or {}).get(
        "stages"
    ) or {}
    commands = [str(stage.get("cmd", "")) for stage in stages.values() if isinstance(stage, dict)]
    return any("${" in re.sub(r"'[^']*'", "", cmd) for cmd in commands)


def check_shell_safe(workspace: Path, input_dir: str) -> None:
    """Refuse an input folder an older, unquoted dvc.yaml would hand to the shell mangled.

    Raises :class:`InputError` naming the folder and the fix.
    """
    if PLAIN_PATH.fullmatch(input_dir) or not has_unquoted_values(workspace):
        return
    raise InputError(
        f"input_dir {input_dir!r} holds characters the shell would split or run, and "
        f"{workspace / 'dvc.yaml'} (from an older datapool) passes values unquoted; copy "
        "dvc.yaml from a new `datapool init`, or use a folder named with letters, digits "
        "and ._/+@,:=- only"
    )


@contextmanager
def workspace_lock(workspace: Path) -> Iterator[None]:
    """Hold the workspace's lock for a command that edits params.yaml or commits.

    Two runs at once would otherwise commit each other's settings (the second
    rewrites params.yaml while the first is inside ``dvc repro``). A second
    command is refused at once rather than queued: it would run on settings the
    first one is about to change. The lock is an ``flock`` on :data:`LOCK_FILE`,
    so the kernel releases it when its process ends, even by SIGKILL.

    Raises :class:`InputError` when another process holds it.
    """
    path = workspace / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise InputError(
                f"another datapool command is in progress in {workspace.resolve()} "
                f"(process {holder} holds {path}); wait for it to finish, then run again"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def set_params(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Set dotted keys (``stopping_condition.n_samples``) in params.yaml, keeping its comments.

    The file is replaced atomically. Raises :class:`InputError` for an unknown
    key (see :func:`with_overrides`); values are not checked here (see
    :func:`run_with_settings`).
    """
    text = with_overrides(params_file.read_text(encoding="utf-8"), overrides)
    replace_file(params_file, text.encode("utf-8"))


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically, keeping its permission bits."""
    mode = path.stat().st_mode & 0o7777
    with atomic_open(path, "wb") as handle:
        os.fchmod(handle.fileno(), mode)
        handle.write(data)


def with_overrides(text: str, overrides: Mapping[str, Any]) -> str:
    """params.yaml ``text`` with dotted keys set, comments and layout kept.

    Every key must already exist, so a typo cannot silently add a new setting.
    Raises :class:`InputError` naming the unknown key and the known ones.
    """
    import io

    from ruamel.yaml import YAML

    yaml = YAML()
    try:
        data = yaml.load(text)
    except Exception as err:  # ruamel's parser errors share no public base class
        raise InputError(f"params.yaml is not valid YAML: {err}") from None
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None or not hasattr(node, "keys") or leaf not in node:
            raise InputError(f"unknown setting {dotted!r}; known: {', '.join(flatten(data))}")
        node[leaf] = value
    out = io.StringIO()
    yaml.dump(data, out)
    return out.getvalue()


@dataclass(frozen=True)
class Increment:
    """What one run did to a pool: its name, rows before and after, the version
    the working tree recorded before (``replaced``, dropped without history) and
    (with keep_history=false) what became of its earlier versions."""

    pool: str
    before: int
    after: int
    history_note: str = ""
    replaced: Record | None = None

    def message(self, input_dir: str) -> str:
        """The revision's commit message."""
        return (
            f"pool {self.pool}: {self.after} rows ({self.after - self.before:+d}) "
            f"after adding from {input_dir}"
        )


def pool_size(workspace: Path, name: str) -> int:
    """Rows in ``pools/<name>`` of the workspace, 0 if it does not exist yet."""
    table = read_pool(workspace / "pools" / name)
    return 0 if table is None else len(table)


def run_increment(
    workspace: Path, *, name: str, input_dir: str, keep_history: bool = True
) -> Increment:
    """``dvc repro`` for pool ``name`` (params.yaml must already name it), then record it.

    The pool becomes the pipeline's (another pool dvc.lock recorded is parked
    first, see :mod:`datapool.revisions`). With ``keep_history`` the new version
    is committed as a revision; without, nothing is committed and the pool's
    earlier versions are deleted from the DVC cache (:func:`forget_history`).
    """
    step = reproduce(workspace, name=name)
    return record(workspace, step, input_dir=input_dir, keep_history=keep_history)


def reproduce(workspace: Path, *, name: str) -> Increment:
    """Make ``name`` the pipeline's pool and run ``dvc repro``; returns rows before/after.

    The switch of pools is undone if the pipeline fails before merge records
    ``name`` (:func:`datapool.revisions.switch_to`).
    """
    # Read before the run: with keep_history=false it may be in no commit.
    replaced = current_record(workspace, name)
    with switch_to(workspace, name):
        before = pool_size(workspace, name)
        run_tool(["dvc", "repro"], cwd=workspace)
    after = pool_size(workspace, name)
    return Increment(pool=name, before=before, after=after, replaced=replaced)


def record(workspace: Path, step: Increment, *, input_dir: str, keep_history: bool) -> Increment:
    """Commit the increment as a revision, or (without history) drop the pool's old versions."""
    if keep_history:
        git_commit(workspace, step.message(input_dir), paths=version_paths(workspace))
    else:
        forgotten = forget_history(workspace, step.pool, replaced=step.replaced)
        step = replace(step, history_note=forgotten.note)
    return step


def merge_record(workspace: Path) -> Any:
    """merge's entry in the workspace's dvc.lock (None without one), so that a change
    tells a run that recorded its pool from one that stopped before."""
    lock = workspace / "dvc.lock"
    return merge_entry(lock.read_text(encoding="utf-8")) if lock.is_file() else None


def run_with_settings(
    workspace: Path, overrides: Mapping[str, Any]
) -> tuple[Increment, RunSettings]:
    """One increment with ``overrides`` (checked ``KEY=VALUE`` settings, see
    :func:`datapool.settings.parse_settings`) written to params.yaml, under
    :func:`workspace_lock` (see :func:`run_locked`).

    Raises :class:`InputError` for a folder that is not a workspace, a held lock,
    and what :func:`run_locked` raises.
    """
    check_workspace(workspace)
    with workspace_lock(workspace):
        return run_locked(workspace, overrides)


def run_locked(workspace: Path, overrides: Mapping[str, Any]) -> tuple[Increment, RunSettings]:
    """:func:`run_with_settings` for a caller that already holds :func:`workspace_lock`.

    The whole params file is checked with the overrides applied before anything
    is written or run. If ``dvc repro`` then fails (or is interrupted) before
    merge recorded the pool in dvc.lock, params.yaml is put back byte for byte,
    so a failed run changes no setting. Once merge has recorded it, dvc.lock
    describes the pool with the new settings, so they stay (even if a later
    stage, the commit or a Ctrl-C fails the run).

    Raises :class:`InputError` for a bad setting or params file, a missing input
    folder, or a failing pipeline.
    """
    params_file = workspace / "params.yaml"
    original = params_file.read_bytes()
    try:
        text = with_overrides(original.decode("utf-8"), overrides)
    except UnicodeDecodeError as err:
        raise InputError(f"{params_file} is not UTF-8 text: {err}") from None
    params = load_params(text)
    if not isinstance(params, dict):
        raise InputError(f"{params_file} must map settings to values, got {type(params).__name__}")
    settings = check_params(params, source=str(params_file))
    if not (workspace / settings.input_dir).is_dir():
        raise InputError(f"input_dir {settings.input_dir} is not a folder")
    check_shell_safe(workspace, settings.input_dir)
    merged = merge_record(workspace)
    replace_file(params_file, text.encode("utf-8"))
    try:
        step = reproduce(workspace, name=settings.name)
    except BaseException:
        if merge_record(workspace) == merged:
            replace_file(params_file, original)
        raise
    step = record(workspace, step, input_dir=settings.input_dir, keep_history=settings.keep_history)
    return step, settings
