"""Combining two pools into a new one, and writing a new pool folder from a table.

``combine(A, B)`` = A's rows, then B's rows whose image (content hash) A does
not hold, optionally thinned by greedy k-center. Embeddings of different models
are never compared: when A and B were embedded by different models, B's rows
are re-embedded from their images with A's model (``reembed=True``) or the
combine is refused.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from datapool.errors import PoolError
from datapool.increment import StoppingCondition
from datapool.packs import PoolImages, Source, extract_images
from datapool.pool import (
    CHECKPOINT,
    POOL_CSV,
    column_order,
    embedding_columns,
    embedding_dim,
    embeddings_of,
    read_pool,
)


@dataclass(frozen=True)
class Combined:
    """The result of :func:`combine_pools`.

    Attributes:
        table: the new pool's rows (pool layout).
        checkpoint: the model file whose embeddings ``table`` holds, or None (imported pools).
        duplicates: rows of the second pool dropped because the first holds their image.
        reembedded: rows of the second pool re-embedded with the first pool's model.
        thinned: rows dropped by the diversity thinning.
    """

    table: pd.DataFrame
    checkpoint: Path | None
    duplicates: int
    reembedded: int
    thinned: int


def load(pool_dir: Path) -> pd.DataFrame:
    """A pool that must exist; :class:`PoolError` naming the folder otherwise."""
    table = read_pool(pool_dir)
    if table is None:
        raise PoolError(f"there is no pool in {pool_dir} (no {POOL_CSV})")
    return table


def models(table: pd.DataFrame) -> set[str]:
    """The model ids a pool's rows were embedded by."""
    return {str(m) for m in table["model_id"]}


def same_space(first: pd.DataFrame, second: pd.DataFrame) -> bool:
    """True when both tables' embeddings come from one model (so distances compare)."""
    if first.empty or second.empty:
        return True
    return models(first) == models(second) and embedding_dim(first) == embedding_dim(second)


def reembed(
    table: pd.DataFrame, *, pool_dir: Path, checkpoint: Path, device: str = "auto"
) -> pd.DataFrame:
    """``table`` with every row re-embedded from its image by the model in ``checkpoint``.

    Images are read by :class:`datapool.packs.PoolImages` (the pool's pack, else the
    original) into a scratch folder. Raises :class:`PoolError` naming the first row
    whose image is missing, changed or unreadable.
    """
    from datapool.embedding.inference import embed_folder, resolve_device
    from datapool.embedding.model import load_checkpoint

    model, mid = load_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="datapool-reembed-") as tmp:
        try:
            extract_images(pool_dir, table, Path(tmp))
        except PoolError as err:
            raise PoolError(f"cannot re-embed the images of {pool_dir}: {err}") from err
        batch = embed_folder(
            input_dir=Path(tmp),
            model=model,
            known={},
            batch_size=64,
            num_workers=0,
            device=resolve_device(device),
        )
    vectors = dict(zip(batch.hashes, batch.embeddings, strict=True))
    lost = [h for h in table["content_hash"] if h not in vectors]
    if lost:
        row = table[table["content_hash"] == lost[0]].iloc[0]
        raise PoolError(
            f"cannot re-embed {row['filenames']!r} of {pool_dir}: the image changed since it was "
            f"pooled or does not decode ({len(lost)} such image(s))"
        )
    out = table.drop(columns=embedding_columns(embedding_dim(table)))
    values = np.stack([vectors[h] for h in table["content_hash"]])
    cols = embedding_columns(values.shape[1])
    out = pd.concat([out, pd.DataFrame(values, columns=cols, index=out.index)], axis=1)
    out["model_id"] = mid
    return out.reindex(columns=column_order(values.shape[1]))


def thin(table: pd.DataFrame, stop: StoppingCondition) -> pd.DataFrame:
    """The rows greedy k-center keeps under ``stop``, in their original order."""
    from datapool.selection import k_center_greedy

    chosen = k_center_greedy(
        embeddings_of(table),
        n_samples=stop.n_samples or None,
        min_distance=stop.min_distance or None,
    )
    return table.iloc[np.sort(chosen.indices)].reset_index(drop=True)


def _mismatch(first_dir: Path, second_dir: Path, first: pd.DataFrame, second: pd.DataFrame) -> str:
    return (
        f"{first_dir} was embedded by model(s) {sorted(models(first))} "
        f"(dimension {embedding_dim(first)}) and {second_dir} by {sorted(models(second))} "
        f"(dimension {embedding_dim(second)}); embeddings of different models are never "
        "mixed. Combine with --reembed to embed the second pool's images with the first "
        "pool's model"
    )


def combine_pools(
    first_dir: Path,
    second_dir: Path,
    *,
    reembed_second: bool = False,
    stop: StoppingCondition | None = None,
    device: str = "auto",
) -> Combined:
    """Combine two pools (read from their folders) into one table; writes nothing.

    Rows of ``second_dir`` whose content hash ``first_dir`` holds are dropped.
    Raises :class:`PoolError` when the models differ and ``reembed_second`` is
    False, or re-embedding is impossible (no checkpoint, missing images).
    """
    first, whole = load(first_dir), load(second_dir)
    second = whole[~whole["content_hash"].isin(set(first["content_hash"]))]
    duplicates = len(whole) - len(second)
    checkpoint = first_dir / CHECKPOINT
    if not checkpoint.is_file():  # e.g. an imported pool: use the other's model, if same space
        checkpoint = second_dir / CHECKPOINT
    reembedded = 0
    if not same_space(first, second):
        if not reembed_second:
            raise PoolError(_mismatch(first_dir, second_dir, first, second))
        model_file = first_dir / CHECKPOINT
        if not model_file.is_file():
            raise PoolError(
                f"{first_dir} has no {CHECKPOINT} (an imported pool?), so its model cannot embed "
                f"the images of {second_dir}; put the pool with a checkpoint first"
            )
        second = reembed(second, pool_dir=second_dir, checkpoint=model_file, device=device)
        checkpoint, reembedded = model_file, len(second)
    parts = [t for t in (first, second) if not t.empty]
    table = pd.concat(parts, ignore_index=True) if parts else first
    table = table.reindex(columns=column_order(embedding_dim(first)))
    before = len(table)
    if stop is not None and not table.empty:
        table = thin(table, stop)
    return Combined(
        table=table,
        checkpoint=checkpoint if checkpoint.is_file() else None,
        duplicates=duplicates,
        reembedded=reembedded,
        thinned=before - len(table),
    )


def images_of(pool_dirs: list[Path], table: pd.DataFrame) -> dict[str, Source]:
    """content hash -> where its image is (a member of a pool's pack, or a file), looking
    in each pool in turn (first found wins), for :func:`datapool.transaction.create_pool`,
    which checks each against its hash as it packs it. Only the hashes of ``table``."""
    wanted = set(table["content_hash"].astype(str))
    found: dict[str, Source] = {}
    for pool_dir in pool_dirs:
        pooled = read_pool(pool_dir)
        images = PoolImages(pool_dir)  # locate() opens no pack: nothing to close
        for _, row in (pooled if pooled is not None else table.iloc[:0]).iterrows():
            digest = str(row["content_hash"])
            if digest in found or digest not in wanted:
                continue
            source = images.locate(row)
            if not isinstance(source, Path) or source.is_file():
                found[digest] = source
    return found
