"""Do embeddings carry meaning with no pretrained weights? Measured on real handwritten digits.

scikit-learn's ``load_digits`` (1,797 labelled 8x8 scans, no download) is written
as PNGs upscaled to ``--image-size`` and embedded through datapool's own path
(``embed_folder``) by each candidate embedder:

* ``pixels``: the raw 64 pixel values, L2-normalised (a reference, no model);
* ``<arch> random``: a randomly initialised backbone + projection;
* ``<arch> simclr``: the same network after ``--epochs`` of SimCLR on the digits
  (``datapool.embedding.training.train_contrastive``), time reported, with each
  augmentation recipe of ``--recipes``: ``simclr`` = SimCLR's flips and crops
  down to 20 % of the area, ``mild`` = :class:`Augmentation`'s defaults (no flip,
  crops of at least 40 %: digits are not mirror-symmetric).

For each embedder it prints leave-one-out 1-NN accuracy in the embedding (does
it carry meaning at all?), then for k picks by greedy k-center and by random
choice (``--seeds`` repeats; greedy starts from a random image each repeat):

* ``classes``: distinct digits among the k picks (of 10);
* ``logreg``: accuracy on the other images of a logistic regression trained on
  the picks' raw pixels (a fixed downstream learner: only *which* images were
  picked differs);
* ``1nn``: accuracy on the other images of 1-NN label propagation from the picks
  in the embedding.

Greedy/random ratios follow each row. Example (about 6 minutes on 2 cores)::

    python bench/embedding_quality.py --threads 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datapool.embedding.inference import embed_folder
from datapool.embedding.model import EmbeddingModel, ModelConfig, build_model
from datapool.embedding.training import Augmentation, train_contrastive
from datapool.selection import k_center_greedy

CPU = torch.device("cpu")
RECIPES = {"simclr": Augmentation(flip=0.5, min_scale=0.2), "mild": Augmentation()}


@dataclass(frozen=True)
class Digits:
    """The digits as files: ``root/<label>/digit_<i>.png``; ``pixels[i]`` is image i's 64 values."""

    root: Path
    pixels: np.ndarray  # [1797, 64] float, 0..16 ink
    labels: np.ndarray  # [1797] int


def write_digits(root: Path, image_size: int) -> Digits:
    """Write all 1,797 digits as grayscale PNGs, upscaled like datapool's bundled example."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = (image * (255 / 16)).round().astype(np.uint8)
        big = Image.fromarray(pixels, mode="L").resize((image_size,) * 2, Image.Resampling.BICUBIC)
        target = root / str(label) / f"digit_{index:04d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        big.save(target)
    return Digits(root, digits.data.astype(np.float64), digits.target.astype(np.int64))


def embed(model: EmbeddingModel, digits: Digits) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings [n, D], dataset index [n])`` of the distinct digits, via ``embed_folder``."""
    batch = embed_folder(
        input_dir=digits.root, model=model, known={}, batch_size=256, num_workers=0, device=CPU
    )
    index = np.array([int(f.path.stem.split("_")[1]) for f in batch.files])
    return batch.embeddings, index


def loo_1nn(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-NN accuracy (Euclidean), in [0, 1]."""
    x = torch.from_numpy(embeddings).double()
    dist = torch.cdist(x, x)
    dist.fill_diagonal_(float("inf"))
    nearest = dist.argmin(dim=1).numpy()
    return float((labels[nearest] == labels).mean())


def pick_scores(
    picks: np.ndarray, embeddings: np.ndarray, pixels: np.ndarray, labels: np.ndarray
) -> tuple[float, float, float]:
    """``(classes covered, logreg accuracy, 1-NN accuracy)``, both on the images not picked."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rest = np.setdiff1d(np.arange(len(labels)), picks)
    covered = float(len(np.unique(labels[picks])))
    if covered > 1:
        scaler = StandardScaler().fit(pixels[picks])
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(pixels[picks]), labels[picks])
        logreg = float(clf.score(scaler.transform(pixels[rest]), labels[rest]))
    else:
        logreg = float((labels[rest] == labels[picks][0]).mean())
    vectors = torch.from_numpy(embeddings).double()  # float32 ties collapse near-equal rows
    dist = torch.cdist(vectors[rest], vectors[picks])
    nn_labels = labels[picks][dist.argmin(dim=1).numpy()]
    return covered, logreg, float((nn_labels == labels[rest]).mean())


