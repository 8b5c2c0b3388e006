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
# What `merge` writes into PoolPaths.report, by role (Lightly's list names kept).
REPORT_FILES = {
    "sampled": "sampled_filenames.txt",  # picks, in pick order
    "removed": "removed_filenames.txt",  # decoded candidates not picked
    "duplicates": "duplicate_filenames.txt",  # exact copies of another inbox file
    "duplicate_reasons": "duplicate_filenames.json",  # {copy: the file it repeats}
    "corrupt": "corrupt_filenames.txt",  # entries that could not be decoded
    "corrupt_reasons": "corrupt_filenames.json",  # {entry: reason}
    "selection": "selection.csv",  # every pick with its distance and scores
    "html": "report.html",  # the page people look at
}
# The plot data in PoolPaths.plots, by role; dvc.yaml's top-level `plots:` names each.
PLOT_FILES = {
    "picks": "pick_distances.csv",  # distance of each pick when it was picked
    "nn": "nn_distances.csv",  # histogram of candidates' distances to the pool, before/after
    "labels": "labels.csv",  # rows per label in the pool after the run
    "map_pool": "map_pool.csv",  # 2-D map (PCA) of the pool before the run
    "map_new": "map_new.csv",  # ... of this batch's candidates not picked
    "map_picked": "map_picked.csv",  # ... of this batch's picks
}


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
    def select_inputs(self) -> str:
        """The checked selection settings and their inputs' hashes (``select_inputs``)."""
        return f"{self.work}/select_inputs.json"

    @property
    def picks(self) -> str:
        """The picks ``sample`` writes, in pick order."""
        return f"{self.work}/sample/picks.arrow"

    @property
    def selection_info(self) -> str:
        """What ``sample`` records beside the picks: next distance, counts, its settings."""
        return f"{self.work}/sample/selection.json"

    @property
    def timings(self) -> str:
        """Seconds each stage took when it last ran (one JSON per stage; not a DVC output)."""
        return f"{self.work}/timings"

    @property
    def report(self) -> str:
        """``work/NAME/report``: the run's lists, selection.csv and report.html (``merge``'s)."""
        return f"{self.work}/report"

    @property
    def metrics(self) -> str:
        """The run's numbers for ``dvc metrics show/diff`` (written by ``merge``)."""
        return f"{self.work}/metrics.json"

    @property
    def plots(self) -> str:
        """The run's plot data for ``dvc plots show/diff`` (CSV files, see :data:`PLOT_FILES`)."""
        return f"{self.work}/plots"

    def report_file(self, name: str) -> str:
        """A file of :data:`REPORT_FILES` in :attr:`report`; KeyError for another name."""
        return f"{self.report}/{REPORT_FILES[name]}"

    def plot_file(self, name: str) -> str:
        """A file of :data:`PLOT_FILES` in :attr:`plots`; KeyError for another name."""
        return f"{self.plots}/{PLOT_FILES[name]}"


def pool_of_record(path: str) -> str | None:
    """The pool name a path such as ``pools/NAME`` or ``pools/NAME.dvc`` belongs to."""
    head, _, rest = path.rstrip("/").partition("/")
    if head != POOLS or not rest or "/" in rest:
        return None
    return rest.removesuffix(".dvc") or None


def pool_dir(workspace: Path, name: str) -> Path:
    """``WORKSPACE/pools/NAME``: the folder holding pool ``name``'s data."""
    return workspace / PoolPaths(name).folder
