"""The ``datapool`` command: workspaces, increments, history, restore, combine, export/import.

Every pool version is a git revision of a workspace (a git + DVC repository);
see ``datapool COMMAND --help``. This module is the only part of the package
that imports typer; ``import datapool`` does not load it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from datapool.console import user_errors
from datapool.errors import InputError
from datapool.increment import StoppingCondition
from datapool.layout import REPORT_FILES, PoolPaths, pool_dir
from datapool.revisions import Revision, history
from datapool.settings import check_existing_pool_name, check_value, parse_settings
from datapool.sharing import fetch_all_versions, push_all_versions
from datapool.tools import run_tool
from datapool.version import add_pool, locked, recover, restore_version, workspace_lock
from datapool.workspace import check_workspace, create_workspace, run_with_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

EXAMPLE_DIR = Path(__file__).resolve().parent / "examples" / "digits"
Workspace = Annotated[Path, typer.Option(help="the workspace folder")]
Remote = Annotated[str | None, typer.Option(help="DVC remote (default: the default remote)")]


def _checked(workspace: Path, *names: str) -> None:
    """Check the workspace and that the pool names stay inside pools/ (new names get
    the strict rule from check_new_name)."""
    check_workspace(workspace)
    for name in names:
        check_existing_pool_name(name)


@app.command()
def init(workspace: Annotated[Path, typer.Argument(help="new folder for the workspace")]) -> None:
    """Create a workspace: git + DVC, the pipeline (dvc.yaml, stages/) and params.yaml."""
    with user_errors("init"):
        create_workspace(workspace)
    print(f"init: workspace ready in {workspace}; next: datapool run --input-dir FOLDER")


@app.command()
def run(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="settings as KEY=VALUE, e.g. stopping_condition.min_distance=0.1"),
    ] = None,
    input_dir: Annotated[Path | None, typer.Option(help="folder of new images")] = None,
    nproc: Annotated[
        int | None,
        typer.Option(help="processes sharing the work (distributed.nproc; torchrun)"),
    ] = None,
    workspace: Workspace = Path(),
) -> None:
    """Write settings to params.yaml, run the pipeline, and commit the pool as a revision.

    Every setting is checked before anything runs; a failed run leaves params.yaml
    as it was. One command at a time per workspace: a second is refused. With
    datapool.keep_history=false nothing is committed and the pool's earlier
    versions are dropped from the DVC cache.
    """
    with user_errors("run"):
        check_workspace(workspace)
        settings = parse_settings(overrides or [])
        if input_dir is not None:
            settings["input_dir"] = str(input_dir.resolve())
            check_value("input_dir", settings["input_dir"])
        if nproc is not None:
            settings["distributed.nproc"] = check_value("distributed.nproc", nproc)
        step, done = run_with_settings(workspace, settings)
    keep = done.keep_history
    note = "" if keep else f" (keep_history=false: not committed; {step.history_note})"
    print(f"run: {step.message(done.input_dir)}{note}")


def _changes(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()) or "-"


def _count(value: int | None, sign: str = "") -> str:
    return "?" if value is None else f"{sign}{value}"


def format_history(revisions: list[Revision]) -> list[str]:
    """One line per revision: revision, date, rows, added, removed, the strategies that
    picked its new rows (``-`` when no pipeline run made it: combine, import), changed
    parameters."""
    width = max([len("picked by"), *(len(r.strategies) for r in revisions)])
    lines = [
        f"{'revision':<9} {'date':<25} {'rows':>5} {'added':>6} {'removed':>7}  "
        f"{'picked by':<{width}}  changed"
    ]
    for r in revisions:
        lines.append(
            f"{r.rev[:7]:<9} {r.date:<25} {_count(r.rows):>5} {_count(r.added, '+'):>6} "
            f"{_count(r.removed, '-'):>7}  {r.strategies or '-':<{width}}  {_changes(r.changed)}"
        )
    if any(r.rows is None for r in revisions):
        lines.append("? = that version is not in the local DVC cache (dvc pull, or dropped)")
    return lines


@app.command(name="history")
def history_command(
    name: Annotated[str, typer.Argument(help="the pool (datapool.name)")],
    workspace: Workspace = Path(),
) -> None:
    """List every revision of a pool: revision, date, rows, added, parameters that changed."""
    with user_errors("history"):
        check_workspace(workspace)
        revisions = history(workspace, check_existing_pool_name(name))
        if not revisions:
            raise InputError(f"pool {name} has no revisions in {workspace}")
    print("\n".join(format_history(revisions)))


@app.command(name="restore")
def restore_command(
    name: Annotated[str, typer.Argument(help="the pool (datapool.name)")],
    rev: Annotated[str, typer.Argument(help="the revision to bring back (see history)")],
    workspace: Workspace = Path(),
) -> None:
    """Bring a pool's version at REV back, recorded as a new revision (nothing is lost)."""
    with user_errors("restore"):
        # An existing pool: names from before the strict rule (`my pool`) stay restorable.
        _checked(workspace, name)
        done = restore_version(workspace, name, rev)
    print(
        f"restore: pool {name} is back at its {rev} version ({done.rows} rows), "
        f"revision {(done.revision or '?')[:7]}"
    )


