"""Sharded hashing and embedding (datapool.embedding.sharded) against one process.

Two real gloo ranks (forked, FileStore rendezvous in tmp_path, see tests.ranks)
hash and embed a folder of PNGs drawn with PIL, with duplicates, a truncated
file and a vanished one in the second rank's slice; every rank must end with
exactly the one-process result.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from datapool.distributed import World
from datapool.embedding.inference import discover_batch, embed_files, embed_folder, hash_files
from datapool.embedding.model import ModelConfig, build_model
from datapool.embedding.sharded import embed_files_sharded, hash_files_sharded
from datapool.errors import InputError
from datapool.images import ImageFile
from tests.ranks import run_ranks

MODEL = build_model(ModelConfig(arch="resnet18", embedding_dim=8, image_size=32), seed=0)
CPU = torch.device("cpu")


def _files(root: Path) -> list[ImageFile]:
    """The folder's images plus a file that vanished after discovery (rank 1's slice)."""
    files, _ = discover_batch(root)
    gone = ImageFile(root / "z_gone.png", "z_gone.png", "")
    return [*files, gone]


def _rank_work(world: World, root: Path, out: Path) -> None:
    files = _files(root)
    result: dict[str, Any] = {"hashed": hash_files_sharded(files, world=world, threads=2)}
    readable = [f for f in files if f.relpath != "z_gone.png"]
    result["embedded"] = embed_files_sharded(
        readable, model=MODEL, batch_size=3, num_workers=0, device=CPU, world=world
    )
    try:  # rank 1 sees one file fewer: both ranks must refuse
        hash_files_sharded(files[: len(files) - world.rank], world=world)
    except InputError as err:
        result["mismatch"] = str(err)
    try:  # a failure on rank 1 alone reaches rank 0 instead of leaving it waiting
        embed_files_sharded(
            readable, model=MODEL, batch_size=3, num_workers=-world.rank, device=CPU, world=world
        )
    except (InputError, ValueError) as err:
        result["failure"] = f"{type(err).__name__}: {err}"
    result["folder"] = embed_folder(
        input_dir=root, model=MODEL, known={}, batch_size=3, num_workers=0, device=CPU,
        world=world,
    )  # fmt: skip
    (out / f"rank{world.rank}.pkl").write_bytes(pickle.dumps(result))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import draw_image

    root = tmp_path_factory.mktemp("inbox")
    for i in range(9):
        draw_image(root / f"{'ab'[i % 2]}/img_{i}.png", seed=i)
    draw_image(root / "b/twin_of_3.png", seed=3)
    (root / "b/x_broken.png").write_bytes((root / "a/img_0.png").read_bytes()[:50])
    return root


@pytest.fixture(scope="module")
def ranks(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("sharded")
    run_ranks(_rank_work, 2, out, folder, out)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(2)]


def test_hashes_and_unreadable_files_equal_one_process(
    folder: Path, ranks: list[dict[str, Any]]
) -> None:
    hashes, unreadable = hash_files(_files(folder))
    assert list(unreadable) == ["z_gone.png"]
    assert hashes[-1] is None and hashes.count(hashes[3]) == 1
    for result in ranks:
        assert result["hashed"] == (hashes, unreadable)


def test_embeddings_and_decode_failures_equal_one_process(
    folder: Path, ranks: list[dict[str, Any]]
) -> None:
    files, _ = discover_batch(folder)
    # one process, other batch boundaries (4 here, 3 on each rank)
    vectors, failed = embed_files(files, model=MODEL, batch_size=4, num_workers=0, device=CPU)
    assert list(failed) == ["b/x_broken.png"]  # in rank 1's slice
    for result in ranks:
        got, got_failed = result["embedded"]
        assert got_failed == failed
        assert list(got) == list(vectors)  # same files, in file order
        for name, vector in vectors.items():
            # observed: up to 1.4e-6 apart where a row met another batch size (kernels
            # block differently for 1, 2, 5 rows), else bit-identical
            np.testing.assert_allclose(got[name], vector, atol=1e-4, rtol=0)


def test_ranks_with_different_files_or_a_failure_all_refuse(ranks: list[dict[str, Any]]) -> None:
    for result in ranks:
        assert "ranks discovered different image lists" in result["mismatch"]
        assert "rank 0: 12 files, rank 1: 11 files" in result["mismatch"]
    assert ranks[1]["failure"].startswith("ValueError: ")  # its own error
    assert ranks[0]["failure"].startswith("InputError: rank 1: ValueError")


def test_embed_folder_with_a_world_equals_one_process(
    folder: Path, ranks: list[dict[str, Any]]
) -> None:
    one = embed_folder(
        input_dir=folder, model=MODEL, known={}, batch_size=4, num_workers=0, device=CPU
    )
    for result in ranks:
        got = result["folder"]
        assert got.files == one.files and got.hashes == one.hashes
        assert got.corrupt == one.corrupt and got.duplicates == one.duplicates
        assert got.batch_id == one.batch_id
        np.testing.assert_allclose(got.embeddings, one.embeddings, atol=1e-4, rtol=0)


def test_one_process_world_is_the_plain_functions(folder: Path) -> None:
    from datapool.distributed import single

    files = _files(folder)
    assert hash_files_sharded(files, world=single()) == hash_files(files)
    vectors, _ = embed_files_sharded(
        files[:3], model=MODEL, batch_size=2, num_workers=0, device=CPU, world=single()
    )
    assert list(vectors) == [f.relpath for f in files[:3]]
