"""DVC stage `select_inputs`: check the selection settings and list their input files.

`sample` must re-run when a selection input changes: the score CSV, the relevant,
masked or pre-selected file lists, the query images. They are optional, and an
empty or absent path cannot be a DVC dependency (DVC refuses a dep that does not
exist, and `${selection.scores_file}` would be "" there). So, as `inbox` does for
the input folder, this stage runs on every `dvc repro` (always_changed) and writes
one small JSON that `sample` depends on: the checked `selection` block and the
SHA-256 of each configured file, and each query image's path and hash. An unset
input is simply absent from it; a configured one that is missing, or a query
folder without images, stops the run here, before anything is picked.

It also carries the `selection` block to `sample`: DVC cannot put a list of
mappings (`selection.strategies`) on a command line ("Cannot interpolate nested
iterable"), so this stage reads that one block of --params, which dvc.yaml
declares under its `params:` (dvc.lock records it; nothing is read behind DVC's back).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from datapool.atomic import atomic_open
from datapool.console import user_errors
from datapool.errors import InputError
from datapool.images import content_hash, inbox_manifest
from datapool.metrics import write_seconds
from datapool.settings import check_selection, load_params

app = typer.Typer(add_completion=False)

FILE_KEYS = ("scores_file", "relevant_filenames_file", "masked_file", "selected_file")


def listing(selection: dict[str, Any]) -> dict[str, Any]:
    """The JSON `sample` depends on: the checked ``selection`` block, each configured
    file's hash and each query image's hash. InputError for a missing file or a
    query folder that is missing or holds no images."""
    files = {}
    for key in FILE_KEYS:
        path = selection.get(key) or ""
        if not path:
            continue
        if not Path(path).is_file():
            raise InputError(f"selection.{key}: the file {path} does not exist")
        files[key] = {"path": path, "sha256": content_hash(Path(path))}
    out: dict[str, Any] = {"selection": selection, "files": files}
    query_dir = selection.get("query_dir") or ""
    if query_dir:
        if not Path(query_dir).is_dir():
            raise InputError(f"selection.query_dir: {query_dir} is not a folder")
        images = inbox_manifest(Path(query_dir)).images
        if not images:
            raise InputError(f"selection.query_dir: {query_dir} holds no images")
        out["queries"] = {"path": query_dir, "images": [list(i) for i in images]}
    return out


@app.command()
def main(
    params: Annotated[Path, typer.Option(help="params.yaml (only its selection block is read)")],
    out: Annotated[Path, typer.Option(help="where the listing (JSON) goes")],
    timings: Annotated[
        Path | None, typer.Option(help="folder recording each stage's seconds")
    ] = None,
) -> None:
    """Check the selection settings of --params and list their inputs into --out."""
    started = time.perf_counter()
    with user_errors("select_inputs"):
        data = load_params(params.read_text(encoding="utf-8"))
        selection = check_selection(data if isinstance(data, dict) else {}, source=str(params))
        listed = listing(selection)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(out, "w") as handle:
            handle.write(json.dumps(listed, indent=1, ensure_ascii=False) + "\n")
        write_seconds(timings, "select_inputs", time.perf_counter() - started)
    strategies = [s.get("strategy") for s in selection.get("strategies") or []]
    print(
        f"select_inputs: strategies {', '.join(map(str, strategies)) or 'diversity (plain)'}; "
        f"{len(listed['files'])} input file(s), "
        f"{len(listed.get('queries', {}).get('images', []))} query image(s)"
    )


if __name__ == "__main__":
    app()