def greedy_picks(embeddings: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-center greedy from a random first image (it always starts at row 0: rows are permuted)."""
    order = rng.permutation(len(embeddings))
    selection = k_center_greedy(embeddings[order], n_samples=k)
    return order[np.asarray(selection.indices)]


def compare(
    name: str, embeddings: np.ndarray, digits: Digits, *, ks: list[int], seeds: int
) -> list[str]:
    """Table rows for one embedder: greedy vs random at each k, mean over seeds."""
    pixels, labels = digits.pixels, digits.labels
    rows = [f"{name:28s} LOO 1-NN accuracy {loo_1nn(embeddings, labels):.3f}"]
    for k in ks:
        scores: dict[str, list[tuple[float, float, float]]] = {"greedy": [], "random": []}
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            pickers: dict[str, Callable[[], np.ndarray]] = {
                "greedy": lambda rng=rng, k=k: greedy_picks(embeddings, k, rng),
                "random": lambda rng=rng, k=k: rng.choice(len(labels), size=k, replace=False),
            }
            for how, pick in pickers.items():
                scores[how].append(pick_scores(pick(), embeddings, pixels, labels))
        g, r = np.mean(scores["greedy"], axis=0), np.mean(scores["random"], axis=0)
        rows.append(
            f"{'':28s} k={k:<4d} classes {g[0]:4.1f} vs {r[0]:4.1f} ({g[0] / r[0]:.2f}x)  "
            f"logreg {g[1]:.3f} vs {r[1]:.3f} ({g[1] / r[1]:.2f}x)  "
            f"1nn {g[2]:.3f} vs {r[2]:.3f} ({g[2] / r[2]:.2f}x)"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--image-size", type=int, default=32, help="pixels (default 32)")
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50, 100], help="picks")
    parser.add_argument("--seeds", type=int, default=5, help="repeats of each selection")
    parser.add_argument("--epochs", type=int, default=5, help="SimCLR epochs; 0 = skip SimCLR")
    parser.add_argument("--batch-size", type=int, default=128, help="SimCLR images per step")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES))
    parser.add_argument("--lr", type=float, default=1e-3, help="SimCLR peak learning rate")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--limit", type=int, default=0, help="train on the first N digits only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        digits = write_digits(Path(tmp), args.image_size)
        pixels = digits.pixels / np.linalg.norm(digits.pixels, axis=1, keepdims=True)
        print(f"digits: {len(digits.labels)} images at {args.image_size} px\n")
        for row in compare(
            "pixels", pixels.astype(np.float32), digits, ks=args.ks, seeds=args.seeds
        ):
            print(row)
        for arch in args.archs:
            config = ModelConfig(
                arch=arch, embedding_dim=args.embedding_dim, image_size=args.image_size
            )
            model = build_model(config, seed=0)
            vectors, index = embed(model, digits)
            digits_n = Digits(digits.root, digits.pixels[index], digits.labels[index])
            for row in compare(f"{arch} random", vectors, digits_n, ks=args.ks, seeds=args.seeds):
                print(row)
            if args.epochs < 1:
                continue
            files = sorted(digits.root.rglob("*.png"), key=lambda p: p.name)  # mixed digits
            files = files[: args.limit] if args.limit else files
            for recipe in args.recipes:
                start = time.perf_counter()
                trained = train_contrastive(
                    build_model(config, seed=0), files, epochs=args.epochs,
                    batch_size=args.batch_size, learning_rate=args.lr,
                    temperature=args.temperature, seed=0, device=CPU,
                    augmentation=RECIPES[recipe],
                )  # fmt: skip
                took = time.perf_counter() - start
                vectors, _ = embed(trained, digits)
                name = f"{arch} {recipe} {args.epochs}ep {took:.0f}s"
                for row in compare(name, vectors, digits_n, ks=args.ks, seeds=args.seeds):
                    print(row)
            print()


if __name__ == "__main__":
    main()
