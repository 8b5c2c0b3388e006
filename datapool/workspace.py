"""A datapool workspace: a git + DVC repository holding the pipeline, params and pools.

Creating one, editing its params, running one increment and recording it as a
revision. Git and DVC are driven as the user would drive them (subprocesses),
so what happens here is exactly what ``git log`` and ``dvc`` show afterwards.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datapool.errors import InputError
from datapool.pool import read_pool
from datapool.revisions import adopt, forget_history
from datapool.tools import git_commit, run_tool, tool_env

__all__ = [
    "Increment",
    "create_workspace",
    "current_settings",
    "git_commit",
    "parse_overrides",
    "run_increment",
    "run_tool",
    "set_params",
    "tool_env",
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


def parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """``["a.b=0.1", "c=true"]`` -> ``{"a.b": 0.1, "c": True}`` (values parsed as YAML scalars).

    Raises :class:`InputError` for an item without ``=`` or without a key.
    """
    from ruamel.yaml import YAML

    parsed: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"expected KEY=VALUE, got {pair!r}")
        parsed[key.strip()] = YAML(typ="safe").load(text) if text.strip() else ""
    return parsed


def current_settings(workspace: Path) -> tuple[str, str, bool]:
    """``(datapool.name, input_dir, datapool.keep_history)`` as params.yaml has them now."""
    import yaml

    params = yaml.safe_load((workspace / "params.yaml").read_text(encoding="utf-8")) or {}
    pool = params.get("datapool") or {}
    keep = pool.get("keep_history", True)
    if isinstance(keep, str):
        keep = keep.strip().lower() not in ("false", "no", "off", "0")
    return str(pool.get("name")), str(params.get("input_dir")), bool(keep)


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


def run_increment(
    workspace: Path, *, name: str, input_dir: str, keep_history: bool = True
) -> Increment:
    """``dvc repro`` for pool ``name`` (params.yaml must already name it), then record it.

    The pool becomes the pipeline's (another pool dvc.lock recorded is parked
    first, see :mod:`datapool.revisions`). With ``keep_history`` the new version
    is committed as a revision; without, nothing is committed and the pool's
    earlier versions are deleted from the DVC cache (:func:`forget_history`).
    """
    adopt(workspace, name)
    before = pool_size(workspace, name)
    run_tool(["dvc", "repro"], cwd=workspace)
    step = Increment(pool=name, before=before, after=pool_size(workspace, name))
    if keep_history:
        git_commit(workspace, step.message(input_dir))
    else:
        forget_history(workspace, name)
    return step
