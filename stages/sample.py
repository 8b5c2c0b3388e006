"""DVC stage `sample`: greedy k-center over the new candidates, conditioned on the pool.

Writes the picks (picks.arrow) -- filenames, content_hash, pick_rank, pick_distance -- in
pick order, so the cut-off can be moved later without re-running selection, and
beside them (--info, selection.json) what the report needs from the selection: the
distance at which it stopped (next_distance), how many candidates were new, why it
stopped and the stopping condition it ran with.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from datapool.console import user_errors
from datapool.increment import (
    CANDIDATE_COLUMNS,
    StoppingCondition,
    choose_increment,
    describe_stop,
    effective_pool,
)
from datapool.metrics import write_seconds
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
    info: Annotated[
        Path | None, typer.Option(help="where selection.json goes (for the report)")
    ] = None,
    timings: Annotated[
        Path | None, typer.Option(help="folder recording each stage's seconds")
    ] = None,
) -> None:
    """Pick the most diverse of --candidates into --out."""
    started = time.perf_counter()
    with user_errors("sample"):
        stop = StoppingCondition(n_samples=n_samples, min_distance=min_distance)
        pool = effective_pool(open_pool(pool_dir, lock_file=lock_file), reembedded_pool)
        table = read_any(candidates, required=CANDIDATE_COLUMNS)
        choice = choose_increment(table, pool, stop)
        picks, n_fresh = choice.picks, choice.fresh
        write_any(picks, out)
        why = describe_stop(picks, n_fresh=n_fresh, stop=stop)
        if info is not None:
            record = {
                "next_distance": choice.next_distance,
                "fresh": n_fresh,
                "stopped_because": why,
                "stopping_condition.n_samples": n_samples,
                "stopping_condition.min_distance": min_distance,
            }
            info.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_seconds(timings, "sample", time.perf_counter() - started)
    print(
        f"sample: picked {len(picks)} of {n_fresh} new candidates "
        f"({len(table) - n_fresh} already in the pool): {why}"
    )


if __name__ == "__main__":
    app()
