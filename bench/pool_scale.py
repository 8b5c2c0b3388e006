"""Baseline of today's pool store (issue 10): read, write, one increment, DVC cache growth.

Today's store is one CSV, ``pools/NAME/datapool_latest.csv``, written by
``datapool.pool.write_table`` and read by ``datapool.pool.read_pool``. Every case
builds a pool table with the real columns (``filenames``, ``embedding_0..D-1``,
``labels``, ``content_hash`` as 64 hex digits, ``batch_id``, ``model_id``,
``source``, ``pick_rank``, ``pick_distance``; random unit float32 embeddings)
and, in one process on the same data, times against named peers:

* ``csv``     -- ``write_table`` / ``read_pool`` + ``embeddings_of`` (today's store)
* ``npy``     -- float32 ``.npy`` embeddings + the other columns as a small CSV
* ``parquet`` -- pyarrow, embeddings as one fixed-size-list float32 column
  (only when pyarrow is importable; ``--pyarrow-path`` appends a folder holding
  it, e.g. a throw-away venv's site-packages, *after* this venv's packages)

Every write is fsynced (``write_table`` does; the peers go through the same
``atomic_open``). ``increment`` is one batch's sample + merge with the library's
own functions (``select_increment`` + ``merge_increment`` on the tables) against
the same selection (``k_center_greedy``) + ``np.concatenate`` on arrays; the
pool's read and write come on top (printed as their sum). ``cache`` runs three
increments through real DVC (a temp git + DVC repo, ``dvc add`` of the pool
folder, ``git commit``) and prints the bytes each version added to
``.dvc/cache``, for the CSV, one whole ``.npy`` table, and one ``.npy`` shard
per batch (what issue 10 proposes). Times drift with the machine's load;
compare the ratios within one run. No timing is asserted.

Example:
    python bench/pool_scale.py                                  # 10k, 100k x D 128, 512
    python bench/pool_scale.py --rows 10000 --dims 128 --skip cache
    python bench/pool_scale.py --with-1m --dims 128 --skip increment cache
    python bench/pool_scale.py --pyarrow-path /tmp/pa/lib/python3.11/site-packages
    python bench/pool_scale.py --cache-rows 20000 --cache-picks 150 --cache-dim 512
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory import measure  # bench/memory.py, beside this script

from datapool.atomic import atomic_open
from datapool.increment import StoppingCondition, merge_increment, select_increment
from datapool.pool import (
    EXTRA_COLUMNS,
    POOL_CSV,
    TEXT_COLUMNS,
    column_order,
    embedding_dim,
    embeddings_of,
    read_pool,
    write_table,
)

META_COLUMNS = ("filenames", "labels", *EXTRA_COLUMNS)
MODEL_ID = "3f2a9c0d1e7b6a54"  # 16 hex digits, as datapool.embedding.model.model_id


# ---------------------------------------------------------------- measuring


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus"


def folder_bytes(folder: Path) -> tuple[int, int]:
    """(bytes, files) of every regular file under ``folder``."""
    total = count = 0
    for root, _, files in os.walk(folder):
        for name in files:
            total += (Path(root) / name).stat().st_size
            count += 1
    return total, count


# ---------------------------------------------------------------- data


def unit_vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Random unit vectors [n, d] float32, made in blocks."""
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 16):
        b = rng.standard_normal((min(n - s, 1 << 16), d), dtype=np.float32)
        x[s : s + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return x


def digests(prefix: str, n: int) -> list[str]:
    """``n`` distinct sha256 hex digests (64 lowercase hex digits)."""
    return [hashlib.sha256(f"{prefix}/{i}".encode()).hexdigest() for i in range(n)]


def make_rows(
    n: int, d: int, *, batch: int, rng: np.random.Generator, picked: bool = True
) -> pd.DataFrame:
    """``n`` rows of one batch in the pool's column order (candidates when not ``picked``)."""
    batch_id = hashlib.sha256(f"batch-{batch}".encode()).hexdigest()
    labels = np.array(["cats", "dogs", "birds", "cars", "trees"])
    data: dict[str, Any] = {
        "filenames": [f"{labels[i % 5]}/img_{batch:03d}_{i:07d}.jpg" for i in range(n)],
        "labels": labels[np.arange(n) % 5],
        "content_hash": digests(batch_id, n),
        "batch_id": batch_id,
        "model_id": MODEL_ID,
        "source": f"/data/inbox/week{batch:02d}",
    }
    emb = pd.DataFrame(unit_vectors(n, d, rng), columns=[f"embedding_{i}" for i in range(d)])
    if picked:
        data["pick_rank"] = np.arange(1, n + 1)
        data["pick_distance"] = np.sort(rng.uniform(0.2, 1.4, n).astype(np.float64))[::-1]
        order = column_order(d)
    else:
        order = column_order(d, ("content_hash", "batch_id", "model_id", "source"))
    table = pd.concat([pd.DataFrame(data), emb], axis=1)
    return table[order]


def make_pool(n: int, d: int, *, batches: int, rng: np.random.Generator) -> pd.DataFrame:
    """A pool of ``n`` rows added by ``batches`` increments of equal size."""
    sizes = [n // batches + (1 if b < n % batches else 0) for b in range(batches)]
    parts = [make_rows(s, d, batch=b, rng=rng) for b, s in enumerate(sizes)]
    return pd.concat(parts, ignore_index=True)


# ---------------------------------------------------------------- stores


def csv_write(table: pd.DataFrame, folder: Path) -> None:
    write_table(table, folder / POOL_CSV)


def csv_read(folder: Path) -> tuple[np.ndarray, pd.DataFrame]:
    table = read_pool(folder)
    assert table is not None
    return embeddings_of(table), table


def npy_write(table: pd.DataFrame, folder: Path) -> None:
    with atomic_open(folder / "embeddings.npy", "wb") as handle:
        np.save(handle, embeddings_of(table))
    with atomic_open(folder / "meta.csv") as handle:
        table[list(META_COLUMNS)].to_csv(handle, index=False, lineterminator="\n")


def npy_read(folder: Path) -> tuple[np.ndarray, pd.DataFrame]:
    emb = np.load(folder / "embeddings.npy")
    meta = pd.read_csv(
        folder / "meta.csv", dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False
    )
    return emb, meta


def parquet_store(pa: Any, pq: Any) -> tuple[Callable[..., None], Callable[..., Any]]:
    """Write and read functions for Parquet through pyarrow."""

    def write(table: pd.DataFrame, folder: Path) -> None:
        emb = embeddings_of(table)
        flat = pa.array(emb.reshape(-1), type=pa.float32())
        columns = {c: pa.array(table[c].to_numpy()) for c in META_COLUMNS}
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(flat, emb.shape[1])
        with atomic_open(folder / "pool.parquet", "wb") as handle:
            pq.write_table(pa.table(columns), handle)

    def read(folder: Path) -> tuple[np.ndarray, pd.DataFrame]:
        t = pq.read_table(folder / "pool.parquet")
        col = t.column("embedding").combine_chunks()
        emb = col.values.to_numpy(zero_copy_only=False).reshape(len(t), col.type.list_size)
        return emb, t.drop_columns(["embedding"]).to_pandas()

    return write, read


def import_pyarrow(extra: str | None) -> tuple[Any, Any] | None:
    if extra:
        sys.path.append(extra)  # after this venv's packages: numpy/pandas stay ours
    try:
        import pyarrow as pa  # type: ignore[import-not-found]
        import pyarrow.parquet as pq  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pa, pq


# ---------------------------------------------------------------- cases


def run_io(
    table: pd.DataFrame, stores: dict[str, tuple[Any, Any]], root: Path
) -> dict[str, tuple[float, float, int]]:
    """Write and read ``table`` with every store; print times and ratios to csv."""
    want = embeddings_of(table)
    n, d = want.shape
    print(f"\n== io {n:,} x {d}, {load()}")
    results: dict[str, tuple[float, float, int]] = {}
    for name, (write, read) in stores.items():
        folder = root / f"{name}-{n}-{d}"
        folder.mkdir()
        _, t_w, m_w = measure(lambda w=write, f=folder: w(table, f))  # type: ignore[misc]
        size, _ = folder_bytes(folder)
        (emb, meta), t_r, m_r = measure(lambda r=read, f=folder: r(f))  # type: ignore[misc]
        exact = np.array_equal(emb, want) and len(meta) == n
        results[name] = (t_w, t_r, size)
        csv = results.get("csv")
        ratio = ""
        if csv is not None and name != "csv":
            ratio = f"  vs csv: write {csv[0] / t_w:5.1f}x, read {csv[1] / t_r:5.1f}x faster"
            ratio += f", {csv[2] / size:4.1f}x smaller"
        print(
            f"  {name:8s} {size / 1e6:8.1f} MB  write {t_w:7.2f} s (+{m_w / 1e6:6.0f} MB)"
            f"  read {t_r:6.2f} s (+{m_r / 1e6:6.0f} MB)  exact {exact}{ratio}"
        )
        shutil.rmtree(folder)
    print(f"  {load()}")
    return results


def run_increment(
    pool: pd.DataFrame, *, candidates: int, picks: int, seed: int, io: dict[str, float]
) -> None:
    """One increment of ``picks`` out of ``candidates`` into ``pool``."""
    rng = np.random.default_rng(seed + 1)
    n, d = len(pool), embedding_dim(pool)
    cands = make_rows(candidates, d, batch=99, rng=rng, picked=False)
    stop = StoppingCondition(n_samples=picks, min_distance=0.0)
    print(f"\n== increment {picks:,} of {candidates:,} candidates into {n:,} x {d}, {load()}")

    def ours() -> pd.DataFrame:
        chosen = select_increment(cands, pool, stop)
        return merge_increment(pool, cands, chosen, weak_labels=True)

    pool_emb, cand_emb = embeddings_of(pool), embeddings_of(cands)
    pool_meta = pool[list(META_COLUMNS)]

    def arrays() -> tuple[np.ndarray, pd.DataFrame]:
        sel = k_center_greedy(cand_emb, pool=pool_emb, n_samples=picks)
        added = cands.iloc[sel.indices][[c for c in META_COLUMNS if c in cands.columns]]
        ranks = np.arange(1, len(added) + 1)
        added = added.assign(pick_rank=ranks, pick_distance=sel.min_distances)
        meta = pd.concat([pool_meta, added], ignore_index=True)
        return np.concatenate([pool_emb, cand_emb[sel.indices]]), meta

    from datapool.selection import k_center_greedy

    k_center_greedy(cand_emb[:100], pool=pool_emb[:100], n_samples=10)  # warm up torch
    merged, t_ours, m_ours = measure(ours)
    (emb, _), t_arr, m_arr = measure(arrays)
    same = np.array_equal(embeddings_of(merged), emb)
    print(
        f"  csv tables (select_increment + merge_increment) {t_ours:7.2f} s"
        f" (+{m_ours / 1e6:5.0f} MB)"
        f"  -> {len(merged):,} rows"
    )
    print(
        f"  npy arrays (k_center_greedy + np.concatenate)    {t_arr:7.2f} s"
        f" (+{m_arr / 1e6:5.0f} MB)"
        f"  ratio {t_ours / t_arr:5.1f}x  same rows {same}"
    )
    if "csv" in io:
        total = io["csv"] + t_ours
        share = t_ours / total
        print(f"  csv with the pool's read + write: {total:7.2f} s (sample+merge {share:.0%})")
    print(f"  {load()}")


def run_cache(rows: int, picks: int, d: int, root: Path, seed: int) -> None:
    """Bytes each version adds to .dvc/cache over three increments, per layout."""
    print(f"\n== cache: {rows:,} x {d} pool, then 3 increments of {picks:,} rows, {load()}")
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.invalid",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    }

    def sh(*cmd: str, cwd: Path) -> None:
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)

    def shards_write(table: pd.DataFrame, folder: Path) -> None:
        for batch, part in table.groupby("batch_id", sort=False):
            if not (folder / f"{batch}.npy").exists():  # unchanged shards stay the same files
                npy_write(part, folder / "tmp")
                (folder / "tmp" / "embeddings.npy").rename(folder / f"{batch}.npy")
                (folder / "tmp" / "meta.csv").rename(folder / f"{batch}.csv")
        shutil.rmtree(folder / "tmp", ignore_errors=True)

    layouts: dict[str, Callable[[pd.DataFrame, Path], None]] = {
        "csv": csv_write,
        "npy": npy_write,
        "npy-shards": shards_write,
    }
    for name, write in layouts.items():
        repo = root / f"repo-{name}"
        repo.mkdir()
        sh("git", "init", "-q", cwd=repo)
        sh(dvc, "init", "-q", cwd=repo)
        sh("git", "commit", "-qm", "init", cwd=repo)
        rng = np.random.default_rng(seed + 2)
        pool = make_pool(rows, d, batches=1, rng=rng)
        folder = repo / "pools" / "demo"
        folder.mkdir(parents=True)
        added: list[int] = []
        t0 = time.perf_counter()
        for version in range(4):
            if version:
                cands = make_rows(picks, d, batch=version, rng=rng, picked=False)
                chosen = cands[["filenames", "content_hash"]].assign(
                    pick_rank=np.arange(1, picks + 1), pick_distance=0.5
                )
                pool = merge_increment(pool, cands, chosen, weak_labels=True)
            write(pool, folder)
            before, _ = folder_bytes(repo / ".dvc" / "cache")
            sh(dvc, "add", "-q", "pools/demo", cwd=repo)
            sh("git", "add", "pools/demo.dvc", "pools/.gitignore", cwd=repo)
            sh("git", "commit", "-qm", f"v{version}", cwd=repo)
            after, _ = folder_bytes(repo / ".dvc" / "cache")
            added.append(after - before)
        total, objects = folder_bytes(repo / ".dvc" / "cache")
        steps = ", ".join(f"v{v} +{b / 1e6:.2f} MB" for v, b in enumerate(added))
        print(
            f"  {name:10s} {steps}; v3/v2 {added[3] / added[2]:.2f}x; v3 adds "
            f"{added[3] / added[0] / (picks / rows):.1f}x its rows' share of v0; "
            f"cache {total / 1e6:.1f} MB in {objects} files ({time.perf_counter() - t0:.0f} s)"
        )
        shutil.rmtree(repo)
    print(f"  {load()}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000])
    ap.add_argument("--dims", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--with-1m", action="store_true", help="add 1,000,000 rows to --rows")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["io", "increment", "cache", "npy", "parquet"],
        help="parts or peers to leave out",
    )
    ap.add_argument("--candidates", type=int, default=2000, help="increment: batch size")
    ap.add_argument("--picks", type=int, default=500, help="increment: n_samples")
    ap.add_argument("--cache-rows", type=int, default=10_000, help="cache: first version's rows")
    ap.add_argument("--cache-picks", type=int, default=1000, help="cache: rows per increment")
    ap.add_argument("--cache-dim", type=int, default=512)
    ap.add_argument("--pyarrow-path", help="folder appended to sys.path to find pyarrow")
    ap.add_argument("--tmp", help="where to write (default: the system temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = sorted(set(args.rows) | ({1_000_000} if args.with_1m else set()))
    stores: dict[str, tuple[Any, Any]] = {"csv": (csv_write, csv_read)}
    if "npy" not in args.skip:
        stores["npy"] = (npy_write, npy_read)
    pyarrow = None if "parquet" in args.skip else import_pyarrow(args.pyarrow_path)
    if pyarrow is not None:
        stores["parquet"] = parquet_store(*pyarrow)
        print(f"pyarrow {pyarrow[0].__version__}")
    elif "parquet" not in args.skip:
        print("pyarrow not installed, skipped")
    print(f"numpy {np.__version__}, pandas {pd.__version__}, python {sys.version.split()[0]}")
    print(f"{load()}; started {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="pool_scale-") as tmp:
        root = Path(tmp)
        warm = make_pool(50, 8, batches=1, rng=np.random.default_rng(args.seed))
        for name, (write, read) in stores.items():  # first-call costs (imports) out of timings
            (root / name).mkdir()
            write(warm, root / name)
            read(root / name)
            shutil.rmtree(root / name)
        for n in rows:
            for d in args.dims:
                rng = np.random.default_rng(args.seed)
                table, t_make, _ = measure(lambda: make_pool(n, d, batches=10, rng=rng))  # noqa: B023
                print(f"\n(pool table {n:,} x {d} built in {t_make:.1f} s)")
                io_times: dict[str, float] = {}
                if "io" not in args.skip:
                    io = run_io(table, stores, root)
                    io_times = {k: w + r for k, (w, r, _) in io.items()}
                if "increment" not in args.skip:
                    run_increment(
                        table,
                        candidates=args.candidates,
                        picks=args.picks,
                        seed=args.seed,
                        io=io_times,
                    )
        if "cache" not in args.skip:
            run_cache(args.cache_rows, args.cache_picks, args.cache_dim, root, args.seed)
    print(f"\n{load()}; finished {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")


if __name__ == "__main__":
    main()
