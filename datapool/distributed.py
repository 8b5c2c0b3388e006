"""Process-group plumbing for running datapool across ``torch.distributed`` ranks (issue 14).

A :class:`World` names this process's place in a group: ``rank`` of ``size``
and the ``device`` its collectives use. Processes are started by ``torchrun``
(which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; :func:`init_from_env`) or by a test or benchmark through
``torch.multiprocessing`` with a shared file (:func:`init_with_file`). Without
torchrun's variables :func:`init_from_env` returns :func:`single`, a
one-process World whose collectives are the identity, so library code calls
the same functions either way.

Backends: gloo on CPU, NCCL when the World's device is CUDA. NCCL only moves
CUDA tensors and gloo (as used here) CPU ones, so every helper copies its
tensor to ``world.device`` for the collective and returns results on the
caller's device. Only gloo on CPU is tested (the project's CI has no GPU).

Data is split in contiguous slices (:func:`shard_range`): rank ``r`` holds
rows ``[lo_r, hi_r)`` and slices follow rank order, so gathering them in rank
order (:func:`all_gather_rows`, :func:`gather_in_order`) gives file order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from datapool.errors import DatapoolError, InputError

__all__ = [
    "World",
    "agree",
    "all_gather_rows",
    "check_same",
    "gather_in_order",
    "init_from_env",
    "init_with_file",
    "main_first",
    "shard_range",
    "shutdown",
    "single",
]

T = TypeVar("T")

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place in a process group.

    Attributes:
        rank: 0 .. size - 1; rank 0 writes outputs.
        size: number of processes (1: not distributed).
        device: where collective tensors must live (CPU for gloo, this
            process's CUDA device for NCCL); also the default compute device.
        backend: ``"gloo"``/``"nccl"``, or None for a one-process World (no
            process group; collectives are the identity).
    """

    rank: int
    size: int
    device: torch.device
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when a process group backs this World (even one of size 1)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes outputs."""
        return self.rank == 0


def single(device: str | torch.device = "cpu") -> World:
    """A one-process World (rank 0 of 1, no process group)."""
    return World(0, 1, torch.device(device))


def _backend_device(rank_on_node: int, device: str | None) -> tuple[str, torch.device]:
    """gloo + CPU, or NCCL + ``cuda:LOCAL_RANK`` when CUDA is wanted (default: if available)."""
    want_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not want_cuda:
        return "gloo", torch.device("cpu")
    if rank_on_node >= torch.cuda.device_count():  # one GPU per process on a machine
        raise InputError(
            f"process {rank_on_node} of this machine has no GPU of its own "
            f"({torch.cuda.device_count()} visible): set distributed.nproc to at most the "
            "number of GPUs, or embed.device=cpu"
        )
    dev = torch.device("cuda", rank_on_node)
    torch.cuda.set_device(dev)  # NCCL picks the current device for its communicator
    return "nccl", dev


def init_from_env(*, device: str | None = None) -> World:
    """The World torchrun launched this process into, or :func:`single` without torchrun.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and, through torch's
    ``env://`` rendezvous, ``MASTER_ADDR``/``MASTER_PORT``) and joins the
    default process group unless it is already initialised. ``device``:
    ``"cpu"`` forces gloo, ``"cuda"`` NCCL; default NCCL when CUDA is available.

    Raises:
        InputError: some of torchrun's variables are set but not all, or they
            are not integers / the rank is outside the world.
    """
    present = [v for v in _TORCHRUN_VARS if v in os.environ]
    if not present:
        return single(device or "cpu")
    if len(present) < len(_TORCHRUN_VARS):
        missing = sorted(set(_TORCHRUN_VARS) - set(present))
        raise InputError(f"incomplete torchrun environment: {', '.join(missing)} not set")
    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
    except ValueError as e:
        raise InputError(f"torchrun variables RANK/WORLD_SIZE/LOCAL_RANK: {e}") from e
    if not 0 <= rank < size:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={size}")
    backend, dev = _backend_device(local, device)
    if dist.is_initialized():  # joined before (e.g. by the caller): keep its backend
        return World(rank, size, dev, str(dist.get_backend()))
    dist.init_process_group(backend, rank=rank, world_size=size)
    return World(rank, size, dev, backend)


def init_with_file(path: str | Path, *, rank: int, size: int, device: str | None = "cpu") -> World:
    """Join a group that rendezvous through the file ``path`` (must not exist yet).

    For processes started by ``torch.multiprocessing`` (tests, benchmarks):
    a file needs no free TCP port, so parallel test workers never collide.
    ``rank`` doubles as the local rank for the CUDA device.
    """
    backend, dev = _backend_device(rank, device)
    dist.init_process_group(
        backend, init_method=Path(path).resolve().as_uri(), rank=rank, world_size=size
    )
    return World(rank, size, dev, backend)


def shutdown(world: World) -> None:
    """Leave the process group (no-op for a one-process World)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard_range(n: int, world: World) -> range:
    """Rows ``[lo, hi)`` of ``n`` that ``world.rank`` holds: contiguous, in rank order.

    The first ``n % size`` ranks hold one row more; ranks beyond ``n`` hold none.
    """
    if n < 0:
        raise InputError(f"cannot shard a negative number of rows: {n}")
    base, extra = divmod(n, world.size)
    lo = world.rank * base + min(world.rank, extra)
    return range(lo, lo + base + (1 if world.rank < extra else 0))


