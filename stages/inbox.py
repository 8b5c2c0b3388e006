"""DVC stage `inbox`: list the input folder into a manifest that `embed` depends on.

DVC never reads the inbox itself: hashing it would open every entry, and a named
pipe there hangs `dvc repro`, a link to /dev/zero never ends, a socket or a name
that is not UTF-8 stops it. This stage runs on every `dvc repro` (always_changed)
and only stats files; `embed` re-runs when the manifest's content changes (an
image added, removed, renamed, rewritten or touched, or a skipped entry).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapool.atomic import atomic_open
from datapool.console import user_errors
from datapool.images import inbox_manifest

app = typer.Typer(add_completion=False)


@app.command()
def main(
    input_dir: Annotated[Path, typer.Option(help="folder of new images, searched recursively")],
    out: Annotated[Path, typer.Option(help="where the manifest (JSON) goes")],
) -> None:
    """List --input-dir into --out."""
    with user_errors("inbox"):
        manifest = inbox_manifest(input_dir)
        with atomic_open(out, "w") as handle:
            handle.write(manifest.to_json())
    print(
        f"inbox: {len(manifest.images)} images under {input_dir}, "
        f"{len(manifest.skipped)} entries skipped"
    )


if __name__ == "__main__":
    app()
