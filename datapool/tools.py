"""Driving git and DVC as a user would: subprocesses in the workspace.

Nothing here imports dvc; ``dvc`` commands run as ``python -m dvc`` with this
interpreter, so they see the same installation as datapool itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from datapool.errors import InputError


def tool_env() -> dict[str, str]:
    """Environment for git/DVC children: this interpreter's bin first, analytics off."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


def run_tool(args: Sequence[str], *, cwd: Path, quiet: bool = False) -> str:
    """Run git or dvc in ``cwd``; returns stdout. Raises InputError with its output on failure."""
    if args[0] == "dvc":
        args = [sys.executable, "-m", "dvc", *args[1:]]
    result = subprocess.run(
        list(args), cwd=cwd, env=tool_env(), text=True, capture_output=quiet, check=False
    )
    if result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip() if quiet else "see the output above"
        raise InputError(f"`{' '.join(args)}` failed in {cwd} ({detail})")
    return result.stdout or ""


def git_output(workspace: Path, *args: str) -> str | None:
    """stdout of ``git ARGS`` in ``workspace``, or None when git fails (unknown rev or path)."""
    result = subprocess.run(
        ["git", *args], cwd=workspace, env=tool_env(), text=True, capture_output=True, check=False
    )
    return result.stdout if result.returncode == 0 else None


def git_commit(workspace: Path, message: str, *, paths: Sequence[str]) -> bool:
    """Commit exactly ``paths`` (relative to ``workspace``) as they are in the working
    tree; False if none of them changed since HEAD.

    Decision: never ``git add -A``. A stray file the user left in the workspace
    (notes, a scratch image, an edited README) is not ours to commit, and a
    change the user staged to any other file stays staged, out of this commit:
    the paths are staged (``git add -A -- PATHS``, which records a deleted
    path as a deletion) and committed with ``git commit --only -- PATHS``, which
    takes those paths alone, whatever else the index holds. A path that is
    neither in the working tree nor tracked is skipped (nothing to record).
    Paths are literal (no globs). Supplies an identity when git has none
    configured (fresh machines, CI, containers).

    Raises :class:`InputError` when git fails (e.g. a path the workspace's
    .gitignore excludes).
    """
    git = ["git", "--literal-pathspecs"]
    present = _recordable(workspace, paths)
    if not present:
        return False
    run_tool([*git, "add", "-A", "--", *present], cwd=workspace, quiet=True)
    if _has_head(workspace) and not _differs(workspace, present):
        return False
    ident: list[str] = []
    if not (git_output(workspace, "config", "user.email") or "").strip():
        ident = ["-c", "user.name=datapool", "-c", "user.email=datapool@localhost"]
    run_tool(
        [*git, *ident, "commit", "-q", "-m", message, "--only", "--", *present],
        cwd=workspace,
        quiet=True,
    )
    return True


def _recordable(workspace: Path, paths: Sequence[str]) -> list[str]:
    """The ``paths`` that exist, or that the index or HEAD track (deleted ones)."""
    git = ["git", "--literal-pathspecs"]
    tracked = run_tool([*git, "ls-files", "-z", "--", *paths], cwd=workspace, quiet=True)
    if _has_head(workspace):
        tracked += run_tool(
            [*git, "ls-tree", "-r", "-z", "--name-only", "HEAD", "--", *paths],
            cwd=workspace,
            quiet=True,
        )
    known = [name for name in tracked.split("\0") if name]

    def is_known(path: str) -> bool:
        folder = path.rstrip("/") + "/"
        return any(name == path or name.startswith(folder) for name in known)

    return [p for p in paths if (workspace / p).exists() or is_known(p)]


def _has_head(workspace: Path) -> bool:
    """False in a repository with no commit yet."""
    return git_output(workspace, "rev-parse", "--verify", "--quiet", "HEAD") is not None


def _differs(workspace: Path, paths: Sequence[str]) -> bool:
    """True when the index holds ``paths`` other than HEAD does (``git diff --cached``)."""
    result = subprocess.run(
        ["git", "--literal-pathspecs", "diff", "--cached", "--quiet", "HEAD", "--", *paths],
        cwd=workspace,
        env=tool_env(),
        text=True,
        capture_output=True,
        check=False,
    )
    if result.returncode > 1:
        detail = result.stderr.strip()
        raise InputError(f"`git diff --cached HEAD` failed in {workspace} ({detail})")
    return result.returncode == 1


def head(workspace: Path) -> str:
    """The full hash of HEAD."""
    return run_tool(["git", "rev-parse", "HEAD"], cwd=workspace, quiet=True).strip()