@app.command()
def combine(
    first: Annotated[str, typer.Argument(help="the first pool; its model is kept")],
    second: Annotated[str, typer.Argument(help="the second pool")],
    into: Annotated[str, typer.Option(help="name of the new, combined pool")],
    reembed: Annotated[
        bool, typer.Option(help="re-embed the second pool's images if its model differs")
    ] = False,
    n_samples: Annotated[int, typer.Option(help="thin to this many rows; 0 = no limit")] = 0,
    min_distance: Annotated[
        float, typer.Option(help="thin until the farthest row is closer than this; 0 = off")
    ] = 0.0,
    device: Annotated[str, typer.Option(help="device for re-embedding")] = "auto",
    workspace: Workspace = Path(),
) -> None:
    """Combine two pools into a new one: duplicate images dropped, optionally thinned."""
    from datapool.combine import combine_pools, images_of
    from datapool.transaction import create_pool

    with user_errors("combine"):
        _checked(workspace, first, second, into)
        stop = (
            StoppingCondition(n_samples=n_samples, min_distance=min_distance)
            if n_samples or min_distance
            else None
        )
        sources = [pool_dir(workspace, first), pool_dir(workspace, second)]

        def make(folder: Path) -> str:
            done = combine_pools(*sources, reembed_second=reembed, stop=stop, device=device)
            files = images_of(sources, done.table)
            create_pool(folder, done.table, sources=files, checkpoint=done.checkpoint)
            return (
                f"pool {into}: {len(done.table)} rows combined from {first} and {second} "
                f"({done.duplicates} duplicates dropped, {done.reembedded} re-embedded, "
                f"{done.thinned} thinned out)"
            )

        summary = add_pool(workspace, into, command="combine", make=make)
    print(f"combine: {summary}")


@app.command(name="export")
def export_command(
    name: Annotated[str, typer.Argument(help="the pool to export")],
    out: Annotated[Path, typer.Option(help="folder to write into")],
    workspace: Workspace = Path(),
) -> None:
    """Write a pool as Lightly's embeddings CSV, a file list and a folder of its images."""
    from datapool.exchange import export_pool

    with user_errors("export"):
        check_workspace(workspace)
        done = export_pool(pool_dir(workspace, check_existing_pool_name(name)), out)
    print(f"export: {done.rows} rows of pool {name} -> {done.csv}, {done.file_list}, {done.images}")


@app.command(name="import")
def import_command(
    csv: Annotated[Path, typer.Argument(help="a Lightly embeddings CSV")],
    name: Annotated[str, typer.Option(help="name of the new pool")],
    images: Annotated[
        Path | None,
        typer.Option(
            help="folder the CSV's filenames are relative to [default: images/ "
            "beside the CSV if it exists, else the CSV's folder]"
        ),
    ] = None,
    workspace: Workspace = Path(),
) -> None:
    """Create a pool from a Lightly embeddings CSV and its images."""
    from datapool.exchange import IMAGES, import_pool

    with user_errors("import"):
        _checked(workspace, name)
        folder = images or (csv.parent / IMAGES if (csv.parent / IMAGES).is_dir() else csv.parent)

        def make(pool: Path) -> str:
            rows, duplicates = import_pool(csv, folder, pool)
            return f"pool {name}: {rows} rows imported from {csv.name} ({duplicates} duplicates)"

        summary = add_pool(workspace, name, command="import", make=make)
    print(f"import: {summary}")


@app.command(name="label")
def label_command(
    name: Annotated[str, typer.Argument(help="the pool to edit")],
    edits: Annotated[
        Path,
        typer.Argument(
            help="CSV of edits: a key column and the columns to set (pools/NAME/"
            "datapool_latest.csv, edited, is one)"
        ),
    ],
    key: Annotated[
        str | None,
        typer.Option(
            help="column naming the rows to edit: content_hash or filenames "
            "(default: content_hash if EDITS has that column, else filenames)"
        ),
    ] = None,
    workspace: Workspace = Path(),
) -> None:
    """Set labels and columns of your own from a CSV, recorded as a new revision.

    EDITS names each row to edit by its key and sets `labels` and any column of
    your own (a new one is added to every row, empty where not given; an empty
    cell sets ""). datapool's own columns (filenames, embedding_*, content_hash,
    batch_id, model_id, source, pick_rank, pick_distance) cannot be edited: one
    is ignored when every cell equals the pool's, refused when one differs. So
    you can edit pools/NAME/datapool_latest.csv in a spreadsheet and pass it back
    (it is then written anew from the new version). A key matching no row, or a
    file name matching several, is refused; nothing is written on a refusal.
    """
    from datapool.labels import label_pool

    with user_errors("label"):
        _checked(workspace, name)
        done = label_pool(workspace, name, edits, key=key)
    print(f"label: {done.line()}")


