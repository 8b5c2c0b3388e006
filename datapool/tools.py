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


def git_commit(workspace: Path, message: str) -> bool:
    """Commit everything in the workspace; False if there was nothing to commit.

    Supplies an identity when git has none configured (fresh machines, CI, containers).
    """
    run_tool(["git", "add", "-A"], cwd=workspace, quiet=True)
    if not run_tool(["git", "status", "--porcelain"], cwd=workspace, quiet=True).strip():
        return False
    ident: list[str] = []
    if not (git_output(workspace, "config", "user.email") or "").strip():
        ident = ["-c", "user.name=datapool", "-c", "user.email=datapool@localhost"]
    run_tool(["git", *ident, "commit", "-q", "-m", message], cwd=workspace, quiet=True)
    return True


def head(workspace: Path) -> str:
    """The full hash of HEAD."""
    return run_tool(["git", "rev-parse", "HEAD"], cwd=workspace, quiet=True).strip()
