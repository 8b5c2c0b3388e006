"""The embedding model and its checkpoint: rebuild from the file alone, refuse what is unsafe."""

from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from datapool.embedding.model import (
    BACKBONES,
    ModelConfig,
    build_model,
    cached_default_weights,
    load_checkpoint,
    model_for_pool,
    model_id,
    resolve_weights,
    save_checkpoint,
)
from datapool.errors import CheckpointError, InputError

SMALL = ModelConfig(arch="resnet18", embedding_dim=8, image_size=32)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_backbone_gives_unit_vectors(arch: str) -> None:
    model = build_model(ModelConfig(arch=arch, embedding_dim=5, image_size=32), seed=0)
    with torch.inference_mode():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 5)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))


def test_seed_decides_the_weights() -> None:
    assert model_id(build_model(SMALL, seed=1)) == model_id(build_model(SMALL, seed=1))
    assert model_id(build_model(SMALL, seed=1)) != model_id(build_model(SMALL, seed=2))


def test_building_does_not_touch_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    build_model(SMALL, seed=7)
    assert torch.equal(torch.rand(1), expected)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = build_model(SMALL, seed=3)
    mid = save_checkpoint(model, tmp_path / "m.ckpt")
    loaded, loaded_id = load_checkpoint(tmp_path / "m.ckpt")
    assert loaded_id == mid == model_id(loaded)
    assert loaded.config == SMALL
    images = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), model(images))


class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_checkpoint_with_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"format": "datapool-checkpoint/1", "config": {}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)


def test_foreign_or_damaged_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a datapool checkpoint"):
        load_checkpoint(tmp_path / "other.ckpt")
    save_checkpoint(build_model(SMALL, seed=0), tmp_path / "m.ckpt")
    payload = torch.load(tmp_path / "m.ckpt", weights_only=True)
    payload["state_dict"]["projection.bias"] += 1
    torch.save(payload, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / "m.ckpt")
    payload["config"]["embedding_dim"] = 9
    torch.save(payload, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="does not match its own config"):
        load_checkpoint(tmp_path / "m.ckpt")


def test_pool_keeps_its_model(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_latest.ckpt"
    fresh = model_for_pool(path, wanted=SMALL, seed=4)
    mid = save_checkpoint(fresh, path)
    # The pool's checkpoint wins over the seed, and a config change is an error, not a silent swap.
    assert model_id(model_for_pool(path, wanted=SMALL, seed=99)) == mid
    with pytest.raises(CheckpointError, match=r"embedding_dim=8.*embedding_dim=16"):
        model_for_pool(
            path, wanted=ModelConfig(arch="resnet18", embedding_dim=16, image_size=32), seed=4
        )


def test_config_validation() -> None:
    with pytest.raises(InputError, match="not supported"):
        ModelConfig(arch="vgg11")
    with pytest.raises(InputError, match="embedding_dim"):
        ModelConfig(embedding_dim=0)
    with pytest.raises(InputError, match="precision"):
        ModelConfig(precision="fp16")


def test_precision_is_part_of_the_pool_model(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint_latest.ckpt"
    save_checkpoint(build_model(SMALL, seed=0), path)
    with pytest.raises(CheckpointError, match=r"precision='fp32'.*precision='bf16'"):
        model_for_pool(path, wanted=ModelConfig(**{**SMALL.__dict__, "precision": "bf16"}), seed=0)


def test_unavailable_pretrained_weights_explain_themselves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No network in tests: weights that are not cached must fail with advice, not a traceback.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import socket

    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(CheckpointError, match=r"embed\.weights=none"):
        build_model(ModelConfig(arch="resnet18", weights="DEFAULT"), seed=0)


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real torchvision resnet18 state dict (random init, seed 1) under the file name of
    torchvision's DEFAULT weights, as a user or the torch hub cache would have it."""
    import torchvision

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _conv1(model: torch.nn.Module) -> torch.Tensor:
    weight: torch.Tensor = model.state_dict()["backbone.conv1.weight"]
    return weight


def test_weights_file_is_loaded(resnet18_file: Path) -> None:
    model = build_model(replace(SMALL, weights=str(resnet18_file)), seed=0)
    assert torch.equal(_conv1(model), torch.load(resnet18_file)["conv1.weight"])
    assert not torch.equal(_conv1(model), _conv1(build_model(SMALL, seed=0)))


def test_a_weights_file_of_another_kind_is_refused_naming_it(
    tmp_path: Path, resnet18_file: Path
) -> None:
    other = tmp_path / "mobilenet.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, other)
    listing = tmp_path / "list.pt"
    torch.save([1, 2], listing)
    for path, why in (
        (other, "is not a torchvision resnet18 state dict"),
        (listing, "is not a torchvision resnet18 state dict: it holds a list"),
        (tmp_path / "missing.pth", "does not exist"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(f"{path} {why}")):
            build_model(replace(SMALL, weights=str(path)), seed=0)
    with pytest.raises(CheckpointError, match="resnet34 state dict"):
        build_model(replace(SMALL, arch="resnet34", weights=str(resnet18_file)), seed=0)


def test_auto_weights_are_the_cached_default_else_random(
    tmp_path: Path, resnet18_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert cached_default_weights("resnet18") is None
    assert resolve_weights("auto", "resnet18") == "none"
    auto = replace(SMALL, weights="auto")
    assert torch.equal(_conv1(build_model(auto, seed=0)), _conv1(build_model(SMALL, seed=0)))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copyfile(resnet18_file, cache / resnet18_file.name)
    assert cached_default_weights("resnet18") == cache / resnet18_file.name
    assert resolve_weights("auto", "resnet18") == "DEFAULT"
    assert resolve_weights("auto", "resnet34") == "none"  # only the arch's own file
    loaded = build_model(auto, seed=0)  # from the cache: nothing is downloaded
    assert torch.equal(_conv1(loaded), torch.load(resnet18_file)["conv1.weight"])


def test_names_and_paths_resolve_as_written() -> None:
    assert resolve_weights("none", "resnet18") == "none"
    assert resolve_weights("IMAGENET1K_V1", "resnet18") == "IMAGENET1K_V1"
    assert resolve_weights("~/w.pth", "resnet18") == str(Path.home() / "w.pth")