@app.command(name="recover")
def recover_command(workspace: Workspace = Path()) -> None:
    """Finish or roll back a command that was killed midway (every command does this first)."""
    with user_errors("recover"):
        check_workspace(workspace)
        with workspace_lock(workspace):
            line = recover(workspace, report=lambda _: None)
    print(f"recover: {line or 'nothing to do: no command was interrupted'}")


@app.command()
def worker(
    node: Annotated[int, typer.Option(help="this machine's number: 1 .. distributed.nnodes - 1")],
    stage: Annotated[
        list[str] | None,
        typer.Option(help="stage to join, repeatable, in order (default: embed, then sample)"),
    ] = None,
    workspace: Workspace = Path(),
) -> None:
    """Lend this machine to a run on several machines (distributed.nnodes > 1).

    Machine 0 runs `datapool run`; every other machine runs `datapool worker --node N`
    in the same workspace, on a shared file system at the same path (a stage reads what
    the one before it wrote on machine 0). It waits until machine 0 starts each stage,
    computes its share, and writes nothing; joined to another stage than machine 0's,
    every process stops with a message.
    """
    import yaml

    from datapool.launch import run_worker

    with user_errors("worker"):
        check_workspace(workspace)
        params = yaml.safe_load((workspace / "params.yaml").read_text(encoding="utf-8")) or {}
        nnodes = int((params.get("distributed") or {}).get("nnodes", 1))
        stages = stage or ["embed", "sample"]
        for name in stages:
            status = run_worker(workspace, name, node=node, nnodes=nnodes)
            if status != 0:
                raise InputError(f"stage {name} failed on this machine (exit status {status})")
    print(f"worker: machine {node} took part in {', '.join(stages)}")


@app.command()
def push(
    remote: Annotated[
        str | None, typer.Option(help="DVC remote (default: the default one)")
    ] = None,
    workspace: Workspace = Path(),
) -> None:
    """Upload every committed pool version to the DVC remote (not only the current one)."""
    with user_errors("push"):
        check_workspace(workspace)
        sent, failed = push_all_versions(workspace, remote=remote)
    print(f"push: {sent} objects uploaded, {failed} failed")
    if failed:
        raise typer.Exit(1)


@app.command()
def pull(
    remote: Annotated[
        str | None, typer.Option(help="DVC remote (default: the default one)")
    ] = None,
    workspace: Workspace = Path(),
) -> None:
    """Download every committed pool version, then check out the current one."""
    with user_errors("pull"):
        _checked(workspace)
        with locked(workspace):
            received, failed = fetch_all_versions(workspace, remote=remote)
            run_tool(["dvc", "checkout"], cwd=workspace)
    print(f"pull: {received} objects downloaded, {failed} failed")
    if failed:
        raise typer.Exit(1)


@app.command()
def demo(
    workspace: Annotated[
        Path | None,
        typer.Option(help="where to build the example workspace (default: a new temp folder)"),
    ] = None,
) -> None:
    """Grow a pool from the bundled digits in two increments, each a DVC-tracked revision."""
    with user_errors("demo"):
        where = workspace or Path(tempfile.mkdtemp(prefix="datapool-demo-"))
        create_workspace(where)
        for batch in ("batch_1", "batch_2"):
            # As `datapool run` does: settings checked, workspace locked, params.yaml
            # put back if the run fails. Default settings otherwise: image_size auto
            # sees the 32 px digits and embeds them at 32 px.
            settings = {"datapool.name": "my_datapool", "input_dir": str(EXAMPLE_DIR / batch)}
            step, _ = run_with_settings(where, settings)
            print(f"demo: {step.message(batch)}")
    page = where / PoolPaths("my_datapool").report / REPORT_FILES["html"]
    print(
        f"demo: done. The workspace is {where}: see `datapool history my_datapool`, "
        f"`dvc params diff HEAD~1`, {pool_dir(where, 'my_datapool') / 'datapool_latest.csv'}, "
        f"and the last run's report (open it in a browser): {page}"
    )


if __name__ == "__main__":
    app()
