"""DVC stage `inbox`: list the input folder into a manifest that `embed` depends on.

DVC never reads the inbox itself: hashing it would open every entry, and a named
pipe there hangs `dvc repro`, a link to /dev/zero never ends, a socket or a name
that is not UTF-8 stops it. This stage runs on every `dvc repro` (always_changed)
and writes the manifest: each image's path relative to --input-dir with the
SHA-256 of its bytes, and each skipped entry with its reason. `embed` re-runs
exactly when that manifest changes: an image added, removed, renamed or moved to
another sub-folder, its bytes changed, or an entry skipped for another reason.
Timestamps, permissions and the folder's own path are not in it.

To avoid reading every file on every run, the hashes are cached in --hash-cache
(not tracked by DVC). A file is read again unless its size, mtime, ctime, inode
and device all equal the cached ones; users cannot set a ctime, so bytes rewritten
in place with the old mtime restored (`cp -p`, `rsync -t`, `tar -x`) are read
again. Files changed within 2 s before the listing are not cached (file systems
with coarse timestamps), and a cache made for another folder is ignored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from datapool.atomic import atomic_open
from datapool.console import user_errors
from datapool.images import inbox_manifest, read_hash_cache
from datapool.metrics import write_seconds

app = typer.Typer(add_completion=False)


@app.command()
def main(
    input_dir: Annotated[Path, typer.Option(help="folder of new images, searched recursively")],
    out: Annotated[Path, typer.Option(help="where the manifest (JSON) goes")],
    hash_cache: Annotated[Path, typer.Option(help="content hashes of the last listing")],
    timings: Annotated[
        Path | None, typer.Option(help="folder recording each stage's seconds")
    ] = None,
) -> None:
    """List --input-dir into --out."""
    started = time.perf_counter()
    with user_errors("inbox"):
        manifest = inbox_manifest(input_dir, known=read_hash_cache(hash_cache, root=input_dir))
        with atomic_open(out, "w") as handle:
            handle.write(manifest.to_json())
        with atomic_open(hash_cache, "w") as handle:
            handle.write(manifest.cache_json())
        write_seconds(timings, "inbox", time.perf_counter() - started)
    print(
        f"inbox: {len(manifest.images)} images under {input_dir}, "
        f"{len(manifest.skipped)} entries skipped"
    )


if __name__ == "__main__":
    app()
