"""The pool store of issue 10 (Arrow shards + manifest) against the CSV store it replaced.

A pool folder is ``manifest.json`` + ``shards/batch-<16hex>.arrow`` (one per
batch) + ``images/batch-<16hex>.zip`` (the batch's images, one uncompressed ZIP,
:mod:`datapool.packs`) + ``checkpoint_latest.ckpt`` + the derived
``datapool_latest.csv`` (written only up to ``csv_max_rows`` rows), see
:mod:`datapool.store` and :mod:`datapool.transaction`. Pools are built as a user's
pool of the layout before the packs would be (one loose ``images/<hash><ext>`` per
row) and packed by their first ``save_pool`` (the migration), timed apart. The old store was the CSV
alone (``datapool.pool.write_table`` / ``read_legacy_pool``). Every case builds
pools with the real columns (64-hex ``content_hash`` = sha256 of the image's
bytes, ``batch_id``, ``model_id``, ``source``, ``pick_rank``, ``pick_distance``;
random unit float32 embeddings) and prints ratios against named peers measured
in the same run. Each timing is repeated (``--repeat``) and the best is shown,
but a timing that already took over ``--repeat-budget`` seconds is not run
again (the old CSV write at 100k x 512 takes ~80 s). The load average is
printed with every case: the 2-core machine is shared, compare within a run.

Cases (``--cases``):

* ``io``        read and write of a pool of ``--rows`` x ``--dims``: the new store
  (``store.load_pool``; the write of every shard + the manifest, as a first
  ``save_pool`` does them; and ``write_lightly_csv``, the derived CSV) against the
  old ``write_table`` / ``read_legacy_pool``, measured only up to ``--csv-up-to``
  rows ("not measured" above: never extrapolated). Every write is fsynced.
* ``increment`` one increment, ``select_increment`` + ``merge_increment`` +
  ``transaction.save_pool`` (the pool's ``load_pool`` before them shown too),
  ``--inc-picks`` of ``--inc-candidates`` into each of ``--inc-rows`` pools,
  with one real tiny image per row in the pool's packs (the new images are
  packed into the batch's new pack and sha256-checked by ``save_pool``), with the
  default ``csv_max_rows`` and with 0. Between repeats the pool folder is put back.
* ``repro``     no-op ``dvc repro`` (and ``dvc status``) in a real workspace
  (``workspace.create_workspace``) whose pool has ``--repro-rows`` rows: the
  ``inbox`` stage runs for real on a 3-image inbox, the other stages' outputs
  are written in place (the pool by ``save_pool``) and recorded by
  ``dvc commit -f``; the repro that follows has nothing to do but ``inbox``.
* ``cache``     bytes each version adds to ``.dvc/cache`` over three increments
  (temp git + DVC repo, ``dvc add pools/demo`` + ``git commit`` per version):
  shards + packs with ``csv_max_rows=0``, with the default, and the old CSV store
  (loose images), each with the same images; the DVC ``.dir`` listing objects
  shown apart (one entry per file of the pool folder: O(batches) with packs).

No timing is asserted. Example:
    python bench/pool_scale.py --cases io --rows 10000 100000 1000000 --dims 128 512
    python bench/pool_scale.py --cases increment --inc-rows 300 20000 \\
        --inc-candidates 2000 --inc-picks 200
    python bench/pool_scale.py --cases increment --inc-rows 1000000 \\
        --inc-candidates 50000 --inc-picks 10000 --repeat 2
    python bench/pool_scale.py --cases repro --repro-rows 10000 100000 1000000
    python bench/pool_scale.py --cases cache --cache-rows 10000 --cache-picks 1000
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from memory import measure  # bench/memory.py, beside this script

from datapool.atomic import atomic_open
from datapool.increment import (
    SelectionInputs,
    StoppingCondition,
    image_sources,
    merge_increment,
    select_increment,
)
from datapool.pool import (
    CHECKPOINT,
    IMAGES_DIR,
    POOL_CSV,
    column_order,
    embedding_dim,
    embeddings_of,
    image_name,
    read_legacy_pool,
    write_table,
)
from datapool.store import MANIFEST, load_pool, plan_version, write_lightly_csv, write_rows
from datapool.transaction import CSV_MAX_ROWS, save_pool

MODEL_ID = "3f2a9c0d1e7b6a54"  # 16 hex digits, as datapool.embedding.model.model_id
CASES = ("io", "increment", "repro", "cache")


# ---------------------------------------------------------------- measuring


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}/{os.cpu_count()} cpus"


def best_of(
    fn: Callable[[], Any], *, repeat: int, budget: float, reset: Callable[[], None] | None = None
) -> tuple[Any, float, int, int]:
    """Run ``fn`` up to ``repeat`` times; (the best run's result, its seconds, its peak RSS
    rise in bytes, runs). Stops repeating once a run took over ``budget`` s. ``reset``
    runs between runs (untimed) to put the disk back as the first run found it."""
    best, mem, runs, out = float("inf"), 0, 0, None
    while runs < repeat:
        if runs and reset is not None:
            reset()
        got, dt, dm = measure(fn)
        runs += 1
        if dt < best:
            best, mem, out = dt, dm, got
        if dt > budget:
            break
    return out, best, mem, runs


def folder_bytes(folder: Path, pattern: str = "*") -> tuple[int, int]:
    """(bytes, files) of the regular files under ``folder`` whose name matches ``pattern``."""
    total = count = 0
    for path in folder.rglob(pattern):
        if path.is_file():
            total += path.stat().st_size
            count += 1
    return total, count


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.invalid",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    }


def sh(*cmd: str, cwd: Path) -> str:
    """Run git or dvc in ``cwd``; its stdout. Raises CalledProcessError with its output."""
    done = subprocess.run(cmd, cwd=cwd, env=env(), text=True, capture_output=True)
    if done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done.stdout


# ---------------------------------------------------------------- data


# ``--data clustered``: every embedding is one of these centres plus noise (set by main)
CLUSTERS: np.ndarray | None = None
SPREAD = 0.4  # the noise's standard deviation per coordinate, relative to a centre's


def unit_vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors [n, d] float32, made in blocks: random directions, or (``CLUSTERS``
    set) a random centre plus ``SPREAD`` Gaussian noise, normalised -- tight clusters
    like a trained model's embeddings, where the bfloat16 pool pass does not pay."""
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 1 << 16):
        b = rng.standard_normal((min(n - s, 1 << 16), d), dtype=np.float32)
        if CLUSTERS is not None:
            b = CLUSTERS[rng.integers(0, len(CLUSTERS), len(b))] + np.float32(SPREAD) * b
        x[s : s + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return x


def image_bytes(batch_id: str, i: int) -> bytes:
    """The bytes of image ``i`` of a batch (tiny, distinct); its content hash is their sha256."""
    return f"{batch_id}/{i}\n".encode()


def make_rows(
    n: int, d: int, *, batch: int, rng: np.random.Generator, picked: bool = True, source: str = ""
) -> pd.DataFrame:
    """``n`` rows of one batch in the pool's column order (candidates when not ``picked``)."""
    batch_id = hashlib.sha256(f"batch-{batch}".encode()).hexdigest()
    labels = np.array(["cats", "dogs", "birds", "cars", "trees"])
    data: dict[str, Any] = {
        "filenames": [f"{labels[i % 5]}/img_{batch:03d}_{i:07d}.jpg" for i in range(n)],
        "labels": labels[np.arange(n) % 5],
        "content_hash": [hashlib.sha256(image_bytes(batch_id, i)).hexdigest() for i in range(n)],
        "batch_id": batch_id,
        "model_id": MODEL_ID,
        "source": source or f"/data/inbox/week{batch:02d}",
    }
    if picked:
        data["pick_rank"] = np.arange(1, n + 1)
        data["pick_distance"] = np.sort(rng.uniform(0.2, 1.4, n))[::-1]
        order = column_order(d)
    else:
        order = column_order(d, ("content_hash", "batch_id", "model_id", "source"))
    emb = pd.DataFrame(unit_vectors(n, d, rng), columns=order[1 : d + 1], copy=False)
    return pd.concat([pd.DataFrame(data), emb], axis=1)[order]


def make_pool(n: int, d: int, *, batches: int, rng: np.random.Generator) -> pd.DataFrame:
    """A pool of ``n`` rows added by ``batches`` increments of (nearly) equal size."""
    sizes = [n // batches + (1 if b < n % batches else 0) for b in range(batches)]
    parts = [make_rows(s, d, batch=b, rng=rng) for b, s in enumerate(sizes) if s]
    return pd.concat(parts, ignore_index=True)


def write_images(table: pd.DataFrame, folder: Path, *, named: str) -> None:
    """One tiny file per row of ``table`` whose sha256 is the row's ``content_hash``:
    under ``folder/<filenames>`` (``named="inbox"``) or ``folder/<hash><ext>`` (``"pool"``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if named == "inbox":
        for label in set(table["labels"]):
            (folder / str(label)).mkdir(exist_ok=True)
    for name, digest, batch in zip(
        table["filenames"], table["content_hash"], table["batch_id"], strict=True
    ):
        target = folder / (name if named == "inbox" else image_name(str(digest), str(name)))
        target.write_bytes(image_bytes(str(batch), _index(str(name))))


def _index(filename: str) -> int:
    """Row ``i`` of its batch from a filename made by :func:`make_rows` (``…_0000042.jpg``)."""
    return int(filename.rpartition("_")[2].partition(".")[0])


# ---------------------------------------------------------------- io


def shards_write(table: pd.DataFrame, folder: Path) -> None:
    """Every shard + the manifest, as the first ``save_pool`` of a pool writes them."""
    plan = plan_version(table, None)
    for name, rows in plan.writes.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        write_rows(rows, folder / name)
    with atomic_open(folder / MANIFEST, "w") as handle:
        handle.write(plan.manifest.to_json())


def run_io(table: pd.DataFrame, root: Path, args: argparse.Namespace) -> None:
    """Write and read ``table`` with the new store and (up to --csv-up-to rows) the old CSV."""
    n, d = len(table), embedding_dim(table)
    want = embeddings_of(table)
    print(f"\n== io {n:,} x {d} ({load()})")
    folder = root / f"io-{n}-{d}"
    folder.mkdir()
    rep = {"repeat": args.repeat, "budget": args.repeat_budget}
    _, t_w, m_w, k_w = best_of(lambda: shards_write(table, folder), **rep)
    size, files = folder_bytes(folder, "*.arrow")
    got, t_r, m_r, k_r = best_of(lambda: load_pool(folder), **rep)
    exact = np.array_equal(embeddings_of(got), want) and got["content_hash"].equals(
        table["content_hash"]
    )
    del got
    _, t_l, _, k_l = best_of(lambda: write_lightly_csv(table, folder / POOL_CSV), **rep)
    l_size = (folder / POOL_CSV).stat().st_size
    print(
        f"  shards   {size / 1e6:8.1f} MB in {files} shards  write {t_w:7.2f} s"
        f" (+{m_w / 1e6:5.0f} MB, best of {k_w})  load_pool {t_r:6.2f} s"
        f" (+{m_r / 1e6:5.0f} MB, best of {k_r})"
        f"  exact {exact}"
    )
    print(
        f"  derived datapool_latest.csv {l_size / 1e6:8.1f} MB  write_lightly_csv {t_l:7.2f} s"
        f" (best of {k_l})"
    )
    shutil.rmtree(folder)
    if n > args.csv_up_to:
        print(f"  old csv  not measured (rows > --csv-up-to {args.csv_up_to:,})")
        return
    folder.mkdir()
    _, c_w, cm_w, ck_w = best_of(lambda: write_table(table, folder / POOL_CSV), **rep)
    c_size = (folder / POOL_CSV).stat().st_size
    _, c_r, cm_r, ck_r = best_of(lambda: read_legacy_pool(folder), **rep)
    shutil.rmtree(folder)
    print(
        f"  old csv  {c_size / 1e6:8.1f} MB  write_table {c_w:7.2f} s (+{cm_w / 1e6:5.0f} MB, best"
        f" of {ck_w})  read_legacy_pool {c_r:6.2f} s (+{cm_r / 1e6:5.0f} MB, best of {ck_r})"
    )
    print(
        f"  shards vs old csv: write {c_w / t_w:5.1f}x faster, read {c_r / t_r:5.1f}x faster,"
        f" {c_size / size:4.1f}x smaller; derived csv write {c_w / t_l:4.1f}x faster"
        f" than write_table ({load()})"
    )


# ---------------------------------------------------------------- increment


def build_pool_dir(
    pool_dir: Path, n: int, d: int, *, args: argparse.Namespace, checkpoint: Path
) -> None:
    """A pool of ``n`` rows in ``pool_dir`` (batches of ``--batch-rows``), one tiny image per
    row written in place, recorded by a first ``save_pool`` (default csv_max_rows)."""
    rng = np.random.default_rng(args.seed)
    pool = make_pool(n, d, batches=max(1, -(-n // args.batch_rows)), rng=rng)
    t0 = time.perf_counter()
    write_images(pool, pool_dir / IMAGES_DIR, named="pool")  # loose: the layout before packs
    t1 = time.perf_counter()
    saved = save_pool(pool_dir, pool, checkpoint=checkpoint, sources={})  # packs them
    t2 = time.perf_counter()
    print(
        f"  (pool {n:,} x {d}: {n:,} loose images written in {t1 - t0:.1f} s, first save_pool"
        f" (packing them) {t2 - t1:.1f} s, {len(saved.manifest.shards)} shards,"
        f" {len(saved.manifest.packs)} packs, {saved.packed:,} loose images removed,"
        f" csv {saved.csv})"
    )


class Snapshot:
    """The pool folder's manifest and derived CSV, to put a pool back after an increment:
    :meth:`restore` removes the increment's shard and pack and rewrites both files."""

    def __init__(self, pool_dir: Path) -> None:
        self.pool_dir = pool_dir
        self.files = {
            name: (pool_dir / name).read_bytes()
            for name in (MANIFEST, POOL_CSV)
            if (pool_dir / name).exists()
        }
        self.kept = {p for folder in ("shards", IMAGES_DIR) for p in (pool_dir / folder).iterdir()}

    def restore(self, added: pd.DataFrame) -> None:
        for folder in ("shards", IMAGES_DIR):
            for path in (self.pool_dir / folder).iterdir():
                if path not in self.kept:
                    path.unlink()
        (self.pool_dir / POOL_CSV).unlink(missing_ok=True)
        for name, data in self.files.items():
            (self.pool_dir / name).write_bytes(data)


def default_selection() -> SelectionInputs:
    """The strategies of the repository's params.yaml (the pipeline's default selection)."""
    import yaml

    from datapool.strategy_config import parse_strategies

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    return SelectionInputs(strategies=parse_strategies(params["selection"]["strategies"]))


def describe_selection(kind: str) -> str:
    """``--selection`` in words, for the log."""
    if kind == "plain":
        return "k_center_greedy"
    from datapool.strategies import describe

    return str(describe(default_selection().strategies))


def one_increment(
    pool_dir: Path,
    cands: pd.DataFrame,
    stop: StoppingCondition,
    *,
    ckpt: Path,
    csv_max: int,
    selection: SelectionInputs | None = None,
) -> dict[str, Any]:
    """load_pool, select_increment, merge_increment, save_pool; seconds of each."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    pool = load_pool(pool_dir)
    t1 = time.perf_counter()
    picks = select_increment(cands, pool, stop, selection)
    t2 = time.perf_counter()
    merged = merge_increment(pool, cands, picks, weak_labels=True)
    t3 = time.perf_counter()
    saved = save_pool(
        pool_dir, merged, checkpoint=ckpt, sources=image_sources(cands), csv_max_rows=csv_max
    )
    t4 = time.perf_counter()
    out.update(read=t1 - t0, select=t2 - t1, merge=t3 - t2, save=t4 - t3, total=t4 - t0)
    out.update(picks=picks, rows=len(merged), csv=saved.csv, written=saved.shards_written)
    out.update(packs=saved.packs_written)
    return out


def time_increment(
    pool_dir: Path,
    cands: pd.DataFrame,
    stop: StoppingCondition,
    *,
    ckpt: Path,
    csv_max: int,
    snap: Snapshot,
    args: argparse.Namespace,
) -> float:
    """Best seconds of :func:`one_increment` (the pool put back between runs); prints steps."""
    last: dict[str, Any] = {}

    def run() -> dict[str, Any]:
        chosen = default_selection() if args.selection == "default" else None
        last.update(
            one_increment(pool_dir, cands, stop, ckpt=ckpt, csv_max=csv_max, selection=chosen)
        )
        return dict(last)

    def reset() -> None:
        snap.restore(last["picks"])

    got, best, mem, runs = best_of(run, repeat=args.repeat, budget=args.repeat_budget, reset=reset)
    reset()
    steps = ", ".join(f"{s} {got[s]:.2f}" for s in ("read", "select", "merge", "save"))
    print(
        f"  csv_max_rows={csv_max:<6d} total {best:7.2f} s ({steps}) +{mem / 1e6:.0f} MB,"
        f" best of {runs}; csv written {got['csv']}, {got['written']} shard and"
        f" {got['packs']} pack written,"
        f" -> {got['rows']:,} rows ({load()})"
    )
    if args.profile:
        profile(run)
        reset()
    return best


def run_increment(root: Path, args: argparse.Namespace) -> None:
    """One increment into each of ``--inc-rows`` pools, with the default csv_max_rows and 0."""
    d, c, k = args.inc_dim, args.inc_candidates, args.inc_picks
    stop = StoppingCondition(n_samples=k, min_distance=0.0)
    ckpt = root / "model.ckpt"
    ckpt.write_bytes(b"model" * 1000)
    rng = np.random.default_rng(args.seed + 1)
    inbox = root / "inc-inbox"
    cands = make_rows(c, d, batch=10_000, rng=rng, picked=False, source=str(inbox))
    write_images(cands, inbox, named="inbox")
    warm = make_rows(50, d, batch=10_001, rng=rng, picked=False)
    select_increment(warm, None, StoppingCondition(n_samples=5, min_distance=0.0))  # torch
    totals: dict[tuple[int, int], float] = {}
    settings = args.csv_max if args.csv_max is not None else [CSV_MAX_ROWS, 0]
    print(f"\nselection: {args.selection} ({describe_selection(args.selection)})")
    for n in args.inc_rows:
        print(f"\n== increment: {k:,} picks of {c:,} candidates into {n:,} x {d} ({load()})")
        cache = Path(args.pool_cache) if args.pool_cache else None
        kind = "" if args.data == "random" else f"-{args.data}"
        pool_dir = (cache if cache else root) / f"inc-{n}x{d}-seed{args.seed}{kind}"
        if cache is None or not (pool_dir / MANIFEST).is_file():
            shutil.rmtree(pool_dir, ignore_errors=True)
            build_pool_dir(pool_dir, n, d, args=args, checkpoint=ckpt)
        else:
            print(f"  (pool {n:,} x {d} reused from {pool_dir})")
        snap = Snapshot(pool_dir)
        for csv_max in settings:
            totals[(n, csv_max)] = time_increment(
                pool_dir, cands, stop, ckpt=ckpt, csv_max=csv_max, snap=snap, args=args
            )
        if cache is None:
            shutil.rmtree(pool_dir)
    sizes = sorted(args.inc_rows)
    for csv_max in settings:
        small = totals[(sizes[0], csv_max)]
        ratios = ", ".join(f"{n:,}: {totals[(n, csv_max)] / small:.2f}x" for n in sizes[1:])
        if ratios:
            print(f"  csv_max_rows={csv_max}: vs the {sizes[0]:,}-row pool {ratios}")


def profile(fn: Callable[[], Any]) -> None:
    """Print the 14 most expensive calls (cumulative) of one run of ``fn``."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(14)
    print("\n".join("    " + line for line in text.getvalue().splitlines() if line.strip()))


# ---------------------------------------------------------------- repro


def build_workspace(ws: Path, n: int, d: int, root: Path, args: argparse.Namespace) -> float:
    """A real workspace whose pool has ``n`` rows, every stage recorded in dvc.lock; returns
    the seconds of ``dvc commit -f`` (DVC hashing the pool's files the first time)."""
    from datapool.layout import PoolPaths
    from datapool.workspace import create_workspace, set_params

    create_workspace(ws)
    rng = np.random.default_rng(args.seed)
    inbox = root / f"repro-inbox-{n}"
    cands = make_rows(3, d, batch=10_000, rng=rng, picked=False, source=str(inbox))
    write_images(cands, inbox, named="inbox")
    set_params(ws / "params.yaml", {"input_dir": str(inbox)})
    sh("git", "commit", "-qm", "inbox", "params.yaml", cwd=ws)
    sh("dvc", "repro", "inbox", cwd=ws)
    paths = PoolPaths("my_datapool")
    ckpt = ws / paths.work / "embed" / "model.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    ckpt.write_bytes(b"model" * 1000)
    write_rows(cands, ws / paths.candidates)
    picks = cands[["filenames", "content_hash"]].assign(pick_rank=[1, 2, 3], pick_distance=1.0)
    (ws / paths.picks).parent.mkdir(parents=True, exist_ok=True)
    write_rows(picks, ws / paths.picks)
    build_pool_dir(ws / paths.folder, n, d, args=args, checkpoint=ckpt)
    placeholders(ws, paths.name)
    files = sum(1 for p in (ws / paths.folder).rglob("*") if p.is_file())
    print(f"  (pool folder: {files:,} files for DVC to hash)")
    t0 = time.perf_counter()
    sh("dvc", "commit", "-f", cwd=ws)
    t_commit = time.perf_counter() - t0
    sh("git", "add", "dvc.lock", "pools/.gitignore", cwd=ws)
    sh("git", "commit", "-qm", "pool", cwd=ws)
    return t_commit


def placeholders(ws: Path, name: str) -> None:
    """Stand-ins for the other outputs dvc.yaml declares (reports, metrics, plots), so that
    ``dvc commit`` records every stage; they do not change what a no-op repro costs."""
    import yaml

    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for out in stage.get(key) or []:
                path = ws / str(next(iter(out)) if isinstance(out, dict) else out).replace(
                    "${datapool.name}", name
                )
                if path.exists():
                    continue
                if path.suffix:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("{}\n" if path.suffix == ".json" else "")
                else:
                    path.mkdir(parents=True)
                    (path / "placeholder").write_text("")


def run_repro(root: Path, args: argparse.Namespace) -> None:
    """No-op ``dvc status`` and ``dvc repro`` in a workspace per ``--repro-rows``."""
    rep = {"repeat": args.repeat, "budget": args.repeat_budget}
    for n in args.repro_rows:
        ws = root / f"ws-{n}"
        print(f"\n== no-op dvc repro, pool of {n:,} rows x {args.repro_dim} ({load()})")
        t_commit = build_workspace(ws, n, args.repro_dim, root, args)
        _, t_first, _ = measure(lambda w=ws: sh("dvc", "status", cwd=w))  # type: ignore[misc]
        status, t_status, _, k_s = best_of(lambda w=ws: sh("dvc", "status", cwd=w), **rep)  # type: ignore[misc]
        out, t_repro, _, k_r = best_of(lambda w=ws: sh("dvc", "repro", cwd=w), **rep)  # type: ignore[misc]
        ran = [line for line in out.splitlines() if line.startswith("Running stage")]
        unchanged = subprocess.run(["git", "diff", "--quiet", "dvc.lock"], cwd=ws).returncode == 0
        _, t_inbox, _ = measure(
            lambda w=ws: sh("dvc", "repro", "--single-item", "inbox", cwd=w)  # type: ignore[misc]
        )
        print(
            f"  dvc commit -f {t_commit:6.1f} s; dvc status first {t_first:5.2f} s, best"
            f" {t_status:5.2f} s (of {k_s}); dvc repro {t_repro:5.2f} s (of {k_r});"
            f" repro of inbox alone {t_inbox:5.2f} s"
        )
        print(
            f"  repro ran {[line.split()[2] for line in ran]}, dvc.lock unchanged {unchanged},"
            f" status says {status.strip().splitlines()[-1] if status.strip() else '(nothing)'!r}"
            f" ({load()})"
        )
        shutil.rmtree(ws)


# ---------------------------------------------------------------- cache


def cache_layout(
    repo: Path, csv_max: int | None, root: Path, args: argparse.Namespace
) -> list[tuple[int, int, int, int]]:
    """Four versions (a pool, then three increments) recorded by ``dvc add``; per version
    (rows added, bytes added to .dvc/cache, of which .dir listings, files added).
    ``csv_max`` None writes the old store (CSV alone + the same images)."""
    for cmd in (("git", "init", "-q"), ("dvc", "init", "-q"), ("git", "commit", "-qm", "init")):
        sh(*cmd, cwd=repo)
    rng = np.random.default_rng(args.seed + 2)
    pool = make_pool(args.cache_rows, args.cache_dim, batches=1, rng=rng)
    folder, cache, ckpt = repo / "pools" / "demo", repo / ".dvc" / "cache", root / "model.ckpt"
    write_images(pool, folder / IMAGES_DIR, named="pool")
    ckpt.write_bytes(b"model" * 1000)
    steps = []
    for version in range(4):
        sources: dict[str, Path] = {}
        added = len(pool)
        if version:
            inbox = root / f"cache-inbox-{version}"
            cands = make_rows(
                args.cache_picks,
                args.cache_dim,
                batch=version,
                rng=rng,
                picked=False,
                source=str(inbox),
            )
            write_images(cands, inbox, named="inbox")
            chosen = cands[["filenames", "content_hash"]].assign(
                pick_rank=np.arange(1, len(cands) + 1), pick_distance=0.5
            )
            pool = merge_increment(pool, cands, chosen, weak_labels=True)
            sources, added = image_sources(cands), len(cands)
        if csv_max is None:
            write_table(pool, folder / POOL_CSV)
            shutil.copyfile(ckpt, folder / CHECKPOINT)
            for digest, path in sources.items():
                shutil.copyfile(path, folder / IMAGES_DIR / image_name(digest, path.name))
        else:
            save_pool(folder, pool, checkpoint=ckpt, sources=sources, csv_max_rows=csv_max)
        before, before_dir = folder_bytes(cache), folder_bytes(cache, "*.dir")
        sh("dvc", "add", "-q", "pools/demo", cwd=repo)
        sh("git", "add", "pools/demo.dvc", "pools/.gitignore", cwd=repo)
        sh("git", "commit", "-qm", f"v{version}", cwd=repo)
        after, after_dir = folder_bytes(cache), folder_bytes(cache, "*.dir")
        steps.append(
            (added, after[0] - before[0], after_dir[0] - before_dir[0], after[1] - before[1])
        )
    return steps


def run_cache(root: Path, args: argparse.Namespace) -> None:
    """Bytes per version in .dvc/cache: shards (csv_max_rows 0 and default) vs the old CSV."""
    rows, picks, d = args.cache_rows, args.cache_picks, args.cache_dim
    print(f"\n== cache: {rows:,} x {d} pool, then 3 increments of {picks:,} rows ({load()})")
    layouts = {
        "shards+packs, csv_max_rows=0": 0,
        f"shards+packs, csv_max_rows={CSV_MAX_ROWS}": CSV_MAX_ROWS,
        "old csv store (loose images)": None,
    }
    for name, csv_max in layouts.items():
        repo = root / "cache-repo"
        repo.mkdir()
        t0 = time.perf_counter()
        steps = cache_layout(repo, csv_max, root, args)
        total, files = folder_bytes(repo / ".dvc" / "cache")
        shutil.rmtree(repo)
        text = "; ".join(
            f"v{v} +{b / 1e6:.2f} MB (.dir {b_dir:,} B, {f} files)"
            for v, (_, b, b_dir, f) in enumerate(steps)
        )
        per_row = ", ".join(f"{b / a:.0f} ({(b - b_dir) / a:.0f})" for a, b, b_dir, _ in steps[1:])
        growth = steps[3][1] / steps[2][1]
        print(f"  {name}: {text}")
        print(
            f"    bytes per row added (without .dir): v0 {steps[0][1] / steps[0][0]:.0f},"
            f" v1..v3 {per_row};"
            f" v3/v2 {growth:.2f}x;"
            f" cache {total / 1e6:.1f} MB in {files} files ({time.perf_counter() - t0:.0f} s)"
        )
    print(f"  ({load()})")


# ---------------------------------------------------------------- main


def parse(argv: Iterable[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--rows", nargs="+", type=int, default=[10_000, 100_000], help="io: rows")
    ap.add_argument("--dims", nargs="+", type=int, default=[128, 512], help="io: D")
    ap.add_argument("--csv-up-to", type=int, default=100_000, help="io: old CSV up to these rows")
    ap.add_argument(
        "--batch-rows", type=int, default=10_000, help="rows per batch (shard) of a pool"
    )
    ap.add_argument("--inc-rows", nargs="+", type=int, default=[300, 20_000])
    ap.add_argument("--inc-candidates", type=int, default=2000)
    ap.add_argument("--inc-picks", type=int, default=200)
    ap.add_argument("--inc-dim", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="increment: cProfile one more run")
    ap.add_argument(
        "--selection",
        choices=("plain", "default"),
        default="plain",
        help="increment: plain k-center, or params.yaml's default strategies (herding...)",
    )
    ap.add_argument(
        "--pool-cache",
        help="increment: keep each built pool here and reuse it in later runs (a 1M-row pool"
        " takes 6-13 min to build; it is put back after every increment)",
    )
    ap.add_argument("--csv-max", nargs="+", type=int, default=None, help="increment: csv_max_rows"
                    " settings to time (default: the default and 0)")  # fmt: skip
    ap.add_argument("--repro-rows", nargs="+", type=int, default=[10_000, 100_000])
    ap.add_argument("--repro-dim", type=int, default=128)
    ap.add_argument("--cache-rows", type=int, default=10_000, help="cache: first version's rows")
    ap.add_argument("--cache-picks", type=int, default=1000, help="cache: rows per increment")
    ap.add_argument("--cache-dim", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="runs per timing; the best is shown")
    ap.add_argument("--repeat-budget", type=float, default=30.0, help="no repeat after a run > s")
    ap.add_argument("--tmp", help="where to write (default: the system temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--data",
        choices=["random", "clustered"],
        default="random",
        help="embeddings: random unit directions, or 100 tight clusters (see unit_vectors)",
    )
    return ap.parse_args(argv)


def io_cases(root: Path, args: argparse.Namespace) -> None:
    """``run_io`` for every --rows x --dims that fits in memory (else says why not)."""
    for n in args.rows:
        for d in args.dims:
            need = n * d * 4 * 6 + n * 2000  # table + Arrow copies + the read-back, measured ~5x
            if need > mem_available():
                print(
                    f"\n== io {n:,} x {d}: skipped, needs ~{need / 1e9:.0f} GB,"
                    f" {mem_available() / 1e9:.0f} GB available"
                )
                continue
            rng = np.random.default_rng(args.seed)
            batches = max(1, -(-n // args.batch_rows))
            table, t_make, _ = measure(lambda: make_pool(n, d, batches=batches, rng=rng))  # noqa: B023
            print(f"\n(pool table {n:,} x {d} in {batches} batches built in {t_make:.1f} s)")
            run_io(table, root, args)
            del table


def main() -> None:
    args = parse()
    global CLUSTERS
    if args.data == "clustered":  # the same centres for the pool and the candidates
        centres = np.random.default_rng(args.seed + 1000).standard_normal((100, args.inc_dim))
        CLUSTERS = centres.astype(np.float32)
    print(f"numpy {np.__version__}, pandas {pd.__version__}, python {sys.version.split()[0]}")
    print(f"embeddings: {args.data}")
    print(f"{load()}; started {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="pool_scale-") as tmp:
        root = Path(tmp)
        if "io" in args.cases:
            io_cases(root, args)
        if "increment" in args.cases:
            run_increment(root, args)
        if "repro" in args.cases:
            run_repro(root, args)
        if "cache" in args.cases:
            run_cache(root, args)
    print(f"\n{load()}; finished {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())} UTC")


if __name__ == "__main__":
    main()
