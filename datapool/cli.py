"""The ``datapool`` command: make a workspace, run increments, try the bundled example.

This module is the only part of the package that imports typer; ``import
datapool`` does not load it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer
from ruamel.yaml import YAML

from datapool.console import user_errors
from datapool.errors import InputError
from datapool.workspace import create_workspace, run_increment, set_params

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

EXAMPLE_DIR = Path(__file__).resolve().parent / "examples" / "digits"


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """``["a.b=0.1", "c=true"]`` -> ``{"a.b": 0.1, "c": True}`` (values parsed as YAML scalars)."""
    parsed: dict[str, object] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise InputError(f"expected KEY=VALUE, got {pair!r}")
        parsed[key.strip()] = YAML(typ="safe").load(text) if text.strip() else ""
    return parsed


@app.command()
def init(workspace: Annotated[Path, typer.Argument(help="new folder for the workspace")]) -> None:
    """Create a workspace: git + DVC, the pipeline (dvc.yaml, stages/) and params.yaml."""
    with user_errors("init"):
        create_workspace(workspace)
    print(f"init: workspace ready in {workspace}; set input_dir in params.yaml, then `dvc repro`")


@app.command()
def run(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="settings as KEY=VALUE, e.g. datapool.name=cats")
    ] = None,
    input_dir: Annotated[Path | None, typer.Option(help="folder of new images")] = None,
    workspace: Annotated[Path, typer.Option(help="the workspace folder")] = Path(),
) -> None:
    """Write settings to params.yaml, run the pipeline, and commit the pool as a revision."""
    with user_errors("run"):
        settings = parse_overrides(overrides or [])
        if input_dir is not None:
            settings["input_dir"] = str(input_dir.resolve())
        set_params(workspace / "params.yaml", settings)
        name, source = _current(workspace)
        step = run_increment(workspace, name=name, input_dir=source)
    print(f"run: {step.message(source)}")


def _current(workspace: Path) -> tuple[str, str]:
    """(datapool.name, input_dir) as params.yaml has them now."""
    params = YAML(typ="safe").load((workspace / "params.yaml").read_text(encoding="utf-8"))
    return str(params["datapool"]["name"]), str(params["input_dir"])


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
        # The digits are 32 px: a 64 px crop keeps the example quick on a laptop CPU.
        set_params(where / "params.yaml", {"embed.image_size": 64})
        for batch in ("batch_1", "batch_2"):
            source = str(EXAMPLE_DIR / batch)
            set_params(where / "params.yaml", {"input_dir": source})
            step = run_increment(where, name="my_datapool", input_dir=source)
            print(f"demo: {step.message(batch)}")
    print(
        f"demo: done. The workspace is {where}: see `git log`, `dvc params diff HEAD~1`, "
        f"and {where / 'pools' / 'my_datapool' / 'datapool_latest.csv'}"
    )
