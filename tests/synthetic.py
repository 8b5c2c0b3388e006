"""Synthetic pools for tests that need many rows fast: random unit embeddings, real small files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd


def candidate_rows(
    inbox: Path, n: int, *, dim: int, seed: int, batch: str, label: str = ""
) -> tuple[pd.DataFrame, dict[str, Path]]:
    """``n`` candidate rows (the embed stage's layout) whose files exist in ``inbox``.

    Each file holds random bytes, so its content hash is real; returns the table
    and ``{content_hash: file}``.
    """
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = pd.DataFrame(vectors, columns=[f"embedding_{i}" for i in range(dim)])
    inbox.mkdir(parents=True, exist_ok=True)
    names, hashes = [f"{batch}_{i}.png" for i in range(n)], []
    for name in names:
        data = rng.bytes(64)
        (inbox / name).write_bytes(data)
        hashes.append(hashlib.sha256(data).hexdigest())
    table.insert(0, "filenames", names)
    table["labels"] = label
    table["content_hash"] = hashes
    table["batch_id"] = batch
    table["model_id"] = "m"
    table["source"] = str(inbox)
    return table, {h: inbox / name for h, name in zip(hashes, names, strict=True)}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path: two equal snapshots are equal folders."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def write_unchecked(folder: Path, table: pd.DataFrame) -> None:
    """Store ``table`` as the pool of ``folder`` (shards + manifest) without any check,
    as a hand edit, a bad tool or an attacker would leave it; the old shards go."""
    import shutil

    from datapool.store import MANIFEST, SHARDS, plan_version, write_rows

    plan = plan_version(table, None)
    shutil.rmtree(folder / SHARDS, ignore_errors=True)
    for name, rows in plan.writes.items():
        write_rows(rows, folder / name)
    (folder / MANIFEST).write_text(plan.manifest.to_json(), encoding="utf-8")
