"""DVC stage `sample`: greedy k-center over the new candidates, conditioned on the pool.

Writes the picks (picks.arrow) -- filenames, content_hash, pick_rank, pick_distance -- in
pick order, so the cut-off can be moved later without re-running selection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapool.console import user_errors
from datapool.increment import (
    CANDIDATE_COLUMNS,
    StoppingCondition,
    describe_stop,
    effective_pool,
    new_candidates,
    select_increment,
)
from datapool.store import read_any, write_any
from datapool.transaction import open_pool

app = typer.Typer(add_completion=False)


@app.command()
def main(
    candidates: Annotated[
        Path,
        typer.Option(help="candidates written by embed (.arrow; .csv from older workspaces)"),
    ],
    pool_dir: Annotated[Path, typer.Option(help="the pool folder, pools/NAME")],
    out: Annotated[Path, typer.Option(help="where the picks go (.arrow, or .csv)")],
    lock_file: Annotated[Path, typer.Option(help="dvc.lock, to detect a pool not yet pulled")],
    reembedded_pool: Annotated[
        Path, typer.Option(help="the pool re-embedded by embed; used instead when it exists")
    ],
    n_samples: Annotated[int, typer.Option(help="stop after this many picks; 0 = no limit")] = 0,
    min_distance: Annotated[
        float, typer.Option(help="stop when the farthest candidate is closer; 0 = off")
    ] = 0.0,
) -> None:
    """Pick the most diverse of --candidates into --out."""
    with user_errors("sample"):
        stop = StoppingCondition(n_samples=n_samples, min_distance=min_distance)
        pool = effective_pool(open_pool(pool_dir, lock_file=lock_file), reembedded_pool)
        table = read_any(candidates, required=CANDIDATE_COLUMNS)
        picks = select_increment(table, pool, stop)
        write_any(picks, out)
        n_fresh = len(new_candidates(table, pool))
    print(
        f"sample: picked {len(picks)} of {n_fresh} new candidates "
        f"({len(table) - n_fresh} already in the pool): "
        f"{describe_stop(picks, n_fresh=n_fresh, stop=stop)}"
    )


if __name__ == "__main__":
    app()
