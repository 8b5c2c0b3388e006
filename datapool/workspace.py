"""A datapool workspace: a git + DVC repository holding the pipeline, params and pools.

Creating one, editing its params, running one increment and recording it as a
revision. Git and DVC are driven as the user would drive them (subprocesses),
so what happens here is exactly what ``git log`` and ``dvc`` show afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapool.errors import InputError
from datapool.pool import read_pool

# What a workspace is made of; copied from the source tree that holds this package.
TEMPLATE_FILES = (
    "dvc.yaml",
    "params.yaml",
    "stages/embed.py",
    "stages/sample.py",
    "stages/merge.py",
)
GITIGNORE = "/work/\n"


def template_dir() -> Path:
    """The source tree whose dvc.yaml, params.yaml and stages/ a new workspace copies.

    Raises :class:`InputError` if this installation has no such tree beside it.
    """
    root = Path(__file__).resolve().parent.parent
    missing = [name for name in TEMPLATE_FILES if not (root / name).is_file()]
    if missing:
        raise InputError(
            f"cannot find the pipeline files ({', '.join(missing)}) next to {root}; "
            "install datapool from its source checkout (pip install -e .)"
        )
    return root


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


def git_commit(workspace: Path, message: str) -> bool:
    """Commit everything in the workspace; False if there was nothing to commit.

    Supplies an identity when git has none configured (fresh machines, CI).
    """
    run_tool(["git", "add", "-A"], cwd=workspace, quiet=True)
    if not run_tool(["git", "status", "--porcelain"], cwd=workspace, quiet=True).strip():
        return False
    ident: list[str] = []
    probe = subprocess.run(
        ["git", "config", "user.email"], cwd=workspace, capture_output=True, text=True, check=False
    )
    if not probe.stdout.strip():
        ident = ["-c", "user.name=datapool", "-c", "user.email=datapool@localhost"]
    run_tool(["git", *ident, "commit", "-q", "-m", message], cwd=workspace, quiet=True)
    return True


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
    run_tool(["git", "init", "-q"], cwd=dest, quiet=True)
    run_tool(["dvc", "init", "-q"], cwd=dest, quiet=True)
    run_tool(["dvc", "config", "core.analytics", "false"], cwd=dest, quiet=True)
    git_commit(dest, "datapool workspace")


def set_params(params_file: Path, overrides: Mapping[str, Any]) -> None:
    """Set dotted keys (``stopping_condition.n_samples``) in params.yaml, keeping its comments.

    Every key must already exist, so a typo cannot silently add a new setting.
    Raises :class:`InputError` naming the unknown key and the known ones.
    """
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(params_file.read_text(encoding="utf-8"))
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.get(key) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None or not hasattr(node, "keys") or leaf not in node:
            raise InputError(f"unknown setting {dotted!r}; known: {', '.join(dotted_keys(data))}")
        node[leaf] = value
    with params_file.open("w", encoding="utf-8") as handle:
        yaml.dump(data, handle)


def dotted_keys(data: Any, prefix: str = "") -> list[str]:
    """All leaf keys of a nested mapping, dotted: ``["datapool.name", ...]``."""
    keys: list[str] = []
    for key, value in data.items():
        if hasattr(value, "items"):
            keys += dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


@dataclass(frozen=True)
class Increment:
    """What one run did to a pool: its name, rows before and after."""

    pool: str
    before: int
    after: int

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


def run_increment(workspace: Path, *, name: str, input_dir: str) -> Increment:
    """``dvc repro`` in the workspace, then commit the new pool version as a revision."""
    before = pool_size(workspace, name)
    run_tool(["dvc", "repro"], cwd=workspace)
    step = Increment(pool=name, before=before, after=pool_size(workspace, name))
    git_commit(workspace, step.message(input_dir))
    return step
