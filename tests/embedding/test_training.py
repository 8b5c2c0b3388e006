"""SimCLR training: it learns, it is reproducible, it survives bad files, it leaves no trace."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from datapool.embedding.model import EmbeddingModel, ModelConfig, build_model, model_id
from datapool.embedding.training import (
    Augmentation,
    _autocast_dtype,
    _one_thread,
    _PairDataset,
    augment,
    nt_xent_loss,
    train_contrastive,
)
from datapool.errors import InputError
from datapool.hardware import cpu_has_native_bf16
from tests.conftest import draw_image

TINY = ModelConfig(arch="resnet18", embedding_dim=8, image_size=32)
CPU = torch.device("cpu")


@functools.cache
def start() -> EmbeddingModel:
    """``build_model(TINY, seed=0)``, built once (0.2 s a build, 2 s the first); read only."""
    return build_model(TINY, seed=0)


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """16 drawn PNGs, made once: every test only reads them."""
    root = tmp_path_factory.mktemp("train")
    return [draw_image(root / f"img_{i:02d}.png", seed=i) for i in range(16)]


def train(images: list[Path], **overrides: Any) -> EmbeddingModel:
    """Train a fresh TINY model: 1 epoch, batch 8, lr 1e-3, seed 0 unless overridden.

    The fresh model is a copy of :func:`start` (the same weights as a new build).
    """
    settings: dict[str, Any] = {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "seed": 0}
    return train_contrastive(copy.deepcopy(start()), images, device=CPU, **settings | overrides)


@pytest.fixture(scope="module")
def trained(sixteen: list[Path]) -> EmbeddingModel:
    """``train(sixteen)`` (defaults, ``num_workers=0``), trained once; tests only read it."""
    return train(sixteen)


def fixed_pair_loss(model: EmbeddingModel, images: list[Path]) -> float:
    """NT-Xent of ``model`` on one fixed pair of views per image, as training computes it.

    BatchNorm uses batch statistics (train mode, on a copy), as in training: a few
    steps are too few for the running averages that eval mode would use.
    """
    dataset = _PairDataset(images, TINY.image_size, Augmentation())
    pairs = [dataset[(i, 1000 + i)] for i in range(len(images))]
    views = torch.cat([torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])])
    with torch.inference_mode():
        out = copy.deepcopy(model).train()(views)
    return float(nt_xent_loss(*out.chunk(2), temperature=0.1))


def test_one_epoch_changes_weights_and_model_id(trained: EmbeddingModel) -> None:
    before = start()
    assert model_id(trained) != model_id(before)
    assert not trained.training  # handed back ready for inference
    changed = [
        name
        for name, value in trained.state_dict().items()
        if value.is_floating_point() and not torch.equal(value, before.state_dict()[name])
    ]
    assert any(n.startswith("projection") for n in changed)
    assert any(n.startswith("backbone") for n in changed)


def test_same_seed_same_model_other_seed_other_model(
    sixteen: list[Path], trained: EmbeddingModel
) -> None:
    first = model_id(trained)  # seed 0
    assert model_id(train(sixteen, seed=0)) == first
    assert model_id(train(sixteen, seed=4)) != first


def test_worker_processes_do_not_change_the_result(
    sixteen: list[Path], trained: EmbeddingModel
) -> None:
    # Augmentation seeds travel with the sampler's items, not with the worker.
    assert model_id(train(sixteen, num_workers=2)) == model_id(trained)  # num_workers=0


def test_corrupt_image_is_skipped_with_a_warning(
    sixteen: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with caplog.at_level(logging.WARNING, logger="datapool.embedding.training"):
        trained = train([*sixteen, bad])
    assert model_id(trained) != model_id(start())
    assert any("bad.png" in record.getMessage() for record in caplog.records)


def test_too_few_readable_images_is_an_input_error(sixteen: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    with pytest.raises(InputError, match="at least 2 readable"):
        train([sixteen[0], bad])


@pytest.mark.parametrize(
    ("setting", "value"),
    [("epochs", 0), ("batch_size", 1), ("learning_rate", 0.0), ("temperature", -1.0)],
)
def test_bad_settings_are_refused(sixteen: list[Path], setting: str, value: float) -> None:
    overrides: dict[str, Any] = {setting: value}
    with pytest.raises(InputError, match=setting):
        train(sixteen, **overrides)


def test_training_lowers_the_loss_on_fixed_views(sixteen: list[Path]) -> None:
    before = fixed_pair_loss(start(), sixteen)
    trained = train(sixteen, epochs=6, batch_size=16)
    assert fixed_pair_loss(trained, sixteen) < before - 0.2


def test_embeddings_stay_unit_vectors(trained: EmbeddingModel) -> None:
    with torch.inference_mode():
        out = trained(torch.randn(4, 3, 32, 32))
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


def test_training_does_not_touch_global_rng(sixteen: list[Path]) -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    settings: dict[str, Any] = {"epochs": 1, "batch_size": 8, "learning_rate": 1e-3}
    # A new build, not a copy of start(): building must leave the global RNG alone too.
    train_contrastive(build_model(TINY, seed=0), sixteen, device=CPU, seed=0, **settings)
    assert torch.equal(torch.rand(1), expected)


def test_augment_is_a_function_of_the_generator() -> None:
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)

    def view(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return augment(image, size=24, generator=generator, recipe=Augmentation())

    assert view(0).shape == (3, 24, 24)
    assert view(0).dtype == torch.float32
    assert torch.equal(view(0), view(0))
    assert not torch.equal(view(0), view(1))


def test_nt_xent_matches_a_direct_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(5, 4, generator=generator), dim=1)
    b = torch.nn.functional.normalize(torch.randn(5, 4, generator=generator), dim=1)
    z, t = torch.cat([a, b]), 0.5
    expected = 0.0
    for i in range(10):
        partner = (i + 5) % 10
        others = [j for j in range(10) if j != i]
        denominator = sum(torch.exp(z[i] @ z[j] / t) for j in others)
        expected += float(-torch.log(torch.exp(z[i] @ z[partner] / t) / denominator))
    assert float(nt_xent_loss(a, b, temperature=t)) == pytest.approx(expected / 10, rel=1e-5)


def test_nt_xent_prefers_aligned_pairs() -> None:
    eye = torch.eye(4)
    aligned = nt_xent_loss(eye, eye, temperature=0.1)
    shuffled = nt_xent_loss(eye, eye.roll(1, dims=0), temperature=0.1)
    assert float(aligned) < 0.01 < float(shuffled)


def test_views_can_be_smaller_than_the_model_input(sixteen: list[Path]) -> None:
    dataset = _PairDataset(sixteen, 16, Augmentation())
    view_a, view_b, _ = dataset[(0, 1)]
    assert view_a.shape == view_b.shape == (3, 16, 16)
    trained = train(sixteen[:4], image_size=16)
    assert model_id(trained) != model_id(start())
    assert trained.config.image_size == 32  # it still embeds at its own size


def test_bf16_training_on_cpu_runs_and_is_reproducible(sixteen: list[Path]) -> None:
    # Forced on: emulated where the CPU lacks it, but the arithmetic is the same.
    first, second = train(sixteen[:4], bf16=True), train(sixteen[:4], bf16=True)
    assert model_id(first) == model_id(second) != model_id(start())


def test_autocast_follows_the_device_and_the_cpu() -> None:
    native = cpu_has_native_bf16()
    assert _autocast_dtype(CPU, None) == (torch.bfloat16 if native else None)
    assert _autocast_dtype(CPU, False) is None
    assert _autocast_dtype(CPU, True) == torch.bfloat16


@pytest.fixture
def three_threads() -> Iterator[int]:
    """Torch on 3 threads for the test (an xdist worker runs on 1, see tests/conftest.py,
    where "restored to 1" could not be told from "never changed")."""
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(saved)


def test_the_thread_count_is_restored_after_each_batch(three_threads: int) -> None:
    made, used = [], []

    def batches() -> Iterator[int]:
        for i in range(3):
            made.append(torch.get_num_threads())
            yield i

    for _ in _one_thread(batches()):
        used.append(torch.get_num_threads())
    assert made == [1, 1, 1]
    assert used == [three_threads] * 3
    assert torch.get_num_threads() == three_threads