def all_gather_rows(t: torch.Tensor, world: World) -> list[torch.Tensor]:
    """Every rank's ``t`` (``[rows_r, ...]``, same trailing shape and dtype), in rank order.

    Row counts may differ between ranks (zero included): counts are gathered
    first and blocks padded to the largest. Two collectives; the result is on
    ``t``'s device.
    """
    if not world.distributed:
        return [t]
    dev = world.device
    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=dev)
    counts = [torch.empty_like(count) for _ in range(world.size)]
    dist.all_gather(counts, count)
    most = max(int(c) for c in counts)
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t
    blocks = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(blocks, padded)
    return [b[: int(c)].to(t.device) for b, c in zip(blocks, counts, strict=True)]


def gather_in_order(local: torch.Tensor, world: World) -> torch.Tensor:
    """All ranks' slices (:func:`shard_range`) concatenated: the rows in file order."""
    return torch.cat(all_gather_rows(local, world))


def agree(world: World, error: str | None, facts: Any = None) -> list[Any]:
    """Share each rank's ``facts`` and raise on every rank if any rank has an ``error``.

    Without it a rank that refuses its input would leave the others waiting
    in the next collective. Raises InputError with this rank's message, or
    the first failing rank's (prefixed with its rank). Returns every rank's
    ``facts`` in rank order (``[facts]`` for a one-process World).
    """
    shared: list[Any] = [(error, facts)]
    if world.distributed:
        shared = [None] * world.size
        dist.all_gather_object(shared, (error, facts))
    if error is not None:
        raise InputError(error)
    for r, (other, _) in enumerate(shared):
        if other is not None:
            raise InputError(f"rank {r}: {other}")
    return [f for _, f in shared]


def check_same(world: World, what: str, value: Any) -> None:
    """Raise on every rank unless every rank holds an equal ``value`` (any picklable).

    For what each rank resolved on its own and must not differ: the stage it runs,
    the model settings an ``auto`` chose from its machine's files. The message names
    ``what`` and the first rank that differs from rank 0. One collective.
    """
    values = agree(world, None, value)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise InputError(
                f"the processes disagree on {what}: rank 0 has {values[0]!r}, rank {rank} "
                f"{other!r} (every machine needs the same files and settings)"
            )


def main_first(world: World, step: Callable[[], T]) -> T:
    """``step()`` on rank 0, then on every other rank; its result on each.

    For a step that may change shared files (the pool's crash recovery): rank 0 does
    it alone, and the others only run it (then a no-op) once rank 0 has finished.
    An error on rank 0 is raised on every rank, so none is left waiting.
    """
    if not world.is_main:
        agree(world, None)  # raises "rank 0: ..." when rank 0's step failed
        return step()
    try:
        result = step()
    except Exception as err:
        message = str(err) if isinstance(err, DatapoolError) else f"{type(err).__name__}: {err}"
        with contextlib.suppress(InputError):  # tell the others, then raise the original here
            agree(world, message)
        raise
    agree(world, None)
    return result
