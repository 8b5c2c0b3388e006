"""The model a pool is embedded with: pick it, train it, and keep the pool consistent with it.

A pool's rows all carry the id of one model. When this run's model differs
from the one that embedded the pool (after training, or a first bootstrap),
the pool's own stored images are embedded again, so old and new embeddings are
never compared with each other.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from datapool.distributed import World, single
from datapool.embedding.distributed_training import train_contrastive_distributed
from datapool.embedding.inference import (
    EmbeddedBatch,
    auto_image_size,
    discover_batch,
    embed_folder,
)
from datapool.embedding.model import (
    EmbeddingModel,
    ModelConfig,
    load_checkpoint,
    model_for_pool,
    model_id,
    resolve_weights,
    save_checkpoint,
)
from datapool.embedding.sharded import embed_files_sharded
from datapool.embedding.training import train_contrastive
from datapool.errors import InputError, PoolError
from datapool.images import ImageFile
from datapool.increment import batch_identity
from datapool.packs import extract_images
from datapool.pool import CHECKPOINT, embedding_columns, known_embeddings
from datapool.store import read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Training:
    """Self-supervised training settings (SimCLR, see :mod:`datapool.embedding.training`).

    Attributes:
        epochs: epochs on the pool's images plus the new batch on every run; 0 = off.
        bootstrap_epochs: epochs on the first batch when a pool starts with a
            randomly initialised model (``weights=none``), so its embeddings carry
            meaning on an offline machine; 0 = keep the random model.
        learning_rate: peak AdamW learning rate.
        batch_size: images per training step (each gives two views).
        max_images: the bootstrap trains on at most this many images of the first
            batch (a seeded sample), so its cost stays bounded on a CPU.
        max_image_size: the bootstrap runs only for models of at most this many pixels
            (``image_size``); a larger new model with random weights is not
            bootstrapped (a warning says so), and ``image_size: auto`` stays at most
            this size when a new model will be bootstrapped (:func:`resolve_image_size`).

    Decision (issue 12): the bootstrap is bounded in compute, not only in epochs: at
    most ``max_images x bootstrap_epochs`` two-view steps of at most 64 px. 28-32 px
    images train exactly as measured in docs/BENCHMARKS.md (2,000 images x 5 epochs at
    32 px); 640x480 photos get a 64 px model (~2 min of bootstrap on a 2-core CPU with
    bf16, instead of ~17 min at 224 px). Training 64 px views and embedding at 224 px
    (FixRes, Touvron et al. 2019) was measured and rejected: on upscaled digits it was
    worse than no bootstrap at all (docs/BENCHMARKS.md, "First run on CPU").
    """

    epochs: int = 0
    bootstrap_epochs: int = 0
    learning_rate: float = 1e-3
    batch_size: int = 128
    max_images: int = 2000
    max_image_size: int = 64


@contextmanager
def pool_images(pool_dir: Path, pool: pd.DataFrame) -> Iterator[list[Path]]:
    """The pool's images as files, in row order, in a scratch folder removed on exit.

    Decision: the images are copied out of their packs (:mod:`datapool.packs`) because
    training and embedding decode files by path; this costs a copy of the pool's images
    in the system's temp folder, only when the model changes (a retrain re-embeds every
    row anyway). Each is read by :class:`datapool.packs.PoolImages` (the pool's pack,
    else the original, checked against its content hash). Raises :class:`PoolError`
    naming the image (and pack) that cannot be read.
    """
    with tempfile.TemporaryDirectory(prefix="datapool-pool-images-") as tmp:
        try:
            paths = extract_images(pool_dir, pool, Path(tmp))
        except PoolError as err:
            raise PoolError(
                f"{err}; the pool's images are needed to re-embed the pool with a new model. "
                "Run `dvc pull` or `dvc checkout`, or keep training off (embed.train_epochs=0)"
            ) from err
        yield paths


def choose_model(
    *,
    pool_dir: Path,
    pool: pd.DataFrame | None,
    wanted: ModelConfig,
    seed: int,
    training: Training,
    input_dir: Path,
    device: torch.device,
    world: World | None = None,
) -> EmbeddingModel:
    """This run's model: the pool's (or a new one), trained if the settings say so.

    A new pool with random weights (``wanted.weights`` resolving to ``none``, see
    :func:`~datapool.embedding.model.resolve_weights`) of at most
    ``training.max_image_size`` pixels is bootstrapped on the images of ``input_dir``;
    with ``training.epochs`` every run trains on the pool's images plus those.
    Pretrained weights (a name or a file) skip the bootstrap.
    """
    has_model = (pool_dir / CHECKPOINT).exists()
    random_init = resolve_weights(wanted.weights, wanted.arch).lower() == "none"
    model = model_for_pool(pool_dir / CHECKPOINT, wanted=wanted, seed=seed)
    with ExitStack() as scratch:
        if training.epochs:
            pooled = scratch.enter_context(pool_images(pool_dir, pool)) if pool is not None else []
            images, epochs = [*pooled, *_batch(input_dir)], training.epochs
        elif not has_model and random_init and training.bootstrap_epochs:
            if wanted.image_size > training.max_image_size:
                logger.warning(
                    "no bootstrap: embed.image_size=%d is above the %d px a bootstrap trains "
                    "at on a CPU budget; the new model keeps random weights. Use "
                    "embed.image_size=auto (or <= %d), or pretrained embed.weights",
                    wanted.image_size, training.max_image_size, training.max_image_size,
                )  # fmt: skip
                return model
            images, epochs = (
                _sample(_batch(input_dir), training.max_images, seed),
                training.bootstrap_epochs,
            )
        else:
            return model
        if world is not None and world.size > 1:  # the global batch split across ranks
            return train_contrastive_distributed(
                model,
                images,
                world=world,
                epochs=epochs,
                batch_size=training.batch_size,
                learning_rate=training.learning_rate,
                seed=seed,
            )
        return train_contrastive(
            model,
            images,
            epochs=epochs,
            batch_size=training.batch_size,
            learning_rate=training.learning_rate,
            seed=seed,
            device=device,
        )


def resolve_image_size(
    setting: str | int, *, pool_dir: Path, input_dir: Path, seed: int, cap: int | None = None
) -> tuple[int, str]:
    """``embed.image_size`` as pixels, and where that number came from.

    An integer (or its text) is used as given: a pool whose checkpoint disagrees
    keeps refusing it in :func:`~datapool.embedding.model.model_for_pool`. ``"auto"``
    is the pool's checkpoint's size once the pool has a model (so a pool never
    changes size), else :func:`~datapool.embedding.inference.auto_image_size` of
    ``input_dir``'s images, at most ``cap`` (the caller passes
    ``Training.max_image_size`` when the new model will be bootstrapped from random
    weights). Returns ``(pixels, "setting"|"checkpoint"|"images")``.
    Raises :class:`InputError` for any other text and
    :class:`~datapool.errors.CheckpointError` for an unreadable checkpoint.
    """
    text = str(setting).strip().lower()
    if text != "auto":
        if not text.isdigit():
            raise InputError(f"embed.image_size must be auto or a whole number, got {setting!r}")
        return int(text), "setting"
    if (pool_dir / CHECKPOINT).exists():
        model, _ = load_checkpoint(pool_dir / CHECKPOINT)
        return model.config.image_size, "checkpoint"
    size = auto_image_size(_batch(input_dir), seed=seed)
    return (size if cap is None else min(size, cap)), "images"


def _batch(input_dir: Path) -> list[Path]:
    files, _ = discover_batch(input_dir)  # embed_folder lists the skipped ones
    return [item.path for item in files]


def _sample(paths: list[Path], limit: int, seed: int) -> list[Path]:
    """At most ``limit`` of ``paths``, drawn without replacement by ``seed``, in path order."""
    if len(paths) <= limit:
        return paths
    chosen = np.random.default_rng(seed).choice(len(paths), size=limit, replace=False)
    return [paths[i] for i in sorted(chosen)]


def reembed_pool(
    *,
    pool_dir: Path,
    pool: pd.DataFrame,
    model: EmbeddingModel,
    model_id: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    world: World | None = None,
) -> pd.DataFrame | None:
    """The pool's rows embedded by ``model``; None if they already are.

    Uses the pool's stored images (:func:`pool_images`). Raises :class:`PoolError`
    if one is missing or can no longer be decoded.
    """
    if pool.empty or set(pool["model_id"]) == {model_id}:
        return None
    with pool_images(pool_dir, pool) as paths:
        files = [ImageFile(path=p, relpath=p.name, label="") for p in paths]
        vectors, failed = embed_files_sharded(
            files,
            model=model,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            world=world or single(device),
        )
    if failed:
        name, reason = next(iter(failed.items()))
        row = pool.iloc[int(Path(name).stem)]  # extracted as <position><ext>
        raise PoolError(
            f"the pool's image of {row['filenames']!r} ({row['content_hash'][:12]}) cannot be "
            f"decoded: {reason}"
        )
    table = pool.copy()
    table[embedding_columns(model.config.embedding_dim)] = np.stack(
        [vectors[f.relpath] for f in files]
    )
    table["model_id"] = model_id
    return table


@dataclass(frozen=True)
class IncrementEmbeddings:
    """What ``embed`` produces for one increment.

    Attributes:
        model_id: id of the model everything below was embedded with (saved
            to the checkpoint path given to :func:`embed_increment`).
        batch: the new images' embeddings, corrupt list and duplicates.
        reembedded: the pool's rows embedded again by this model, or None when
            the pool already was (or does not exist yet).
    """

    model_id: str
    batch: EmbeddedBatch
    reembedded: pd.DataFrame | None


def embed_increment(
    *,
    pool_dir: Path,
    pool: pd.DataFrame | None,
    input_dir: Path,
    wanted: ModelConfig,
    seed: int,
    training: Training,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    checkpoint: Path,
    world: World | None = None,
) -> IncrementEmbeddings:
    """Choose (and train) the model, save it to ``checkpoint``, re-embed the pool if the
    model changed, then embed ``input_dir`` reusing the pool's embeddings of the same images.
    The batch's id is the increment's (:func:`~datapool.increment.batch_identity`).

    Raises :class:`~datapool.errors.DatapoolError` subclasses with the cause.
    """
    model = choose_model(
        pool_dir=pool_dir,
        pool=pool,
        wanted=wanted,
        seed=seed,
        training=training,
        input_dir=input_dir,
        device=device,
        world=world,
    )
    main = world is None or world.is_main  # rank 0 writes; every rank needs the id
    mid = save_checkpoint(model, checkpoint) if main else model_id(model)
    refreshed = None
    if pool is not None:
        refreshed = reembed_pool(
            pool_dir=pool_dir,
            pool=pool,
            model=model,
            model_id=mid,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            world=world,
        )
    current = refreshed if refreshed is not None else pool
    batch = embed_folder(
        input_dir=input_dir,
        model=model,
        known=known_embeddings(current, model_id=mid),
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        world=world,
    )
    # The folder's content names the batch, unless an earlier increment had that content.
    manifest = read_manifest(pool_dir)
    latest = manifest.latest_batch if manifest is not None else ""
    increment_id = batch_identity(content_id=batch.batch_id, pool=current, latest=latest)
    batch = replace(batch, batch_id=increment_id)
    return IncrementEmbeddings(model_id=mid, batch=batch, reembedded=refreshed)
