"""A datapool workspace: a git + DVC repository holding the pipeline, params and pools.

Creating one, editing its params, and running one increment: params edit,
adopt, ``dvc repro`` and commit as one version transaction
(:mod:`datapool.version`, which also owns the workspace lock). Git and DVC are
driven as the user would drive them (subprocesses), so what happens here is
exactly what ``git log`` and ``dvc`` show afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapool.atomic import atomic_open
from datapool.errors import InputError
from datapool.layout import PARAMS, WORK, pool_dir
from datapool.revisions import adopt, current_record
from datapool.settings import RunSettings, check_params, flatten, load_params
from datapool.store import row_count
from datapool.tools import git_commit, git_output, run_tool, tool_env
from datapool.version import LOCK_FILE, Transaction, crash_point, transaction, workspace_lock

__all__ = [
    "LOCK_FILE",
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
    "stages/select_inputs.py",
    "stages/embed.py",
    "stages/sample.py",
    "stages/merge.py",
)
GITIGNORE = f"/{WORK}/\n"
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
    """What one run did to a pool: its name, rows before and after, and (with
    keep_history=false) what became of its earlier versions."""

    pool: str
    before: int
    after: int
    history_note: str = ""

    def message(self, input_dir: str) -> str:
        """The revision's commit message."""
        return (
            f"pool {self.pool}: {self.after} rows ({self.after - self.before:+d}) "
            f"after adding from {input_dir}"
        )


def pool_size(workspace: Path, name: str) -> int:
    """Rows of pool ``name`` in the workspace, 0 if it does not exist yet."""
    return row_count(pool_dir(workspace, name))


def run_increment(
    workspace: Path, *, name: str, input_dir: str, keep_history: bool = True
) -> Increment:
    """``dvc repro`` for pool ``name`` (params.yaml must already name it) as one version
    transaction, under the workspace lock: committed as a revision, or without
    ``keep_history`` not committed and the pool's earlier versions deleted from the
    DVC cache (:func:`datapool.revisions.forget_history`).

    Raises :class:`InputError` for a held lock or a failing pipeline (the
    transaction then rolls back what the run changed before merge recorded it).
    """
    with transaction(workspace) as txn:
        step = _increment(txn, workspace, name=name, input_dir=input_dir, keep_history=keep_history)
    return _with_note(step, txn)


def _increment(
    txn: Transaction,
    workspace: Path,
    *,
    name: str,
    input_dir: str,
    keep_history: bool,
    params_text: str | None = None,
) -> Increment:
    """The change of a run, inside ``txn``: journal, params.yaml (``params_text``, if
    given), the pool made the pipeline's (another pool dvc.lock records is parked,
    see :func:`datapool.revisions.adopt`), ``dvc repro``; rows before and after."""
    before = pool_size(workspace, name)
    txn.begin(
        command="run",
        pool=name,
        # The message a crash after merge commits with (rows are counted only after).
        message=f"pool {name}: grown from {input_dir} (finished after an interruption)",
        parked=False,
        keep_history=keep_history,
        # Read before the run: with keep_history=false it may be in no commit.
        replaced=current_record(workspace, name),
    )
    if params_text is not None:
        replace_file(workspace / PARAMS, params_text.encode("utf-8"))
    adopt(workspace, name)
    run_tool(["dvc", "repro"], cwd=workspace)
    crash_point("after-repro")
    step = Increment(pool=name, before=before, after=pool_size(workspace, name))
    txn.done(step.message(input_dir))
    return step


def _with_note(step: Increment, txn: Transaction) -> Increment:
    """``step`` with what forgetting did (keep_history=false), from the finished ``txn``."""
    forgotten = txn.finished.forgotten if txn.finished is not None else None
    if forgotten is None:
        return step
    return Increment(step.pool, step.before, step.after, history_note=forgotten.note)


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

    First finishes or rolls back a transaction a killed command left
    (:func:`datapool.version.recover`). The whole params file is checked with the
    overrides applied before anything is written or run. The params edit, the
    switch of pools, ``dvc repro`` and the commit are one version transaction: if
    the run fails (or is interrupted, or killed) before merge recorded the pool in
    dvc.lock, params.yaml and every pool record are put back byte for byte, so a
    failed run changes no setting. Once merge has recorded it, dvc.lock describes
    the pool with the new settings, so they stay and are committed (even if a
    later stage or a Ctrl-C fails the run).

    Raises :class:`InputError` for a bad setting or params file, a missing input
    folder, or a failing pipeline.
    """
    with transaction(workspace, locked=True) as txn:
        text, settings = _checked_params(workspace, overrides)
        step = _increment(
            txn,
            workspace,
            name=settings.name,
            input_dir=settings.input_dir,
            keep_history=settings.keep_history,
            params_text=text,
        )
    return _with_note(step, txn), settings


def _checked_params(workspace: Path, overrides: Mapping[str, Any]) -> tuple[str, RunSettings]:
    """params.yaml's text with ``overrides`` applied, and its checked settings; nothing
    is written. Raises :class:`InputError` naming the file, key or folder at fault."""
    params_file = workspace / PARAMS
    try:
        text = with_overrides(params_file.read_bytes().decode("utf-8"), overrides)
    except UnicodeDecodeError as err:
        raise InputError(f"{params_file} is not UTF-8 text: {err}") from None
    params = load_params(text)
    if not isinstance(params, dict):
        raise InputError(f"{params_file} must map settings to values, got {type(params).__name__}")
    settings = check_params(params, source=str(params_file))
    if not (workspace / settings.input_dir).is_dir():
        raise InputError(f"input_dir {settings.input_dir} is not a folder")
    check_shell_safe(workspace, settings.input_dir)
    return text, settings
