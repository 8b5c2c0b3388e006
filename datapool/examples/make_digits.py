"""Regenerate the bundled example: real handwritten digits from scikit-learn.

scikit-learn ships 1,797 labelled 8x8 scans of handwritten digits
(``sklearn.datasets.load_digits``, no download). This script writes a few of
them as 32x32 grayscale PNGs into two inbox folders, ``batch_1`` and
``batch_2``, one sub-folder per digit so the folder name is the weak label.
The output is committed; run this only to change the example::

    python -m datapool.examples.make_digits --per-batch 120
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

EXAMPLE_DIR = Path(__file__).resolve().parent / "digits"


def write_batches(*, out_dir: Path, per_batch: int, seed: int) -> None:
    """Write ``batch_1`` and ``batch_2`` under ``out_dir``, ``per_batch`` images each.

    Images are disjoint between batches, drawn without replacement with ``seed``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    for batch in (1, 2):
        for index in order[(batch - 1) * per_batch : batch * per_batch]:
            label = int(digits.target[index])
            # 0..16 ink levels -> 0..255, upscaled so a CNN sees strokes, not pixels.
            pixels = (digits.images[index] * (255 / 16)).round().astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((32, 32), Image.Resampling.BICUBIC)
            target = out_dir / f"batch_{batch}" / str(label) / f"digit_{index:04d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--per-batch", type=int, default=120, help="images per batch (default 120)")
    parser.add_argument("--seed", type=int, default=0, help="which digits are drawn (default 0)")
    parser.add_argument("--out-dir", type=Path, default=EXAMPLE_DIR, help="where to write")
    args = parser.parse_args()
    write_batches(out_dir=args.out_dir, per_batch=args.per_batch, seed=args.seed)


if __name__ == "__main__":
    main()
