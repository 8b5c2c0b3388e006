"""Embedding a folder: duplicates once, corrupt files listed, pool embeddings reused."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datapool.embedding.inference import (
    AUTO_SIZE_MAX,
    auto_image_size,
    embed_folder,
    read_ahead,
    resolve_device,
)
from datapool.embedding.model import ModelConfig, build_model
from datapool.errors import InputError

MODEL = build_model(ModelConfig(arch="resnet18", embedding_dim=8, image_size=32), seed=0)
CPU = torch.device("cpu")


def embed(folder: Path, *, known: dict[str, np.ndarray] | None = None, workers: int = 0):  # type: ignore[no-untyped-def]
    return embed_folder(
        input_dir=folder,
        model=MODEL,
        known=known or {},
        batch_size=4,
        num_workers=workers,
        device=CPU,
    )


def test_folder_with_duplicates_and_corrupt_files(make_images: Callable[..., Path]) -> None:
    root = make_images(
        "inbox", {"cats/a.png": 1, "cats/b.png": 2, "dogs/c.png": 3, "dogs/copy_of_a.png": 1}
    )
    (root / "dogs" / "broken.png").write_bytes((root / "cats" / "b.png").read_bytes()[:40])
    batch = embed(root)
    assert [f.relpath for f in batch.files] == ["cats/a.png", "cats/b.png", "dogs/c.png"]
    assert [f.label for f in batch.files] == ["cats", "cats", "dogs"]
    assert batch.duplicates == {"dogs/copy_of_a.png": "cats/a.png"}
    assert list(batch.corrupt) == ["dogs/broken.png"]
    assert batch.embeddings.shape == (3, 8) and batch.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch.embeddings, axis=1), 1.0, rtol=1e-5)
    table = batch.to_table(model_id="m", source="inbox")
    assert list(table.columns[:2]) == ["filenames", "embedding_0"]
    assert table["content_hash"].is_unique


def test_known_embeddings_are_reused(make_images: Callable[..., Path]) -> None:
    root = make_images("inbox", {"a.png": 1, "b.png": 2})
    first = embed(root)
    marker = np.full(8, 0.5, np.float32)
    again = embed(root, known={first.hashes[0]: marker})
    assert again.reused == 1
    np.testing.assert_array_equal(again.embeddings[0], marker)
    # Batch composition changes CPU kernels, hence rounding: equal to ~1e-6, not bitwise.
    np.testing.assert_allclose(again.embeddings[1], first.embeddings[1], atol=1e-5)


def test_batch_id_follows_content_not_names(make_images: Callable[..., Path]) -> None:
    one = embed(make_images("one", {"a.png": 1, "b.png": 2}))
    renamed = embed(make_images("two", {"x/y.png": 2, "z.png": 1}))
    other = embed(make_images("three", {"a.png": 1, "b.png": 3}))
    assert one.batch_id == renamed.batch_id != other.batch_id


def test_worker_processes_give_the_same_embeddings(make_images: Callable[..., Path]) -> None:
    root = make_images("inbox", {f"{i}.png": i for i in range(6)})
    np.testing.assert_allclose(embed(root).embeddings, embed(root, workers=2).embeddings, atol=1e-6)


def test_empty_or_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(InputError, match="no images found"):
        embed(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        embed(tmp_path / "missing")


def test_bf16_precision_stays_close_to_fp32(make_images: Callable[..., Path]) -> None:
    root = make_images("inbox", {f"{i}.png": i for i in range(4)})
    config = ModelConfig(arch="resnet18", embedding_dim=8, image_size=32, precision="bf16")
    half = build_model(config, seed=0)
    half.load_state_dict(MODEL.state_dict())
    fast = embed_folder(
        input_dir=root, model=half, known={}, batch_size=4, num_workers=0, device=CPU
    )
    exact = embed(root)
    assert not np.array_equal(fast.embeddings, exact.embeddings)  # bf16 really ran
    np.testing.assert_allclose(fast.embeddings, exact.embeddings, atol=0.03)
    np.testing.assert_allclose(np.linalg.norm(fast.embeddings, axis=1), 1.0, rtol=1e-5)


def test_device_resolution() -> None:
    assert resolve_device("cpu") == CPU
    assert resolve_device("auto").type in {"cpu", "cuda"}
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda")


def test_read_ahead_keeps_order_and_reraises() -> None:
    assert list(read_ahead(iter(range(5)))) == [0, 1, 2, 3, 4]
    assert list(read_ahead(iter([]))) == []

    def broken() -> Iterator[int]:
        yield 1
        raise OSError("disk vanished")

    seen: list[int] = []
    with pytest.raises(OSError, match="disk vanished"):
        seen.extend(read_ahead(broken()))
    assert seen == [1]


def _sized(root: Path, sizes: list[tuple[int, int]]) -> list[Path]:
    """Plain PNGs of the given (width, height), in name order."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i, 0, 0)).save(root / f"{i:03d}.png")
        paths.append(root / f"{i:03d}.png")
    return paths


@pytest.mark.parametrize(
    ("sizes", "side"),
    [
        ([(28, 28)] * 5, 32),  # digits are not upscaled to 224
        ([(8, 8)] * 3, 32),  # at least 32
        ([(640, 480)] * 3, 224),  # at most 224
        ([(100, 80), (90, 97), (30, 200)], 96),  # median short side 80 -> 96
        ([(64, 64)] * 2, 64),  # a multiple of 32 stays
    ],
)
def test_auto_image_size_follows_the_images(
    tmp_path: Path, sizes: list[tuple[int, int]], side: int
) -> None:
    assert auto_image_size(_sized(tmp_path / "in", sizes), seed=0) == side


def test_auto_image_size_reads_a_sample_and_skips_unreadable_headers(tmp_path: Path) -> None:
    paths = _sized(tmp_path / "in", [(28, 28)] * 3)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(b"not an image")
    assert auto_image_size([*paths, broken], seed=0) == 32
    assert auto_image_size([broken], seed=0) == AUTO_SIZE_MAX
    # Only `sample` headers are read: one readable of many broken ones may be missed.
    assert auto_image_size([broken] * 9 + paths[:1], seed=0, sample=1) in (32, AUTO_SIZE_MAX)
