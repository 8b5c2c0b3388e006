"""The pool's model: bootstrap a new pool, train, and re-embed the pool when the model changes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datapool.embedding.inference import embed_folder
from datapool.embedding.model import ModelConfig, build_model, model_id, save_checkpoint
from datapool.embedding.pool_model import (
    Training,
    choose_model,
    reembed_pool,
    resolve_image_size,
)
from datapool.errors import InputError, PoolError
from datapool.increment import image_sources
from datapool.pool import CHECKPOINT, IMAGES_DIR, embeddings_of
from datapool.transaction import save_pool

CONFIG = ModelConfig(arch="resnet18", embedding_dim=8, image_size=32)
CPU = torch.device("cpu")
QUICK: dict[str, Any] = {"learning_rate": 1e-3, "batch_size": 4}


def _pool(tmp_path: Path, make_images: Callable[..., Path]) -> tuple[Path, pd.DataFrame]:
    """A real pool of 4 drawn images embedded by a random model (seed 0)."""
    inbox = make_images("inbox", {f"{c}/{i}.png": 10 * i + ord(c) for c in "ab" for i in range(2)})
    model = build_model(CONFIG, seed=0)
    mid = save_checkpoint(model, tmp_path / "model.ckpt")
    batch = embed_folder(
        input_dir=inbox, model=model, known={}, batch_size=4, num_workers=0, device=CPU
    )
    table = batch.to_table(model_id=mid, source=str(inbox)).assign(pick_rank=1, pick_distance=1.0)
    save_pool(
        tmp_path / "pool", table, checkpoint=tmp_path / "model.ckpt", sources=image_sources(table)
    )
    return tmp_path / "pool", table


def test_new_pool_is_bootstrapped_and_reproducibly(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    inbox = make_images("inbox", {f"{i}.png": i for i in range(6)})
    settings = Training(bootstrap_epochs=1, **QUICK)

    def choose() -> str:
        return model_id(
            choose_model(
                pool_dir=tmp_path / "none",
                pool=None,
                wanted=CONFIG,
                seed=0,
                training=settings,
                input_dir=inbox,
                device=CPU,
            )
        )

    first = choose()
    assert first != model_id(build_model(CONFIG, seed=0))  # training changed the weights
    assert choose() == first  # the same seed and images give the same model


def test_bootstrap_trains_on_a_bounded_seeded_sample(
    tmp_path: Path, make_images: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = make_images("inbox", {f"{i:02d}.png": i for i in range(10)})
    seen: list[list[Path]] = []

    def record(model: object, images: list[Path], **kwargs: object) -> object:
        seen.append(list(images))
        return model

    monkeypatch.setattr("datapool.embedding.pool_model.train_contrastive", record)
    for _ in range(2):
        choose_model(
            pool_dir=tmp_path / "none",
            pool=None,
            wanted=CONFIG,
            seed=3,
            training=Training(bootstrap_epochs=1, max_images=4, **QUICK),
            input_dir=inbox,
            device=CPU,
        )
    assert len(seen[0]) == 4 and seen[0] == seen[1] == sorted(seen[0])


def test_existing_pool_keeps_its_model_without_training(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    pool_dir, table = _pool(tmp_path, make_images)
    chosen = choose_model(
        pool_dir=pool_dir,
        pool=table,
        wanted=CONFIG,
        seed=0,
        training=Training(bootstrap_epochs=3, **QUICK),
        input_dir=tmp_path,
        device=CPU,
    )
    assert model_id(chosen) == table["model_id"].iloc[0]
    assert (
        reembed_pool(
            pool_dir=pool_dir,
            pool=table,
            model=chosen,
            model_id=model_id(chosen),
            batch_size=4,
            num_workers=0,
            device=CPU,
        )
        is None
    )


def test_training_reembeds_the_pool_from_its_own_images(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    pool_dir, table = _pool(tmp_path, make_images)
    inbox = tmp_path / "inbox"
    trained = choose_model(
        pool_dir=pool_dir,
        pool=table,
        wanted=CONFIG,
        seed=1,
        training=Training(epochs=1, **QUICK),
        input_dir=inbox,
        device=CPU,
    )
    new_id = model_id(trained)
    assert new_id != table["model_id"].iloc[0]
    for image in inbox.rglob("*.png"):
        image.unlink()  # the inbox is gone: re-embedding must use the pool's own copies
    fresh = reembed_pool(
        pool_dir=pool_dir,
        pool=table,
        model=trained,
        model_id=new_id,
        batch_size=4,
        num_workers=0,
        device=CPU,
    )
    assert fresh is not None
    assert set(fresh["model_id"]) == {new_id}
    assert list(fresh["content_hash"]) == list(table["content_hash"])
    assert not np.allclose(embeddings_of(fresh), embeddings_of(table), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(embeddings_of(fresh), axis=1), 1.0, rtol=1e-5)


def test_missing_pool_images_stop_reembedding(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    # The pool's pack not checked out, and one original gone from the inbox: that image
    # is nowhere (the others are read from their originals, checked by content hash).
    pool_dir, table = _pool(tmp_path, make_images)
    next((pool_dir / IMAGES_DIR).iterdir()).unlink()
    gone = table.iloc[2]
    (Path(gone["source"]) / gone["filenames"]).unlink()
    other = build_model(CONFIG, seed=5)
    with pytest.raises(
        PoolError, match=rf"'{gone['filenames']}' is neither in .* are needed to re-embed"
    ):
        reembed_pool(
            pool_dir=pool_dir,
            pool=table,
            model=other,
            model_id=model_id(other),
            batch_size=4,
            num_workers=0,
            device=CPU,
        )
    assert (pool_dir / CHECKPOINT).exists()


def test_pretrained_weights_skip_the_bootstrap(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    import torchvision

    inbox = make_images("inbox", {f"{i}.png": i for i in range(4)})
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    wanted = replace(CONFIG, weights=str(weights))
    model = choose_model(
        pool_dir=tmp_path / "new", pool=None, wanted=wanted, seed=0,
        training=Training(bootstrap_epochs=1, learning_rate=1e-3, batch_size=4),
        input_dir=inbox, device=CPU,
    )  # fmt: skip
    assert model_id(model) == model_id(build_model(wanted, seed=0))  # untrained


def test_image_size_auto_follows_the_batch_then_the_pool(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    inbox = make_images("inbox", {f"{i}.png": i for i in range(3)})  # 24 px drawings
    new = tmp_path / "new"
    assert resolve_image_size("auto", pool_dir=new, input_dir=inbox, seed=0) == (32, "images")
    assert resolve_image_size("48", pool_dir=new, input_dir=inbox, seed=0) == (48, "setting")
    assert resolve_image_size(224, pool_dir=new, input_dir=inbox, seed=0) == (224, "setting")
    pool = tmp_path / "pool"
    pool.mkdir()
    save_checkpoint(build_model(replace(CONFIG, image_size=64), seed=0), pool / CHECKPOINT)
    assert resolve_image_size("auto", pool_dir=pool, input_dir=inbox, seed=0) == (
        64,
        "checkpoint",
    )
    with pytest.raises(InputError, match=r"embed\.image_size must be auto or a whole number"):
        resolve_image_size("big", pool_dir=new, input_dir=inbox, seed=0)


def test_a_new_model_above_the_bootstrap_size_is_not_bootstrapped(
    tmp_path: Path, make_images: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    inbox = make_images("inbox", {f"{i}.png": i for i in range(4)})
    training = Training(bootstrap_epochs=1, learning_rate=1e-3, batch_size=4, max_image_size=16)
    model = choose_model(
        pool_dir=tmp_path / "new", pool=None, wanted=CONFIG, seed=0, training=training,
        input_dir=inbox, device=CPU,
    )  # fmt: skip
    assert model_id(model) == model_id(build_model(CONFIG, seed=0))  # random weights kept
    assert "no bootstrap: embed.image_size=32 is above the 16 px" in caplog.text


def test_image_size_auto_stays_within_the_cap(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    inbox = tmp_path / "photos"
    inbox.mkdir()
    for i in range(3):
        Image.new("RGB", (640, 480), (i, 0, 0)).save(inbox / f"{i}.jpg")
    new = tmp_path / "new"
    assert resolve_image_size("auto", pool_dir=new, input_dir=inbox, seed=0) == (224, "images")
    assert resolve_image_size("auto", pool_dir=new, input_dir=inbox, seed=0, cap=64) == (
        64,
        "images",
    )
    assert resolve_image_size("128", pool_dir=new, input_dir=inbox, seed=0, cap=64) == (
        128,
        "setting",
    )
