"""Benchmark the combination loop of datapool.strategies against plain k-center.

One process, one data set (random unit-normalised float32 rows, or Gaussian
clusters with ``--data clustered``), no pool:

* diversity x typicality: :func:`datapool.strategies.typicality` (k-NN density,
  exact up to the reference sample size, sampled above it), then
  :func:`datapool.strategies.combine` (lazy: a top set kept exact per pick,
  stale distances as bounds elsewhere), timed separately and together: the
  same work :func:`datapool.strategies.select` does for this configuration;
* typicality behind diversity's radius guard (``--guard``, default 0.9, 0 skips
  it; diversity strength ``--guard-strength``, default 0): issue 12's proposed
  default, timed against the unguarded loop;
* HERDING, the default (:func:`datapool.herding.herd_and_cover`, ``--no-herding``
  skips it): kernel-herding picks kept while greedy k-center, continued from
  them, covers within ``radius`` times plain k-center's radius;
* the named peer, plain diversity through :func:`datapool.selection.k_center_greedy`
  (the exact fast path ``select`` keeps for it), on the same data;
* optionally (``--diversity-loop``) diversity alone through ``combine``, which
  must give the peer's picks: the price of the general loop; and
  (``--full-loop``) the combinations with one pass over the candidates per pick,
  which must give the lazy loop's picks.

Prints wall time, peak RSS above the start of each call, the load average and
the ratios. Example:

    python bench/strategies.py                      # 1M x 128, 1000 picks
    python bench/strategies.py --n 100000 --diversity-loop --full-loop
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory import measure, peak_rss  # bench/memory.py, beside this script

from datapool.herding import herd_and_cover
from datapool.selection import k_center_greedy
from datapool.strategies import TYPICALITY_SAMPLE, Combined, Objective, combine, typicality


def make(n: int, d: int, kind: str, seed: int) -> np.ndarray:
    """``n`` float32 rows of dimension ``d``, unit-normalised, generated in blocks.

    ``random``: isotropic Gaussian directions. ``clustered``: 100 Gaussian
    clusters of unequal size (Zipf-like weights) with noise 0.3 around unit
    centres, plus 0.1 % uniform outliers: a stand-in for real embeddings.
    """
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    centres = rng.standard_normal((100, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, 101)
    for s in range(0, n, 1 << 18):
        m = min(n - s, 1 << 18)
        b = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "clustered":
            which = rng.choice(100, size=m, p=weights / weights.sum())
            noise = np.where(rng.random(m) < 0.001, 3.0, 0.3).astype(np.float32)
            b = centres[which] + noise[:, None] * b / np.sqrt(d)
        x[s : s + m] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="candidates (default 1M)")
    parser.add_argument("--d", type=int, default=128, help="dimension (default 128)")
    parser.add_argument("--picks", type=int, default=1000, help="n_samples (default 1000)")
    parser.add_argument("--k", type=int, default=20, help="typicality neighbours (default 20)")
    parser.add_argument(
        "--sample",
        type=int,
        default=TYPICALITY_SAMPLE,
        help=f"typicality reference rows (default {TYPICALITY_SAMPLE})",
    )
    parser.add_argument("--data", choices=("random", "clustered"), default="random")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for passes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--guard", type=float, default=0.9, help="radius guard of the guarded run (0: skip it)"
    )
    parser.add_argument(
        "--guard-strength", type=float, default=0.0, help="diversity strength of the guarded run"
    )
    parser.add_argument(
        "--no-herding", action="store_true", help="skip the herding run (the default strategy)"
    )
    parser.add_argument(
        "--diversity-loop",
        action="store_true",
        help="also run diversity alone through the combination loop (checks the picks)",
    )
    parser.add_argument(
        "--full-loop",
        action="store_true",
        help="also run diversity x typicality with lazy=False (one pass per pick)",
    )
    args = parser.parse_args()

    x = make(args.n, args.d, args.data, args.seed)
    threads = args.threads or torch.get_num_threads()
    print(
        f"{args.n:,} x {args.d} float32 ({x.nbytes / 1e9:.2f} GB, {args.data}), "
        f"{args.picks} picks, k={args.k}, sample {args.sample:,}, {threads} thread(s) for passes"
    )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus")

    typ, t_typ, m_typ = measure(
        lambda: typicality(x, k=args.k, sample=args.sample, seed=args.seed, threads=threads)
    )
    print(f"  typicality              {t_typ:8.2f} s  peak +{m_typ / 1e6:7.1f} MB")
    objective = [Objective("typicality", 1.0, typ)]
    both, t_loop, m_loop = measure(
        lambda: combine(x, objectives=objective, n_samples=args.picks, threads=threads)
    )
    print(f"  combination loop        {t_loop:8.2f} s  peak +{m_loop / 1e6:7.1f} MB")
    total = t_typ + t_loop
    print(f"  diversity x typicality  {total:8.2f} s  (typicality + loop)")

    def run_guarded(lazy: bool) -> Combined:
        return combine(
            x,
            objectives=objective,
            n_samples=args.picks,
            threads=threads,
            diversity=args.guard_strength,
            guard=args.guard,
            lazy=lazy,
        )

    guarded = None
    if args.guard:
        guarded, t_guard, m_guard = measure(lambda: run_guarded(True))
        print(
            f"  guarded loop (guard {args.guard:g}) {t_guard:6.2f} s  peak +{m_guard / 1e6:7.1f} MB"
            f"  ({t_guard / t_loop:.2f}x the unguarded loop; with typicality "
            f"{(t_typ + t_guard) / total:.2f}x)"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")

    plain, t_plain, m_plain = measure(
        lambda: k_center_greedy(x, n_samples=args.picks, threads=threads)
    )
    print(f"  k_center_greedy (peer)  {t_plain:8.2f} s  peak +{m_plain / 1e6:7.1f} MB")
    print(
        f"  ratios: diversity x typicality / plain = {total / t_plain:.1f}x, "
        f"loop alone / plain = {t_loop / t_plain:.1f}x"
    )
    shared = len(np.intersect1d(both.indices, plain.indices)) / max(1, len(plain.indices))
    print(
        f"  picks shared with plain diversity: {shared:.0%}; coverage radius after: "
        f"{both.next_distance:.4f} (combined) vs {plain.next_distance:.4f} (plain)"
    )
    if guarded is not None:
        print(
            f"  guarded: diversity x typicality / plain = {(t_typ + t_guard) / t_plain:.1f}x; "
            f"coverage radius after {guarded.next_distance:.4f}"
        )
    if not args.no_herding:
        xt = torch.from_numpy(x)
        herd, t_herd, m_herd = measure(
            lambda: herd_and_cover(xt, n_samples=args.picks, seed=args.seed, threads=threads)
        )
        print(
            f"  herding (default)       {t_herd:8.2f} s  peak +{m_herd / 1e6:7.1f} MB  "
            f"({t_herd / t_plain:.1f}x plain, {t_herd / total:.2f}x diversity x typicality); "
            f"{herd.herded} herding picks; radius bound {herd.bound:.4f} "
            f"(plain k-center's {herd.radius:.4f})"
        )
        print(f"load average {os.getloadavg()[0]:.2f}")
    if args.full_loop and guarded is not None:
        full_g, t_full_g, _ = measure(lambda: run_guarded(False))
        same = np.array_equal(full_g.indices, guarded.indices)
        print(
            f"  guarded, one pass per pick {t_full_g:6.2f} s  "
            f"({t_full_g / t_guard:.1f}x the lazy loop), picks {'identical' if same else 'DIFFER'}"
        )
    if args.full_loop:
        full, t_full, _ = measure(
            lambda: combine(
                x, objectives=objective, n_samples=args.picks, threads=threads, lazy=False
            )
        )
        same = np.array_equal(full.indices, both.indices)
        print(
            f"  loop, one pass per pick {t_full:8.2f} s  ({t_full / t_loop:.1f}x the lazy loop), "
            f"picks {'identical' if same else 'DIFFER'}"
        )
    if args.diversity_loop:
        div, t_div, _ = measure(lambda: combine(x, n_samples=args.picks, threads=threads))
        same = np.array_equal(div.indices, plain.indices)
        print(
            f"  diversity via the loop  {t_div:8.2f} s  ({t_div / t_plain:.1f}x plain), "
            f"picks {'identical' if same else 'DIFFER'}"
        )
    print(f"process peak RSS {peak_rss() / 1e9:.2f} GB, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
