"""DVC stage `sample`: choose among the new candidates, conditioned on the pool.

Plain greedy k-center by default; the strategies and inputs of params.yaml's
`selection` block when --selection-inputs (select_inputs' listing) names them.
Writes the picks (picks.arrow) -- filenames, content_hash, pick_rank, pick_distance
and a score_<strategy> per objective -- in pick order, so the cut-off can be moved
later without re-running selection, and beside them (--info, selection.json) what
the report needs from the selection: the distance at which it stopped
(next_distance), how many candidates were new, why it stopped, the stopping
condition and the strategies it ran with.

SIMILARITY's query images are embedded here, with embed's checkpoint (the model
that embedded this run's candidates), not in `embed`: a changed query folder then
re-runs only this stage, never the embedding (and training) of the whole inbox.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from datapool.console import user_errors
from datapool.errors import DatapoolError, PoolError
from datapool.increment import (
    CANDIDATE_COLUMNS,
    SelectionInputs,
    StoppingCondition,
    choose_increment,
    describe_stop,
    effective_pool,
)
from datapool.launch import Launch, relaunch
from datapool.metrics import write_seconds
from datapool.store import read_any, write_any
from datapool.transaction import open_pool

if TYPE_CHECKING:
    from datapool.distributed import World

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
    proportion_samples: Annotated[
        float, typer.Option(help="or after this share (0-1) of the new candidates; 0 = off")
    ] = 0.0,
    min_distance: Annotated[
        float, typer.Option(help="stop when the farthest candidate is closer; 0 = off")
    ] = 0.0,
    selection_inputs: Annotated[
        Path | None, typer.Option(help="select_inputs' listing; none = plain diversity")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option(help="embed's model.ckpt, to embed the query images")
    ] = None,
    device: Annotated[str, typer.Option(help="where query images are embedded")] = "auto",
    info: Annotated[
        Path | None, typer.Option(help="where selection.json goes (for the report)")
    ] = None,
    timings: Annotated[
        Path | None, typer.Option(help="folder recording each stage's seconds")
    ] = None,
    processes: Annotated[int, typer.Option(help="processes per machine sharing the work")] = 1,
    machines: Annotated[int, typer.Option(help="machines taking part")] = 1,
    rendezvous: Annotated[
        str, typer.Option(help="host:port where the machines meet (machines > 1)")
    ] = "",
) -> None:
    """Pick the most diverse of --candidates into --out."""
    started = time.perf_counter()
    with user_errors("sample"):
        status = relaunch(Launch(processes, machines, rendezvous))
    if status is not None:  # the workers did the work (and reported any error)
        raise SystemExit(status)
    with user_errors("sample"):
        from datapool.distributed import agree, main_first, shutdown  # torch: after relaunch

        stop = StoppingCondition(n_samples, min_distance, proportion_samples)
        world = _world(device)
        # Rank 0 alone may finish an interrupted save (recovery moves files); then the rest.
        pool = main_first(world, lambda: open_pool(pool_dir, lock_file=lock_file))
        try:  # a rank that cannot read its inputs must not leave the others waiting
            pool = effective_pool(pool, reembedded_pool)
            table = read_any(candidates, required=CANDIDATE_COLUMNS)
            selection = _selection(selection_inputs, checkpoint, device, table)
        except DatapoolError as err:
            agree(world, str(err))
            raise
        agree(world, None)
        choice = choose_increment(table, pool, stop, selection, world=world)
        shutdown(world)
        if not world.is_main:  # rank 0 writes; the others only shared the work
            return
        picks, n_fresh = choice.picks, choice.fresh
        write_any(picks, out)
        why = describe_stop(picks, n_fresh=n_fresh, stop=stop, reason=choice.reason)
        if info is not None:
            record = {
                "next_distance": choice.next_distance,
                "fresh": n_fresh,
                "stopped_because": why,
                "reason": choice.reason,
                "preselected": choice.preselected,
                "stopping_condition.n_samples": n_samples,
                "stopping_condition.proportion_samples": proportion_samples,
                "stopping_condition.min_distance": min_distance,
                "strategies": choice.strategies,
            }
            info.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        write_seconds(timings, "sample", time.perf_counter() - started)
    print(
        f"sample: picked {len(picks)} of {n_fresh} new candidates "
        f"({len(table) - n_fresh} already in the pool): {why}"
    )


def _world(device: str) -> World:
    """This process's place among the ranks torchrun started (a World of one without it).

    Every rank runs the selection with the same inputs: plain diversity and typicality's
    neighbour search are shared (:func:`datapool.strategies.select`), the rest of the
    combination loop runs whole on each rank; rank 0 writes. The ranks first check that
    they all run this stage (machines meet at one address for every stage).
    """
    from datapool.distributed import check_same, init_from_env

    world = init_from_env(device=None if device == "auto" else device)
    check_same(world, "the stage they run", "sample")
    return world


def _selection(
    listing: Path | None, checkpoint: Path | None, device: str, table: Any
) -> SelectionInputs:
    """The selection inputs select_inputs listed (plain diversity when there is no listing)."""
    if listing is None or not listing.is_file():
        return SelectionInputs()
    from datapool.strategy_config import parse_strategies

    listed = json.loads(listing.read_text(encoding="utf-8"))
    chosen = listed.get("selection", {})

    def path(key: str) -> Path | None:
        return Path(chosen[key]) if chosen.get(key) else None

    queries = None
    if chosen.get("query_dir"):
        queries = _queries(Path(chosen["query_dir"]), checkpoint, device, table)
    return SelectionInputs(
        strategies=parse_strategies(chosen.get("strategies")),
        scores_file=path("scores_file"),
        relevant_file=path("relevant_filenames_file"),
        masked_file=path("masked_file"),
        selected_file=path("selected_file"),
        queries=queries,
        seed=int(chosen.get("seed", 0)),
    )


def _queries(folder: Path, checkpoint: Path | None, device: str, table: Any) -> np.ndarray:
    """The images of ``folder`` embedded by embed's checkpoint (the candidates' model).

    Raises InputError for a folder without images, PoolError if the checkpoint is
    missing or is not the model that embedded the candidates.
    """
    from datapool.embedding.inference import embed_folder, resolve_device
    from datapool.embedding.model import load_checkpoint

    if checkpoint is None:
        raise PoolError("selection.query_dir is set but sample was given no --checkpoint")
    model, mid = load_checkpoint(checkpoint)
    models = set(table["model_id"]) if len(table) else {mid}
    if models != {mid}:
        raise PoolError(
            f"{checkpoint} is model {mid} but the candidates were embedded by {sorted(models)}; "
            "run `dvc repro -f`"
        )
    batch = embed_folder(
        input_dir=folder,
        model=model,
        known={},
        batch_size=64,
        num_workers=0,
        device=resolve_device(device),
    )
    return batch.embeddings


if __name__ == "__main__":
    app()
