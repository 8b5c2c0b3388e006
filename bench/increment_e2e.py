"""One increment, end to end, into a small pool and into a large one (issue 10's ratio).

``bench/pool_scale.py --cases increment`` times the store and the selection of an
increment (load, select, merge, save). This script times what a user waits for:
``datapool run --input-dir NEW`` in a real workspace (settings check, ``dvc
repro``: inbox, embed with the pool's model, sample, merge; the git commit), as a
subprocess, the same new images going into a pool of ``--small`` rows and one of
``--large`` rows. The printed ratio (large / small) is the issue's "an increment
into a 20,000-row pool takes at most 2.5x the time of the same increment into a
300-row pool".

Each pool is built by one ``datapool run`` of that many drawn 32 px PNGs (the
default bootstrap trains its model; ``weights`` none, so nothing is looked up;
plain k-center, every image picked) and not timed. Then ``--increments`` inboxes of
``--new`` other images go in one after another, ``--picks`` each, with the
default selection (herding) or, with ``--plain``, ``selection.strategies=[]``;
each is timed, and the best per pool is compared (the host is shared: compare
within a run). No timing is asserted.

Example (2-core VM, under the bench lock)::

    flock -x /tmp/datapool-bench.lock python bench/increment_e2e.py
    python bench/increment_e2e.py --small 100 --large 1000 --new 200 --picks 20   # smoke
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_STRATEGIES = "[{strategy: herding, radius: 1.065, bandwidth: 0.3}]"


def draw(path: Path, seed: int) -> None:
    """A 32 px RGB PNG of a few random shapes (the same seed, the same bytes)."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 256, 3)))
    pen = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, 20, 2))
        box = (x0, y0, x0 + int(rng.integers(4, 16)), y0 + int(rng.integers(4, 16)))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=colour)
    image.save(path)


def inbox(folder: Path, count: int, first_seed: int) -> Path:
    """``count`` drawn images in 5 label folders under ``folder``."""
    for i in range(count):
        sub = folder / f"label{i % 5}"
        sub.mkdir(parents=True, exist_ok=True)
        draw(sub / f"img_{first_seed + i:07d}.png", first_seed + i)
    return folder


def datapool(args: list[str], *, cwd: Path) -> float:
    """Seconds of ``datapool ARGS`` in ``cwd`` (output to our stderr); exits on failure."""
    exe = Path(sys.executable).with_name("datapool")
    start = time.perf_counter()
    done = subprocess.run([str(exe), *args], cwd=cwd, stdout=sys.stderr, check=False)
    if done.returncode:
        raise SystemExit(f"datapool {' '.join(args)} failed ({done.returncode})")
    return time.perf_counter() - start


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def one_pool(rows: int, news: list[Path], args: argparse.Namespace, root: Path) -> list[float]:
    """Build a pool of ``rows`` images, then time each increment of ``news`` into it."""
    ws = root / f"ws-{rows}"
    datapool(["init", str(ws)], cwd=root)
    seed_box = inbox(root / f"pool-{rows}", rows, first_seed=10_000_000)
    strategies = DEFAULT_STRATEGIES if not args.plain else "[]"
    build = datapool(
        ["run", "--input-dir", str(seed_box), "--workspace", str(ws),
         f"stopping_condition.n_samples={rows}", "selection.strategies=[]", "embed.weights=none"],
        cwd=ws,
    )  # fmt: skip
    print(f"  pool of {rows:,}: built in {build:.1f} s ({load()})", flush=True)
    times = []
    for new in news:
        seconds = datapool(
            ["run", "--input-dir", str(new), "--workspace", str(ws),
             f"stopping_condition.n_samples={args.picks}", f"selection.strategies={strategies}"],
            cwd=ws,
        )  # fmt: skip
        times.append(seconds)
        print(f"  + {args.picks} of {args.new:,}: {seconds:.2f} s ({load()})", flush=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", type=int, default=300, help="rows of the small pool")
    ap.add_argument("--large", type=int, default=20_000, help="rows of the large pool")
    ap.add_argument("--new", type=int, default=2000, help="new images per increment")
    ap.add_argument("--picks", type=int, default=200, help="picks per increment")
    ap.add_argument("--increments", type=int, default=2, help="increments timed per pool")
    ap.add_argument("--plain", action="store_true", help="plain k-center, not the default")
    ap.add_argument("--tmp", help="where to work (default: the system temp folder)")
    args = ap.parse_args()
    selection = "plain k-center" if args.plain else "the default (herding)"
    print(f"increment e2e: {args.picks} of {args.new} new images, {selection}; {load()}")
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="increment-e2e-") as tmp:
        root = Path(tmp)
        news = [
            inbox(root / f"new-{i}", args.new, first_seed=i * 1_000_000)
            for i in range(args.increments)
        ]
        best = {}
        for rows in (args.small, args.large):
            print(f"== pool of {rows:,} rows", flush=True)
            best[rows] = min(one_pool(rows, news, args, root))
    ratio = best[args.large] / best[args.small]
    print(
        f"best increment: {best[args.small]:.2f} s into {args.small:,} rows, "
        f"{best[args.large]:.2f} s into {args.large:,} rows: {ratio:.2f}x ({load()})"
    )


if __name__ == "__main__":
    main()
