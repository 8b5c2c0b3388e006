"""SimCLR under DDP (datapool.embedding.distributed_training) against one process.

Two real gloo ranks (forked, FileStore rendezvous, see tests.ranks) train the
project's tiny mobilenet_v3_small on PNGs drawn with PIL; one process trains the same
model with :func:`train_contrastive`. Without BatchNorm (swapped for GroupNorm,
which normalises each image alone) the two must agree to floating-point noise:
that checks the split batch, the views, the global loss and, through one
step's gradients, its scaling. With BatchNorm (trained as GlobalBatchNorm) one
step equals one process's; over several AdamW steps BatchNorm models drift
apart by rounding noise as one process does against itself (module docstring).
Every rank must end with identical weights.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from datapool.distributed import World, shard_range, single
from datapool.embedding.distributed_training import (
    _GlobalStep,
    _wrap,
    train_contrastive_distributed,
)
from datapool.embedding.inference import discover_batch, embed_files
from datapool.embedding.model import EmbeddingModel, ModelConfig, build_model
from datapool.embedding.training import Augmentation, _PairDataset, _Step, train_contrastive
from datapool.errors import InputError
from tests.ranks import run_ranks

# mobilenet_v3_small: built in 0.04 s and stepped in 0.06 s on one thread (resnet18: 2.6 s, 0.19 s)
TINY = ModelConfig(arch="mobilenet_v3_small", embedding_dim=8, image_size=32)
CPU = torch.device("cpu")
CORRUPT = "img_3.png"
# (batch_size, epochs, seed): 8 files, one corrupt -> global batches of 3, 3, 2, so rank 0
# takes 2 images and rank 1 one; seed 1 puts the corrupt file in rank 1's slot of a full
# batch in both epochs (rank 1 then has no readable image, see
# test_a_rank_can_hold_no_readable_image). Two epochs (6 AdamW steps) are several steps
# for the drift and identical-weights checks; a third cost ~2 s of the ranks' fixture.
# fp32: bf16 autocast (the default on CPUs with native bf16) would add its own noise.
RUN: dict[str, Any] = {
    "batch_size": 3,
    "epochs": 2,
    "seed": 1,
    "learning_rate": 1e-3,
    "bf16": False,
}


def _group_norm(model: EmbeddingModel) -> EmbeddingModel:
    """``model`` with every BatchNorm2d replaced by GroupNorm (per image: batch-independent)."""
    for name, module in list(model.backbone.named_modules()):
        if isinstance(module, nn.BatchNorm2d):
            parent = model.backbone.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], nn.GroupNorm(1, module.num_features))
    return model


_START = build_model(TINY, seed=0)


def _model(*, batchnorm: bool) -> EmbeddingModel:
    """A fresh copy of the same start model, with BatchNorm or with GroupNorm instead."""
    model = copy.deepcopy(_START)
    return model if batchnorm else _group_norm(model)


def _images(root: Path) -> list[Path]:
    return sorted(root.glob("*.png"))


def _embed(model: EmbeddingModel, root: Path) -> np.ndarray:
    files = [f for f in discover_batch(root)[0] if f.relpath != CORRUPT]
    vectors, _ = embed_files(files, model=model, batch_size=16, num_workers=0, device=CPU)
    return np.stack(list(vectors.values()))


def _views(root: Path, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed views ``[count, 3, 32, 32]`` each of the first ``count`` readable images."""
    readable = [p for p in _images(root) if p.name != CORRUPT][:count]
    dataset = _PairDataset(readable, TINY.image_size, Augmentation())
    pairs = [dataset[(i, 100 + i)] for i in range(count)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def _one_step(world: World, root: Path, batchnorm: bool) -> dict[str, torch.Tensor]:
    """Loss, gradients and state after one global step of 5 images (rank 0: 3, rank 1: 2)."""
    view_a, view_b = _views(root, 5)
    counts = [len(shard_range(5, World(r, world.size, CPU))) for r in range(world.size)]
    part = shard_range(5, world)
    net, ddp = _wrap(_model(batchnorm=batchnorm).train(), CPU)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.0)
    step = _GlobalStep(ddp, optimizer, world, temperature=0.1, bf16=False, size=TINY.image_size)
    loss = step(view_a[part.start : part.stop], view_b[part.start : part.stop], counts)
    grads = {
        f"grad {name}": p.grad.clone() for name, p in net.named_parameters() if p.grad is not None
    }
    return {"loss": torch.tensor(loss), **grads, **net.state_dict()}


