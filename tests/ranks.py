"""Run a function on several real gloo ranks (torch.multiprocessing, FileStore rendezvous).

A file in the test's tmp dir replaces a TCP port, so tests running in
parallel (pytest-xdist) never collide. The ranks are *forked*: a spawned
rank re-imports torch (~3 s each on the 2-core machine, ~9 s for a 2-rank
test), a forked one starts at once. Forking is safe here because each rank
runs with one torch thread (no OpenMP pool is entered in the child) and
joins a fresh process group. A deadline turns a hung rank into a failure.
The function receives the :class:`datapool.distributed.World` and writes
whatever the test compares into files.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.spawn import start_processes

from datapool.distributed import World, init_with_file, shutdown

_DEADLINE = 120.0  # seconds for a whole group; far beyond what the tests need


def _main(rank: int, fn: Callable[..., None], size: int, store: str, args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)
    world = init_with_file(store, rank=rank, size=size)
    try:
        fn(world, *args)
    finally:
        shutdown(world)


def run_ranks(fn: Callable[..., None], size: int, tmp: Path, *args: Any) -> None:
    """Run ``fn(world, *args)`` on ``size`` gloo CPU ranks; re-raises a rank's failure."""
    store = tmp / "rendezvous"
    assert not store.exists(), "one rendezvous file per group"
    ctx = start_processes(  # type: ignore[no-untyped-call]
        _main, args=(fn, size, str(store), args), nprocs=size, join=False, start_method="fork"
    )
    end = time.monotonic() + _DEADLINE
    while not ctx.join(timeout=max(0.1, end - time.monotonic())):
        if time.monotonic() > end:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{size} ranks of {fn.__name__} still running after {_DEADLINE} s")


def world_of(rank: int, size: int) -> World:
    """A World with no process group, for pure functions of (rank, size)."""
    return World(rank, size, torch.device("cpu"))
