"""DVC stage `merge`: fold the picks into the pool, replacing this batch's earlier rows.

pool := (pool minus rows of this batch) + picks. The picked images are copied
into the pool folder (a `persist: true` DVC output) so DVC versions them; then
the batch's shard, the manifest, the checkpoint and the derived CSV are written
as one transaction (datapool.transaction).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from datapool.console import user_errors
from datapool.increment import (
    CANDIDATE_COLUMNS,
    batch_of,
    effective_pool,
    image_sources,
    merge_increment,
    read_picks,
)
from datapool.store import read_any
from datapool.transaction import CSV_MAX_ROWS, open_pool, save_pool

app = typer.Typer(add_completion=False)


@app.command()
def main(
    candidates: Annotated[Path, typer.Option(help="candidates written by embed")],
    picks: Annotated[Path, typer.Option(help="picks written by sample")],
    checkpoint: Annotated[Path, typer.Option(help="model.ckpt written by embed")],
    pool_dir: Annotated[Path, typer.Option(help="the pool folder, pools/NAME")],
    lock_file: Annotated[Path, typer.Option(help="dvc.lock, to detect a pool not yet pulled")],
    reembedded_pool: Annotated[
        Path, typer.Option(help="the pool re-embedded by embed; used instead when it exists")
    ],
    append_weak_labels: Annotated[
        Literal["true", "false"],
        typer.Option(case_sensitive=False, help="label each row with its sub-folder name"),
    ] = "true",
    csv_max_rows: Annotated[
        int, typer.Option(min=0, help="write datapool_latest.csv up to this many rows; 0 = never")
    ] = CSV_MAX_ROWS,
) -> None:
    """Append --picks to the pool in --pool-dir."""
    with user_errors("merge"):
        pool = effective_pool(open_pool(pool_dir, lock_file=lock_file), reembedded_pool)
        table = read_any(candidates, required=CANDIDATE_COLUMNS)
        chosen = read_picks(picks)
        merged = merge_increment(
            pool, table, chosen, weak_labels=append_weak_labels.lower() == "true"
        )
        saved = save_pool(
            pool_dir,
            merged,
            checkpoint=checkpoint,
            sources=image_sources(table),
            csv_max_rows=csv_max_rows,
            # No candidates (nothing in the inbox decoded): no batch id; keep the record.
            latest_batch=batch_of(table) if not table.empty else None,
        )
    before = 0 if pool is None else len(pool)
    print(
        f"merge: pool {pool_dir} now has {len(merged)} rows "
        f"(was {before}; {len(chosen)} from this batch; "
        f"{saved.shards_written} of {len(saved.manifest.shards)} shards written)"
    )
    if note := saved.note(pool_dir):
        print(f"merge: {note}")


if __name__ == "__main__":
    app()
