"""DVC stage `merge`: fold the picks into the pool, replacing this batch's earlier rows.

pool := (pool minus rows of this batch) + picks. The picked images are copied
into the pool folder (a `persist: true` DVC output) so DVC versions them; then
the batch's shard, the manifest, the checkpoint and the derived CSV are written
as one transaction (datapool.transaction). Then, when --report-dir is given, the
files people look at (datapool.report): Lightly's lists, selection.csv and
report.html there, metrics.json (--metrics) and the plot data (--plots-dir).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from datapool.console import user_errors
from datapool.increment import (
    CANDIDATE_COLUMNS,
    batch_of,
    effective_pool,
    image_sources,
    merge_increment,
    new_candidates,
    prior_rows,
    read_picks,
)
from datapool.metrics import read_seconds, write_seconds
from datapool.report import RunFacts, write_run_report
from datapool.settings import strategies_summary
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
    selection_info: Annotated[
        Path | None, typer.Option(help="selection.json written by sample (for the report)")
    ] = None,
    report_dir: Annotated[
        Path | None, typer.Option(help="where the lists, selection.csv and report.html go")
    ] = None,
    metrics: Annotated[Path | None, typer.Option(help="where metrics.json goes")] = None,
    plots_dir: Annotated[Path | None, typer.Option(help="where the plot data goes")] = None,
    timings: Annotated[
        Path | None, typer.Option(help="folder recording each stage's seconds")
    ] = None,
) -> None:
    """Append --picks to the pool in --pool-dir."""
    started = time.perf_counter()
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
        write_seconds(timings, "merge", time.perf_counter() - started)
        if report_dir is not None and metrics is not None and plots_dir is not None:
            facts = RunFacts(
                pool_dir=pool_dir,
                prior=prior_rows(pool, batch_of(table)) if not table.empty else pool,
                after=merged,
                candidates=table,
                fresh=new_candidates(table, pool),
                picks=chosen,
                next_distance=float(_json(selection_info).get("next_distance", 0.0)),
                corrupt=_json(candidates.parent / "corrupt.json"),
                duplicates=_json(candidates.parent / "duplicates.json"),
                seconds=read_seconds(timings) if timings is not None else {},
                settings=_settings(candidates, selection_info, pool_dir, append_weak_labels),
            )
            write_run_report(
                facts, report_dir=report_dir, metrics_file=metrics, plots_dir=plots_dir
            )
    before = 0 if pool is None else len(pool)
    print(
        f"merge: pool {pool_dir} now has {len(merged)} rows "
        f"(was {before}; {len(chosen)} from this batch; "
        f"{saved.shards_written} of {len(saved.manifest.shards)} shards written)"
    )
    if note := saved.note(pool_dir):
        print(f"merge: {note}")


def _json(path: Path | None) -> dict[str, Any]:
    """A JSON object an earlier stage wrote (``{}`` when there is none)."""
    if path is None or not path.is_file():
        return {}
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _settings(
    candidates: Path, selection_info: Path | None, pool_dir: Path, weak_labels: str
) -> dict[str, Any]:
    """The run's settings as each stage recorded them (embed's settings.json beside the
    candidates, sample's selection.json), for the report: DVC passed them in, so no
    stage reads params.yaml itself."""
    info = _json(selection_info)
    return {
        "datapool.name": pool_dir.name,
        **_json(candidates.parent / "settings.json"),
        **{k: v for k, v in info.items() if k.startswith("stopping_condition.")},
        "selection.strategies": strategies_summary(info.get("strategies")),
        "stopped because": info.get("stopped_because", "?"),
        "append_weak_labels": weak_labels,
    }


if __name__ == "__main__":
    app()
