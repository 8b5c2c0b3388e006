"""Where a workspace keeps things: every path of a pool, named once.

Paths are relative to the workspace (POSIX strings, as git and DVC name them);
:func:`pool_dir` (or ``workspace / path``) makes them absolute. dvc.yaml spells
the same paths through ``${datapool.name}`` (tests/test_layout.py holds the two
together). What lies *inside* a pool folder (manifest, shards, images) is
:mod:`datapool.store`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

POOLS = "pools"
WORK = "work"
LOCK = "dvc.lock"
PARAMS = "params.yaml"
# Where `dvc add` lists the parked pool folders, so git ignores their files.
POOL_IGNORE = f"{POOLS}/.gitignore"


@dataclass(frozen=True)
class PoolPaths:
    """The paths of pool ``name`` in a workspace, relative to it.

    Attributes:
        name: the pool's name (already checked by :mod:`datapool.settings`).
    """

    name: str

    @property
    def folder(self) -> str:
        """``pools/NAME``: the pool's data (a DVC output)."""
        return f"{POOLS}/{self.name}"

    @property
    def record(self) -> str:
        """``pools/NAME.dvc``: the pool's record while it is parked (not the pipeline's)."""
        return f"{POOLS}/{self.name}.dvc"

    @property
    def work(self) -> str:
        """``work/NAME``: the pipeline's scratch outputs for this pool (not committed)."""
        return f"{WORK}/{self.name}"

    @property
    def candidates(self) -> str:
        """The candidates ``embed`` writes (pool-shard format)."""
        return f"{self.work}/embed/candidates.arrow"

    @property
    def reembedded(self) -> str:
        """The pool re-embedded by ``embed`` when its model changed (pool-shard format)."""
        return f"{self.work}/embed/pool_reembedded.arrow"

    @property
    def picks(self) -> str:
        """The picks ``sample`` writes, in pick order."""
        return f"{self.work}/sample/picks.arrow"


def pool_of_record(path: str) -> str | None:
    """The pool name a path such as ``pools/NAME`` or ``pools/NAME.dvc`` belongs to."""
    head, _, rest = path.rstrip("/").partition("/")
    if head != POOLS or not rest or "/" in rest:
        return None
    return rest.removesuffix(".dvc") or None


def pool_dir(workspace: Path, name: str) -> Path:
    """``WORKSPACE/pools/NAME``: the folder holding pool ``name``'s data."""
    return workspace / PoolPaths(name).folder