def _rank_work(world: World, root: Path, out: Path) -> None:
    result: dict[str, Any] = {f"step-{bn}": _one_step(world, root, bn) for bn in (False, True)}
    for batchnorm in (False, True):
        model = train_contrastive_distributed(
            _model(batchnorm=batchnorm), _images(root), world=world, **RUN
        )
        result[f"weights-{batchnorm}"] = {k: v.clone() for k, v in model.state_dict().items()}
        result[f"embedded-{batchnorm}"] = _embed(model, root)
    try:  # too few readable images: every rank refuses, none waits
        train_contrastive_distributed(
            _model(batchnorm=True), _images(root)[3:5], world=world, **RUN
        )
    except InputError as err:
        result["refused"] = str(err)
    (out / f"rank{world.rank}.pkl").write_bytes(pickle.dumps(result))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import draw_image

    root = tmp_path_factory.mktemp("train")
    for i in range(8):
        draw_image(root / f"img_{i}.png", seed=i)
    (root / CORRUPT).write_bytes((root / "img_0.png").read_bytes()[:60])
    return root


@pytest.fixture(scope="module")
def ranks(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(_rank_work, 2, out, folder, out)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as each rank has: two threads on a busy 2-core host were 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _one_process(folder: Path, *, batchnorm: bool) -> EmbeddingModel:
    return train_contrastive(_model(batchnorm=batchnorm), _images(folder), device=CPU, **RUN)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_one_step_equals_one_process(
    folder: Path, ranks: list[dict[str, Any]], one_thread: None, batchnorm: bool
) -> None:
    # The global loss, its gradient (AdamW would hide one scaled by a constant) and, with
    # BatchNorm, the global batch statistics and their share of the gradient.
    view_a, view_b = _views(folder, 5)
    net = _model(batchnorm=batchnorm).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    loss = _Step(net, optimizer, temperature=0.1, device=CPU, bf16=False)(view_a, view_b)
    grads = {f"grad {name}": p.grad for name, p in net.named_parameters() if p.grad is not None}
    want = {"loss": torch.tensor(loss), **grads, **net.state_dict()}
    scale = max(float(g.abs().max()) for g in grads.values())
    for result in ranks:
        got = result[f"step-{batchnorm}"]
        assert set(got) == set(want)
        for name, value in want.items():
            # measured: 1e-5 of the largest gradient (summation order), stats to 1e-7
            atol = 1e-5 * scale if name.startswith("grad") else 1e-5
            torch.testing.assert_close(got[name], value, atol=atol, rtol=1e-4, msg=name)


def test_every_rank_ends_with_identical_weights(ranks: list[dict[str, Any]]) -> None:
    for batchnorm in (False, True):
        for name, value in ranks[0][f"weights-{batchnorm}"].items():
            assert torch.equal(value, ranks[1][f"weights-{batchnorm}"][name]), name


def test_without_batchnorm_two_ranks_equal_one_process(
    folder: Path, ranks: list[dict[str, Any]], one_thread: None
) -> None:
    # Measured at 3 epochs: embeddings 9e-7 apart; weights up to 7e-5 (AdamW divides a near-zero
    # gradient's noise by its near-zero size), against 5e-3 moved by training.
    model = _one_process(folder, batchnorm=False)
    np.testing.assert_allclose(ranks[0]["embedded-False"], _embed(model, folder), atol=1e-5)
    for name, value in ranks[0]["weights-False"].items():
        torch.testing.assert_close(value, model.state_dict()[name], atol=3e-4, rtol=0, msg=name)


def test_a_rank_can_hold_no_readable_image(folder: Path) -> None:
    # Replays the run's draws: some full batch must put the corrupt file on rank 1 alone.
    images = _images(folder)
    corrupt = images.index(folder / CORRUPT)
    generator = torch.Generator().manual_seed(RUN["seed"])
    alone = 0
    for _ in range(RUN["epochs"]):
        order = torch.randperm(len(images), generator=generator).tolist()
        torch.randint(0, 2**62, (len(images),), generator=generator)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # DataLoader's seed
        alone += sum(order[i] == corrupt for i in range(2, len(order), 3) if i + 1 < len(order))
    assert alone >= 1


def test_too_few_images_are_refused_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        assert "at least 2 readable images" in result["refused"]


def test_one_process_world_is_train_contrastive(folder: Path, one_thread: None) -> None:
    run = RUN | {"epochs": 1}
    model = train_contrastive_distributed(
        _model(batchnorm=True), _images(folder), world=single(), **run
    )
    one = train_contrastive(_model(batchnorm=True), _images(folder), device=CPU, **run)
    for name, value in model.state_dict().items():
        assert torch.equal(value, one.state_dict()[name])
