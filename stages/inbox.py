"""DVC stage `inbox`: list the input folder into a manifest that `embed` depends on.

DVC never reads the inbox itself: hashing it would open every entry, and a named
pipe there hangs `dvc repro`, a link to /dev/zero never ends, a socket or a name
that is not UTF-8 stops it. This stage runs on every `dvc repro` (always_changed):
it writes each image's content hash and each skipped entry with its reason, so
`embed` re-runs exactly when the inbox's content changes. Files whose size,
mtime and inode are unchanged since the last listing are not read again
(--hash-cache, a cache only, not tracked by DVC).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from datapool.atomic import atomic_open
from datapool.console import user_errors
from datapool.images import inbox_manifest, read_hash_cache

app = typer.Typer(add_completion=False)


@app.command()
def main(
    input_dir: Annotated[Path, typer.Option(help="folder of new images, searched recursively")],
    out: Annotated[Path, typer.Option(help="where the manifest (JSON) goes")],
    hash_cache: Annotated[Path, typer.Option(help="content hashes of the last listing")],
) -> None:
    """List --input-dir into --out."""
    with user_errors("inbox"):
        manifest = inbox_manifest(input_dir, known=read_hash_cache(hash_cache))
        with atomic_open(out, "w") as handle:
            handle.write(manifest.to_json())
        with atomic_open(hash_cache, "w") as handle:
            handle.write(manifest.cache_json())
    print(
        f"inbox: {len(manifest.images)} images under {input_dir}, "
        f"{len(manifest.skipped)} entries skipped"
    )


if __name__ == "__main__":
    app()
