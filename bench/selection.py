"""Benchmark datapool's k-center selection against lightly-mundig and a textbook loop.

Every case runs all engines on the same random unit-normalised float32 data in
one process, checks that the picks agree, and prints time, peak extra memory
(RSS above the level before the call, sampled every 5 ms) and ratios, plus the
memory-bandwidth bound of "one streaming pass over the data per pick".

Example:
    python bench/selection.py --cases 100k 1m --k 1000
    python bench/selection.py --cases pool --skip textbook
    python bench/selection.py --cases inc-1m --k 10000 --skip lightly --threads 2
    python bench/selection.py --cases 10m 10m-f16 --skip lightly textbook
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory import measure, peak_rss  # bench/memory.py, beside this script

from datapool.selection import k_center_greedy

# name: (n candidates, dim, pool rows, storage dtype)
CASES = {
    "100k": (100_000, 128, 0, np.float32),
    "1m": (1_000_000, 64, 0, np.float32),
    "pool": (1_000_000, 128, 100_000, np.float32),
    "inc-1m": (10_000, 128, 1_000_000, np.float32),  # one increment into a 1M-row pool
    "10m": (10_000_000, 128, 0, np.float32),
    "10m-f16": (10_000_000, 128, 0, np.float16),
}


def make(n: int, d: int, dtype: Any, seed: int) -> np.ndarray:
    """Random unit vectors [n, d], generated and normalised in blocks."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=dtype)
    for s in range(0, n, 1 << 18):
        b = rng.standard_normal((min(n - s, 1 << 18), d), dtype=np.float32)
        x[s : s + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return x


def textbook(x: np.ndarray, pool: np.ndarray | None, k: int) -> np.ndarray:
    """Plain numpy running-min loop: one pass (x @ c) over all rows per pick."""
    xn = np.einsum("ij,ij->i", x, x)
    d2 = np.full(len(x), np.inf, dtype=np.float32)
    if pool is not None:
        for s in range(0, len(pool), 1024):
            p = pool[s : s + 1024]
            g = xn[:, None] + np.einsum("ij,ij->i", p, p)[None] - 2 * (x @ p.T)
            np.minimum(d2, g.min(axis=1), out=d2)
    picks = []
    for _ in range(k):
        i = int(np.argmax(d2))
        picks.append(i)
        np.minimum(d2, xn + xn[i] - 2 * (x @ x[i]), out=d2)
    return np.array(picks)


def lightly(x: np.ndarray, pool: np.ndarray | None, k: int) -> np.ndarray:
    """lightly-mundig's Rust engine; the pool is passed as preselected rows."""
    import lightly_mundig  # type: ignore[import-untyped]

    emb = x if pool is None else np.concatenate([pool, x])
    m = 0 if pool is None else len(pool)
    sel = lightly_mundig.Selection()
    sel.add_diversifying_strategy(emb, 1.0)
    out = sel.run_selection(list(range(m)), len(emb), m + k)
    return np.array(out[m:]) - m


def pass_bound(x: np.ndarray, k: int) -> tuple[float, float]:
    """Seconds for k streaming passes (x @ c, best of 5) and the GB/s achieved."""
    t = torch.from_numpy(x)
    c = t[0].float()

    def one_pass() -> None:
        if t.dtype == torch.float32:
            t @ c
        else:  # convert block by block, as the selection does (no full float32 copy)
            for s in range(0, len(t), 1 << 16):
                t[s : s + (1 << 16)].float() @ c

    best = min(_timed(one_pass) for _ in range(5))
    return best * k, x.nbytes / best / 1e9


def gemm_floor(x: np.ndarray, pool: np.ndarray) -> float:
    """Seconds for the bare pool pass: blocked ``addmm`` + running min, nothing else.

    No exact engine conditioned on the pool can beat it (every candidate-pool
    distance is needed once); the engine's ratio to it is its overhead.
    """
    t, p = torch.from_numpy(x), torch.from_numpy(pool)
    best = torch.full((len(t),), float("inf"))

    def one_pass() -> None:
        for s in range(0, len(p), 1024):
            c = p[s : s + 1024]
            g = torch.addmm((c * c).sum(dim=1).unsqueeze(0), t, c.T, alpha=-2.0)
            torch.minimum(best, g.amin(dim=1), out=best)

    return _timed(one_pass)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    """'identical', or where the pick sequences first differ and the overlap."""
    if len(a) == len(b) and np.array_equal(a, b):
        return "identical"
    first = next(
        (i for i, (u, v) in enumerate(zip(a, b, strict=False)) if u != v), min(len(a), len(b))
    )
    common = len(np.intersect1d(a, b)) / max(1, len(a))
    return f"first differs at pick {first}, {common:.0%} of picks shared"


def run_case(name: str, k: int, skip: set[str], seed: int, threads: int) -> None:
    """Time every engine on one case and print a report."""
    n, d, m, dtype = CASES[name]
    x = make(n, d, dtype, seed)
    pool = make(m, d, dtype, seed + 1) if m else None
    gb = x.nbytes / 1e9
    print(f"\n== {name}: {n:,} x {d} {np.dtype(dtype).name} ({gb:.2f} GB), pool {m:,}, k={k}")
    print(f"  load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")
    bound, bw = pass_bound(x, k)
    print(f"  one pass per pick at measured bandwidth ({bw:.1f} GB/s): {bound:.2f} s")
    sel, t_ours, mem = measure(lambda: k_center_greedy(x, pool=pool, n_samples=k, threads=threads))
    ours = sel.indices
    radius = sel.min_distances[-1]
    print(f"  datapool      {t_ours:8.2f} s  peak +{mem / 1e6:8.1f} MB  radius {radius:.4f}")
    print(f"  vs bandwidth bound: {bound / t_ours:.1f}x faster")
    if pool is not None and x.dtype == np.float32:
        floor = gemm_floor(x, pool)
        print(
            f"  bare pool pass (addmm + min, {torch.get_num_threads()} threads): {floor:.2f} s;"
            f" datapool takes {t_ours / floor:.2f}x that"
        )
    print(f"  process peak RSS {peak_rss() / 1e9:.2f} GB, load average {os.getloadavg()[0]:.2f}")
    if pool is not None and "float32" not in skip:  # the same engine, float32 pool pass
        same, t, mem = measure(
            lambda: k_center_greedy(
                x, pool=pool, n_samples=k, threads=threads, pool_precision="float32"
            )
        )
        equal = np.array_equal(sel.min_distances, same.min_distances)
        print(
            f"  float32 pass  {t:8.2f} s  peak +{mem / 1e6:8.1f} MB  ratio {t / t_ours:5.1f}x"
            f"  picks: {agreement(ours, same.indices)}{'' if equal else ' (distances differ)'}"
        )
    others = {"lightly": lightly, "textbook": textbook}
    for other, fn in others.items():
        if other in skip:
            continue
        xs = x.astype(np.float32) if x.dtype != np.float32 else x
        ps = None if pool is None else pool.astype(np.float32)
        picks, t, mem = measure(lambda fn=fn, xs=xs, ps=ps: fn(xs, ps, k))  # type: ignore[misc]
        print(
            f"  {other:12s}  {t:8.2f} s  peak +{mem / 1e6:8.1f} MB  ratio {t / t_ours:5.1f}x"
            f"  picks: {agreement(ours, picks)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["100k", "1m"])
    ap.add_argument("--k", type=int, default=1000, help="picks per case (default 1000)")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["lightly", "textbook", "float32"],
        help="engines to leave out (float32: datapool with pool_precision='float32', the peer"
        " of its bfloat16 pool pass on CPUs that compute bf16 natively)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for datapool's blocked passes and the bare pool pass (default 1, "
        "k_center_greedy's default; the textbook loop uses numpy's own)",
    )
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    for name in args.cases:
        torch.set_num_threads(args.threads)  # the bare pool pass runs on torch's setting
        run_case(name, args.k, set(args.skip), args.seed, args.threads)


if __name__ == "__main__":
    main()
