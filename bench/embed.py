"""Embedding throughput: the whole path (files -> embeddings) against the bare model.

Writes ``--images`` synthetic JPEG photos (``--width`` x ``--height``, quality 90)
to a temporary folder, then measures images per second for:

* ``bare fp32`` / ``bare bf16``: the model alone on pre-decoded, pre-resized
  tensors (channels_last, inference mode; bf16 = CPU autocast), batch ``--batch-size``;
* ``decode only``: ``load_rgb`` + ``to_model_input`` per image, one process;
* ``path wN``: ``embed_folder`` end to end (discovery, sha256, decode, model) with
  ``num_workers=N``, as datapool runs it;
* ``path+bf16 wN``: the same DataLoader loop as ``embed_folder``'s with bf16 CPU
  autocast around the model, i.e. what a bf16 patch to inference.py would give.

Each path figure is also printed as a ratio to the bare model in the same
precision (the issue's target: >= 0.90). Example (about 3 minutes on 2 cores)::

    python bench/embed.py --images 500
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from datapool.embedding.inference import _collate, _ImageDataset, embed_folder, to_model_input
from datapool.embedding.model import EmbeddingModel, ModelConfig, build_model
from datapool.images import discover_images, load_rgb

CPU = torch.device("cpu")


def write_photos(root: Path, *, count: int, width: int, height: int) -> None:
    """``count`` JPEGs of smooth colour fields plus noise: photo-like to the JPEG codec."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        a, b, c = rng.uniform(0.002, 0.02, 3)
        field = np.stack([np.sin(a * xx + i), np.cos(b * yy), np.sin(c * (xx + yy))], axis=-1)
        noise = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(127 + 100 * field + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"photo_{i:04d}.jpg", quality=90)


def rate(count: int, runs: dict[str, Callable[[], object]], *, repeats: int) -> dict[str, float]:
    """Best images/s of each run (each handles ``count`` images) over ``repeats`` rounds.

    Rounds interleave the runs, so a change in the machine's load hits all of them
    rather than the ones that happened to run while it was busy.
    """
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: count / seconds for name, seconds in best.items()}


def bare_model(model: EmbeddingModel, inputs: torch.Tensor, batch: int, bf16: bool) -> None:
    """The model alone over pre-decoded ``inputs [N, 3, S, S]``, as ``_run_model`` calls it."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for chunk in inputs.split(batch):
            model(chunk.contiguous(memory_format=torch.channels_last)).float()


def loader_path(model: EmbeddingModel, root: Path, batch: int, workers: int, bf16: bool) -> None:
    """``_run_model``'s loop (DataLoader over ``_ImageDataset``), optionally under bf16 autocast."""
    files = discover_images(root)
    loader = DataLoader(
        _ImageDataset(files, model.config.image_size),
        batch_size=batch,
        num_workers=workers,
        collate_fn=_collate,
    )
    with torch.inference_mode():
        for images, _, _ in loader:
            x = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x).float().numpy()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--repeats", type=int, default=3, help="best of N runs per figure")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig(arch=args.arch, embedding_dim=64, image_size=args.image_size)
    model = build_model(config, seed=0).to(memory_format=torch.channels_last)
    n, size, batch, reps = args.images, args.image_size, args.batch_size, args.repeats
    threads, load = torch.get_num_threads(), os.getloadavg()[0]
    print(f"{n} JPEGs {args.width}x{args.height} -> {args.arch} at {size} px, batch {batch}, ")
    print(f"torch threads {threads}, load average {load:.1f} (busy machines give lower figures)")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_photos(root, count=n, width=args.width, height=args.height)
        paths = sorted(root.glob("*.jpg"))
        inputs = torch.stack([to_model_input(load_rgb(p, size_hint=size), size) for p in paths])
        for bf16 in (False, True):  # first calls pick oneDNN kernels: keep them out of the timing
            bare_model(model, inputs[:batch], batch, bf16)
        runs: dict[str, Callable[[], object]] = {
            "bare fp32": lambda: bare_model(model, inputs, batch, False),
            "bare bf16": lambda: bare_model(model, inputs, batch, True),
            "decode only": lambda: [
                to_model_input(load_rgb(p, size_hint=size), size) for p in paths
            ],
        }
        for w in args.workers:
            runs[f"path w{w}"] = partial(
                embed_folder, input_dir=root, model=model, known={}, batch_size=batch,
                num_workers=w, device=CPU,
            )  # fmt: skip
            runs[f"path+bf16 w{w}"] = partial(loader_path, model, root, batch, w, True)
        results = rate(n, runs, repeats=reps)

    for name, value in results.items():
        bare = results["bare bf16" if "bf16" in name else "bare fp32"]
        ratio = "" if name.startswith(("bare", "decode")) else f"  {value / bare:.2f} of bare"
        print(f"{name:16s} {value:8.1f} img/s{ratio}")


if __name__ == "__main__":
    main()
