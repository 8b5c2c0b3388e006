"""Which pool pass ``pool_precision="auto"`` takes, and what each one costs.

``k_center_greedy`` can multiply the pool pass in bfloat16 (exact picks either
way, see ``datapool/selection.py``'s Notes). Its products are ~2.3x faster than
float32's on CPUs with native bfloat16, but every pair within ``2 eps`` of its
row's running minimum is re-computed, and ``eps`` is ~800x float32's: on tight
clusters that window holds many pairs. ``auto`` probes that share first
(``_State._lowp_pays``). This script times ``auto``, ``float32`` (the peer) and
``bfloat16`` on the same data in one process and prints each as a ratio to
float32, with the path ``auto`` took (``bf16`` when it ran bfloat16 chunks).

Cases are ``DATA/POOL/CANDIDATES/PICKS``; DATA is ``random`` (unit directions) or
``clustered:S`` (100 centres plus Gaussian noise of S per coordinate, normalised:
0.2-0.4 is tight, 1.0 nearly spread). One thread; no timing is asserted.

Example:
    python bench/pool_precision.py random/100000/10000/10000 clustered:0.4/100000/10000/10000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datapool import selection
from datapool.selection import k_center_greedy

PRECISIONS = ("auto", "float32", "bfloat16")


def data(rows: int, kind: str, seed: int) -> torch.Tensor:
    """``rows`` unit vectors [rows, 128]: ``random`` or ``clustered:S`` (module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.randn(rows, 128, generator=gen)
    else:
        spread = float(kind.split(":", 1)[1]) if ":" in kind else 0.4
        centres = torch.randn(100, 128, generator=gen)
        x = centres[torch.randint(0, 100, (rows,), generator=gen)]
        x += spread * torch.randn(rows, 128, generator=gen)
    return torch.nn.functional.normalize(x, dim=1)


def run(case: str, seed: int) -> None:
    """Time every precision on one case; print ratios to float32 and auto's path."""
    kind, pool_rows, n, picks = case.split("/")
    every = data(int(pool_rows) + int(n), kind, seed)
    x, pool = every[: int(n)], every[int(n) :]
    used: list[bool] = []
    lowp_chunk = selection._State._lowp_chunk

    def spy(self: Any, *args: Any) -> None:
        used.append(True)
        lowp_chunk(self, *args)

    selection._State._lowp_chunk = spy  # type: ignore[method-assign, assignment]
    seconds, paths, picked = {}, {}, {}
    try:
        for precision in PRECISIONS:
            used.clear()
            start = time.perf_counter()
            got = k_center_greedy(x, pool=pool, n_samples=int(picks), pool_precision=precision)  # type: ignore[arg-type]
            seconds[precision] = time.perf_counter() - start
            paths[precision] = "bf16" if used else "f32"
            picked[precision] = got.indices.tolist()
    finally:
        selection._State._lowp_chunk = lowp_chunk  # type: ignore[method-assign]
    same = all(p == picked["float32"] for p in picked.values())
    cells = ", ".join(
        f"{p} {seconds[p]:.2f} s ({seconds[p] / seconds['float32']:.2f}x, {paths[p]})"
        for p in PRECISIONS
    )
    load = os.getloadavg()[0]
    print(f"{case}: {cells}; picks identical: {same} (load {load:.2f})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("cases", nargs="+", help="DATA/POOL/CANDIDATES/PICKS")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread")
    for case in args.cases:
        run(case, args.seed)


if __name__ == "__main__":
    main()
