"""Embedding a folder across ``torch.distributed`` ranks: each rank hashes and embeds its slice.

:func:`hash_files_sharded` and :func:`embed_files_sharded` are drop-in
replacements for :func:`~datapool.embedding.inference.hash_files` and
:func:`~datapool.embedding.inference.embed_files` taking a
:class:`~datapool.distributed.World`: every rank passes the same full list of
files (every rank discovers the same folder, as in ``stages/sample.py``), works
on its contiguous slice (:func:`~datapool.distributed.shard_range`), and ends
with exactly what one process returns for the whole list: hashes in file order,
``{relpath: vector}`` of every decodable file, and every rank's
unreadable/undecodable files with their reasons. With a one-process World they
call the one-process functions unchanged.

Equality with one process, measured on CPU (tests/embedding/test_sharded.py):
hashes and failures are equal by construction; embeddings are computed in eval
mode, where a row does not depend on the other rows of its batch; moving the
batch boundaries changes only the last bits of a row, through kernels that
block differently for some batch sizes. Observed with resnet18 at 32 px:
rows that meet a batch of the same size are bit-identical, others differ by up
to 1.4e-6 (batches of 1, 2 or 5 rows against 4); the tests assert 1e-4.

Decisions:

* Vectors travel as one float32 tensor of the slice's rows (zeros where the
  file failed) through :func:`~datapool.distributed.gather_in_order`, so the
  gather is one collective of ``N x D`` floats, on the World's device (NCCL
  moves CUDA tensors); failures are small dicts and go through
  ``all_gather_object``. Hashes travel as 32 raw bytes per file plus a
  validity byte, not as pickled strings.
* Before slicing, the ranks compare a digest of the file list: a rank that
  discovered a different folder (another machine's copy, a file added
  meanwhile) would otherwise embed the wrong slice silently.
* An error on one rank (a model or device failure) is shared with the others
  through :func:`~datapool.distributed.agree` before the next collective, so no
  rank waits forever for one that has died; the failing rank re-raises its own
  exception, the others raise :class:`~datapool.errors.InputError` naming it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from datapool.distributed import World, agree, gather_in_order, shard_range
from datapool.embedding.inference import embed_files, hash_files
from datapool.embedding.model import EmbeddingModel
from datapool.errors import InputError
from datapool.images import ImageFile

__all__ = ["check_same_files", "embed_files_sharded", "hash_files_sharded"]

T = TypeVar("T")

_DIGEST_BYTES = 32  # sha256


def check_same_files(files: Sequence[ImageFile], world: World) -> None:
    """Raise :class:`InputError` on every rank unless all ranks hold the same file list.

    Compares a sha256 of the relative paths (in order); one small collective.
    """
    digest = hashlib.sha256("\n".join(f.relpath for f in files).encode()).hexdigest()
    facts = agree(world, None, (len(files), digest))
    if any(f != facts[0] for f in facts):
        counts = ", ".join(f"rank {r}: {n} files" for r, (n, _) in enumerate(facts))
        raise InputError(
            f"the ranks discovered different image lists ({counts}); every rank must see "
            "the same input folder"
        )


def _all_gather_object(obj: Any, world: World) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` without a process group)."""
    if not world.distributed:
        return [obj]
    shared: list[Any] = [None] * world.size
    dist.all_gather_object(shared, obj)
    return shared


def _agreed(world: World, work: Callable[[], T]) -> T:
    """``work()``, after every rank has said whether its own ``work()`` failed.

    A failing rank re-raises its exception; the others raise InputError naming
    that rank (see :func:`~datapool.distributed.agree`).
    """
    try:
        result, failure = work(), None
    except Exception as err:
        result, failure = None, err
    try:
        agree(world, None if failure is None else f"{type(failure).__name__}: {failure}")
    except InputError:
        if failure is not None:
            raise failure from None
        raise
    return result  # type: ignore[return-value]  # set whenever no rank failed


def hash_files_sharded(
    files: Sequence[ImageFile], *, world: World, threads: int = 8
) -> tuple[list[str | None], dict[str, str]]:
    """:func:`~datapool.embedding.inference.hash_files` of ``files``, shared across ``world``.

    Every rank passes the same ``files`` and gets the whole result: each file's
    sha256 hex digest in file order (None where unreadable) and ``{relpath:
    reason}`` of the unreadable files of every rank.

    Raises:
        InputError: the ranks' file lists differ.
    """
    if world.size == 1:
        return hash_files(files, threads=threads)
    check_same_files(files, world)
    part = shard_range(len(files), world)
    local, failures = _agreed(
        world, lambda: hash_files(files[part.start : part.stop], threads=threads)
    )
    packed = torch.zeros((len(local), 1 + _DIGEST_BYTES), dtype=torch.uint8)
    for row, digest in enumerate(local):
        if digest is not None:
            packed[row, 0] = 1
            packed[row, 1:] = torch.frombuffer(bytearray(bytes.fromhex(digest)), dtype=torch.uint8)
    rows = gather_in_order(packed, world).numpy()
    hashes = [bytes(row[1:]).hex() if row[0] else None for row in rows]
    merged: dict[str, str] = {}
    for part_failures in _all_gather_object(failures, world):
        merged.update(part_failures)
    return hashes, merged


def embed_files_sharded(
    files: Sequence[ImageFile],
    *,
    model: EmbeddingModel,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    world: World,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """:func:`~datapool.embedding.inference.embed_files` of ``files``, shared across ``world``.

    Every rank passes the same ``files`` and embeds its slice with ``model`` on
    ``device`` (a CUDA World: this rank's GPU); every rank returns the whole
    result: ``{relpath: [D] float32}`` of the decodable files of all ranks and
    ``{relpath: reason}`` of the rest.

    Raises:
        InputError: the ranks' file lists differ, or another rank failed.
    """
    if world.size == 1:
        return embed_files(
            files, model=model, batch_size=batch_size, num_workers=num_workers, device=device
        )
    check_same_files(files, world)
    part = shard_range(len(files), world)
    mine = files[part.start : part.stop]
    computed, failed = _agreed(
        world,
        lambda: embed_files(
            mine, model=model, batch_size=batch_size, num_workers=num_workers, device=device
        ),
    )
    dim = model.config.embedding_dim
    block = np.zeros((len(mine), dim), np.float32)
    for row, item in enumerate(mine):
        if item.relpath in computed:
            block[row] = computed[item.relpath]
    vectors = gather_in_order(torch.from_numpy(block), world).numpy()
    merged: dict[str, str] = {}
    for part_failed in _all_gather_object(failed, world):
        merged.update(part_failed)
    out = {item.relpath: vectors[i] for i, item in enumerate(files) if item.relpath not in merged}
    return out, merged
