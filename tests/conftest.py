"""Shared fixtures: real images (bundled digits or drawn with PIL), small pools."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

# Under pytest-xdist each core already runs a worker; torch's default of one thread per
# core would put workers x cores threads on the cores, and a thread waiting for a
# descheduled peer spins. Share the cores out instead (1 thread each with -n auto), unless
# the caller set OMP_NUM_THREADS. Set before any test module imports torch, which reads it
# when it starts. Measured with one core kept busy (the other worker): training and
# pool-model tests 28.4 s -> 24.4 s, strategy tests 27.3 s -> 24.5 s.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

EXAMPLES = Path(__file__).resolve().parent.parent / "datapool" / "examples" / "digits"


@pytest.fixture(scope="session")
def digits() -> Path:
    """The bundled example: ``batch_1`` and ``batch_2`` of real 32x32 handwritten digits."""
    assert (EXAMPLES / "batch_1").is_dir(), "bundled example missing"
    return EXAMPLES


def draw_image(path: Path, *, seed: int, size: int = 24) -> Path:
    """A small RGB PNG of random coloured shapes; the same seed gives the same bytes."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = x0 + int(rng.integers(4, size // 2)), y0 + int(rng.integers(4, size // 2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def make_images(tmp_path: Path) -> Callable[..., Path]:
    """``make_images(name, {relpath: seed})`` -> a folder of drawn PNGs under tmp_path."""

    def make(name: str, files: dict[str, int]) -> Path:
        root = tmp_path / name
        for relpath, seed in files.items():
            draw_image(root / relpath, seed=seed)
        return root

    return make


def foreign_dvc_project(root: Path) -> Path:
    """A committed git + DVC project that is not a datapool workspace, at ``root``.

    Its stage files are named like ours and its only stage would create
    ``root/PWNED``, so a test can see that its pipeline never ran.
    """
    from datapool.tools import git_commit, run_tool
    from datapool.workspace import TEMPLATE_FILES

    root.mkdir(parents=True, exist_ok=True)
    run_tool(["git", "init", "-q"], cwd=root, quiet=True)
    run_tool(["dvc", "init", "-q"], cwd=root, quiet=True)
    (root / "dvc.yaml").write_text("stages:\n  s:\n    cmd: touch PWNED\n")
    (root / "params.yaml").write_text("input_dir: x\n")
    for name in [n for n in TEMPLATE_FILES if n.startswith("stages/")]:
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text("print('not datapool')\n")
    git_commit(root, "someone else's project", paths=["."])
    return root
