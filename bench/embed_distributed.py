"""Embedding and SimCLR training across torch.distributed CPU ranks (issue 14).

**Throughput** (default): writes ``--images`` synthetic 640x480 JPEGs (bench/embed.py's
``write_photos``), then measures images/s of

* the named peer: ``embed_folder`` in this process, one torch thread;
* the sharded path (``hash_files_sharded`` + ``embed_files_sharded``, what
  ``embed_folder`` runs with a World) on 1 and on 2 spawned gloo ranks, one torch
  thread each, timed inside the ranks between two barriers (after start-up, model
  build and a warm-up batch; the peer is warmed up the same way).

It prints images/s in all and per rank, each against the peer, the 2-rank/1-rank
ratio, each rank's CPU seconds (above the wall time: the read-ahead thread decodes
while the model runs), and the largest difference of the 2 ranks' embeddings from
the peer's. Best of ``--repeats`` rounds.

**Training** (``--train-epochs N``): what BatchNorm's per-rank statistics cost. SimCLR
on scikit-learn's 1,797 digits (bench/embedding_quality.py's ``write_digits``, 32 px)
from the same random resnet18, once in this process (``train_contrastive``), once on
2 ranks (``train_contrastive_distributed``, same global batch and seed), and two
references in this process: on 2 torch threads (how far floating-point noise alone
carries a run: another summation order) and with seed 1 (a different run). Prints
leave-one-out 1-NN accuracy in each embedding and the largest and mean differences of
the embeddings from the one-process model's.

Examples::

    python bench/embed_distributed.py --images 200
    python bench/embed_distributed.py --images 0 --train-epochs 5
    flock -x /tmp/datapool-bench.lock python bench/embed_distributed.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.multiprocessing.spawn import spawn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embed import write_photos
from bench.embedding_quality import loo_1nn, write_digits
from datapool.distributed import World, init_with_file, shutdown
from datapool.embedding.distributed_training import train_contrastive_distributed
from datapool.embedding.inference import discover_batch, embed_files, embed_folder
from datapool.embedding.model import EmbeddingModel, ModelConfig, build_model
from datapool.embedding.sharded import embed_files_sharded, hash_files_sharded
from datapool.embedding.training import train_contrastive

CPU = torch.device("cpu")


def _config(args: argparse.Namespace, image_size: int) -> ModelConfig:
    return ModelConfig(arch=args.arch, embedding_dim=64, image_size=image_size)


def _sharded_embed(model: EmbeddingModel, root: Path, batch: int, world: World) -> np.ndarray:
    """Discover, hash and embed ``root`` across ``world`` (embed_folder's steps); ``[N, D]``."""
    files, _ = discover_batch(root)
    hash_files_sharded(files, world=world)
    vectors, _ = embed_files_sharded(
        files, model=model, batch_size=batch, num_workers=0, device=CPU, world=world
    )
    return np.stack(list(vectors.values()))


def _embed_rank(rank: int, size: int, store: str, args: argparse.Namespace, root: str) -> None:
    """One rank of the throughput run: best seconds of ``args.repeats`` barrier-timed rounds."""
    torch.set_num_threads(1)
    world = init_with_file(store, rank=rank, size=size)
    try:
        model = build_model(_config(args, args.image_size), seed=0)
        embed_files(
            discover_batch(Path(root))[0][:2], model=model, batch_size=2, num_workers=0, device=CPU
        )  # warm-up: oneDNN picks kernels
        best, cpu = float("inf"), 0.0
        for _ in range(args.repeats):
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            vectors = _sharded_embed(model, Path(root), args.batch_size, world)
            dist.barrier()
            if time.perf_counter() - t0 < best:
                best, cpu = time.perf_counter() - t0, time.process_time() - c0
        result = {"seconds": best, "cpu": cpu}
        Path(store).with_suffix(f".{rank}.json").write_text(json.dumps(result))
        if rank == 0:
            np.save(Path(store).with_suffix(".npy"), vectors)
    finally:
        shutdown(world)


def _spawned(fn: Any, size: int, tmp: Path, *args: Any) -> tuple[Path, list[dict[str, Any]]]:
    """Run ``fn(rank, size, store, *args)`` on ``size`` spawned ranks; their JSON results."""
    store = tmp / f"store-{size}-{time.monotonic_ns()}"
    spawn(fn, args=(size, str(store), *args), nprocs=size)  # type: ignore[no-untyped-call]
    return store, [json.loads(store.with_suffix(f".{r}.json").read_text()) for r in range(size)]


def throughput(args: argparse.Namespace, tmp: Path) -> None:
    """The peer, then 1 and 2 ranks; one table."""
    root = tmp / "photos"
    root.mkdir()
    write_photos(root, count=args.images, width=640, height=480)
    n = args.images
    torch.set_num_threads(1)
    model = build_model(_config(args, args.image_size), seed=0)
    embed_files(discover_batch(root)[0][:2], model=model, batch_size=2, num_workers=0, device=CPU)
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        peer = embed_folder(
            input_dir=root,
            model=model,
            known={},
            batch_size=args.batch_size,
            num_workers=0,
            device=CPU,
        )
        best = min(best, time.perf_counter() - t0)
    peer_rate = n / best
    print(
        f"\nthroughput: {n} JPEGs 640x480 -> {args.arch} at {args.image_size} px fp32, "
        f"batch {args.batch_size}, 1 torch thread per process, load {os.getloadavg()[0]:.2f}"
    )
    print(f"  peer embed_folder (one process):  {peer_rate:7.1f} img/s")
    rates: dict[int, float] = {}
    for size in (1, 2):
        store, ranks = _spawned(_embed_rank, size, tmp, args, str(root))
        seconds = max(r["seconds"] for r in ranks)
        rates[size] = n / seconds
        cpu = ", ".join(f"{r['cpu']:.1f}" for r in ranks)
        diff = np.abs(np.load(store.with_suffix(".npy")) - peer.embeddings).max()
        print(
            f"  {size} rank{'s' if size > 1 else ' '}: {rates[size]:7.1f} img/s in all, "
            f"{rates[size] / size:6.1f} per rank, {rates[size] / peer_rate:.2f}x peer; "
            f"{seconds:.1f} s, CPU s per rank {cpu}; max |emb - peer| {diff:.1e}"
        )
    print(f"  2 ranks / 1 rank: {rates[2] / rates[1]:.2f}x   (load {os.getloadavg()[0]:.2f})")


def _train_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "epochs": args.train_epochs,
        "batch_size": args.train_batch_size,
        "learning_rate": 1e-3,
        "bf16": args.bf16,
    }


