"""Benchmark sharded greedy k-center (issue 14): 1 vs 2 CPU ranks, and the one-process engine.

Each case writes its random unit-normalised float32 data once to ``.npy``
files (``--data-dir``, default a temporary folder) that every process
memory-maps, so two ranks share one copy in the page cache. Then:

* ``k_center_greedy`` in this process, one thread: the named peer;
* ``k_center_greedy_sharded`` on 1 and on 2 gloo ranks (spawned, one thread
  each, FileStore rendezvous), timed inside the ranks from a barrier after
  start-up and data mapping to a barrier after the last pick.

It prints seconds, the 2-rank/1-rank ratio, each against the peer, and
whether the picks are identical to the peer's (they must be); per rank the
CPU seconds it got (below the wall time: the rank waited, for the other
ranks or for a core on a busy host) and rank 0's seconds in the serial pick
phases (the part more ranks do not shorten). Cases:

* ``select``: ``--rows`` candidates x ``--dim``, no pool, ``--k`` picks;
* ``inc``: issue 10's increment, 10k candidates x 128 into a 1M-row pool,
  10k picks (``bench/selection.py --cases inc-1m``), which splits the pool.

Examples:
    python bench/distributed.py                            # 1M x 128, k=1000, and inc
    python bench/distributed.py --cases select --rows 10000000 --k 1000
    flock -x /tmp/datapool-bench.lock python bench/distributed.py --cases inc
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datapool import selection_sharded
from datapool.distributed import World, init_with_file, shutdown
from datapool.selection import k_center_greedy
from datapool.selection_sharded import k_center_greedy_sharded


def make(path: Path, n: int, d: int, seed: int) -> Path:
    """Random unit rows [n, d] float32 in ``path`` (.npy), written in blocks; reused if present."""
    if path.exists():
        return path
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    rng = np.random.default_rng(seed)
    for s in range(0, n, 1 << 18):
        b = rng.standard_normal((min(n - s, 1 << 18), d), dtype=np.float32)
        out[s : s + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
    out.flush()
    del out
    return path


def _load(path: str | None) -> np.ndarray | None:
    return None if path is None else np.load(path, mmap_mode="r")


def _timed_decide() -> list[float]:
    """Accumulate the seconds rank 0 spends in the serial pick phase (instrumentation)."""
    total = [0.0]
    inner = selection_sharded._decide

    def timed(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args)
        finally:
            total[0] += time.perf_counter() - t

    selection_sharded._decide = timed  # type: ignore[assignment]
    return total


def _rank(rank: int, size: int, store: str, data: tuple[str, str | None], k: int, out: str) -> None:
    """One rank: join, map the data, time the sharded selection between two barriers."""
    torch.set_num_threads(1)
    world: World = init_with_file(store, rank=rank, size=size)
    try:
        x, pool = _load(data[0]), _load(data[1])
        decide = _timed_decide()
        dist.barrier()
        t0, c0 = time.perf_counter(), time.process_time()
        sel = k_center_greedy_sharded(x, pool=pool, world=world, n_samples=k)
        cpu = time.process_time() - c0
        dist.barrier()
        seconds = time.perf_counter() - t0
        result = {"seconds": seconds, "cpu": cpu, "decide": decide[0]}
        if rank == 0:
            result["indices"] = sel.indices.tolist()
        Path(out).with_suffix(f".{rank}.json").write_text(json.dumps(result))
    finally:
        shutdown(world)


def sharded(size: int, data: tuple[str, str | None], k: int, tmp: Path) -> dict[str, Any]:
    """Run the selection on ``size`` spawned ranks; rank 0's seconds and picks."""
    run = tmp / f"run-{size}-{time.monotonic_ns()}"
    run.mkdir()
    out = run / "result.json"
    spawn(_rank, args=(size, str(run / "store"), data, k, str(out)), nprocs=size)  # type: ignore[no-untyped-call]
    ranks = [json.loads(out.with_suffix(f".{r}.json").read_text()) for r in range(size)]
    result: dict[str, Any] = ranks[0]
    result["cpu"] = [r["cpu"] for r in ranks]
    return result


def run_case(
    name: str, data: tuple[Path, Path | None], k: int, ranks: list[int], tmp: Path, peer: bool
) -> None:
    """Peer, then each rank count; print one table."""
    x, pool = _load(str(data[0])), _load(None if data[1] is None else str(data[1]))
    assert x is not None
    shape = f"{x.shape[0]:,} x {x.shape[1]}" + ("" if pool is None else f", pool {pool.shape[0]:,}")
    print(f"\n{name}: {shape}, k={k}, load {os.getloadavg()[0]:.2f}", flush=True)
    t_peer, want = math.nan, None
    if peer:
        t0 = time.perf_counter()
        want = k_center_greedy(x, pool=pool, n_samples=k, threads=1).indices.tolist()
        t_peer = time.perf_counter() - t0
        print(f"  k_center_greedy (one process, 1 thread): {t_peer:8.2f} s", flush=True)
    paths = (str(data[0]), None if data[1] is None else str(data[1]))
    times: dict[int, float] = {}
    for size in ranks:
        got = sharded(size, paths, k, tmp)
        times[size] = got["seconds"]
        same = "not compared" if want is None else "identical"
        if want is not None and got["indices"] != want:
            same = "DIFFERENT"
        ratios = [] if want is None else [f"{got['seconds'] / t_peer:.2f}x peer"]
        if size != ranks[0]:
            ratios.append(f"{got['seconds'] / times[ranks[0]]:.2f}x of {ranks[0]} rank")
        cpu = "/".join(f"{c:.1f}" for c in got["cpu"])
        print(
            f"  sharded, {size} rank(s) x 1 thread:       {got['seconds']:8.2f} s"
            f"{f' ({chr(44).join(ratios)})' if ratios else ''}; picks {same}; "
            f"CPU s per rank {cpu}, rank 0's serial pick phases {got['decide']:.1f} s; "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", nargs="+", choices=["select", "inc"], default=["select", "inc"])
    ap.add_argument("--rows", type=int, default=1_000_000, help="candidates of 'select'")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=1000, help="picks of 'select' (inc: 10,000)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--data-dir", type=Path, help="keep the generated .npy files here")
    ap.add_argument("--no-peer", action="store_true", help="skip the one-process engine")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="datapool-dist-") as tmp_name:
        tmp = Path(tmp_name)
        data_dir = args.data_dir or tmp
        data_dir.mkdir(parents=True, exist_ok=True)
        if "select" in args.cases:
            x = make(data_dir / f"x-{args.rows}x{args.dim}.npy", args.rows, args.dim, 0)
            run_case("select", (x, None), args.k, args.ranks, tmp, not args.no_peer)
        if "inc" in args.cases:
            x = make(data_dir / "inc-x-10000x128.npy", 10_000, 128, 1)
            pool = make(data_dir / "inc-pool-1000000x128.npy", 1_000_000, 128, 2)
            run_case("inc (issue 10)", (x, pool), 10_000, args.ranks, tmp, not args.no_peer)


if __name__ == "__main__":
    main()