def _train_rank(rank: int, size: int, store: str, args: argparse.Namespace, root: str) -> None:
    """One rank of the training run; rank 0 saves the trained model's embeddings."""
    torch.set_num_threads(1)
    world = init_with_file(store, rank=rank, size=size)
    try:
        images = [f.path for f in discover_batch(Path(root))[0]]
        model = build_model(_config(args, 32), seed=0)
        t0 = time.perf_counter()
        model = train_contrastive_distributed(
            model, images, world=world, seed=0, **_train_settings(args)
        )
        seconds = time.perf_counter() - t0
        Path(store).with_suffix(f".{rank}.json").write_text(json.dumps({"seconds": seconds}))
        if rank == 0:
            vectors, _ = embed_files(
                discover_batch(Path(root))[0],
                model=model,
                batch_size=256,
                num_workers=0,
                device=CPU,
            )
            np.save(Path(store).with_suffix(".npy"), np.stack(list(vectors.values())))
    finally:
        shutdown(world)


def _embed_all(model: EmbeddingModel, root: Path) -> np.ndarray:
    vectors, _ = embed_files(
        discover_batch(root)[0], model=model, batch_size=256, num_workers=0, device=CPU
    )
    return np.stack(list(vectors.values()))


def training(args: argparse.Namespace, tmp: Path) -> None:
    """One process, 2 ranks, one process with another seed: 1-NN and embedding differences."""
    root = tmp / "digits"
    digits = write_digits(root, 32)
    files = discover_batch(root)[0]
    labels = digits.labels[[int(f.path.stem.split("_")[1]) for f in files]]
    images = [f.path for f in files]
    torch.set_num_threads(1)
    settings = _train_settings(args)
    print(
        f"\ntraining: {len(images)} digits at 32 px, {args.arch}, SimCLR {settings}, "
        f"1 torch thread per process, load {os.getloadavg()[0]:.2f}"
    )
    embedded: dict[str, np.ndarray] = {
        "random start": _embed_all(build_model(_config(args, 32), seed=0), root)
    }
    seconds: dict[str, float] = {}
    for name, seed, threads in (("1 process", 0, 1), ("1 process, 2 thr", 0, 2),
                                ("1 process, seed 1", 1, 1)):  # fmt: skip
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        model = train_contrastive(
            build_model(_config(args, 32), seed=0), images, device=CPU, seed=seed, **settings
        )
        seconds[name] = time.perf_counter() - t0
        torch.set_num_threads(1)
        embedded[name] = _embed_all(model, root)
    store, ranks = _spawned(_train_rank, 2, tmp, args, str(root))
    seconds["2 ranks"] = max(r["seconds"] for r in ranks)
    embedded["2 ranks"] = np.load(store.with_suffix(".npy"))
    one = embedded["1 process"]
    for name, emb in embedded.items():
        diff = np.abs(emb - one)
        took = f"{seconds[name]:6.1f} s" if name in seconds else " " * 8
        print(
            f"  {name:18s} 1-NN {loo_1nn(emb, labels):.3f}  {took}  |emb - 1 process| "
            f"max {diff.max():.3f} mean {diff.mean():.4f}"
        )
    print(f"  (load {os.getloadavg()[0]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=200, help="JPEGs to embed (0 = skip)")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of N rounds per figure")
    parser.add_argument("--train-epochs", type=int, default=0, help="SimCLR epochs (0 = skip)")
    parser.add_argument("--train-batch-size", type=int, default=128, help="global batch")
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    args = parser.parse_args()
    args.bf16 = args.bf16 or False
    print(f"{time.strftime('%Y-%m-%d %H:%M')} {json.dumps(asdict(_config(args, args.image_size)))}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.images:
            throughput(args, Path(tmp))
        if args.train_epochs:
            training(args, Path(tmp))


if __name__ == "__main__":
    main()
