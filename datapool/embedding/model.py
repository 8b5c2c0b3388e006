"""The embedding model: a torchvision backbone, a projection, L2 normalisation.

A model is fully described by a :class:`ModelConfig` plus its weights. Both go
into the checkpoint (``checkpoint_latest.ckpt``) together with a model id, the
hash of config and weights, so any stage can rebuild the exact model from the
checkpoint alone and every pool row can say which model embedded it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from datapool.atomic import atomic_open
from datapool.errors import CheckpointError, InputError

CHECKPOINT_FORMAT = "datapool-checkpoint/1"

# Backbones we know how to cut below their classifier: name -> attribute holding it.
BACKBONES: dict[str, str] = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "mobilenet_v3_small": "classifier",
}


PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines what an embedding means, apart from the weights.

    Attributes:
        arch: torchvision backbone name, one of :data:`BACKBONES`.
        embedding_dim: length D of the output vector (after the projection).
        image_size: side in pixels of the square crop the model sees.
        weights: where a new model's weights come from (:func:`resolve_weights`):
            ``"auto"`` (torchvision's DEFAULT weights when already in the torch hub
            cache, else random), ``"none"`` (random initialisation), a torchvision
            weights name (``"DEFAULT"``, ``"IMAGENET1K_V1"``, ...) or the path of a
            torchvision state dict file (``/models/resnet18-f37072fd.pth``). Only used
            when no checkpoint exists yet; afterwards the checkpoint's weights rule.
        precision: ``"fp32"``, or ``"bf16"`` (autocast; about 2x faster on CPUs
            with bf16 support and on GPUs, coordinates differ from fp32 by ~1e-3).
            Part of the config so one pool never mixes the two.
    """

    arch: str = "resnet18"
    embedding_dim: int = 64
    image_size: int = 224
    weights: str = "none"
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.arch not in BACKBONES:
            known = ", ".join(sorted(BACKBONES))
            raise InputError(f"embed.model={self.arch!r} is not supported; choose one of {known}")
        if self.embedding_dim < 1:
            raise InputError(f"embed.embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.image_size < 16:
            raise InputError(f"embed.image_size must be >= 16 pixels, got {self.image_size}")
        if self.precision not in PRECISIONS:
            raise InputError(f"embed.precision must be fp32 or bf16, got {self.precision!r}")

    def differences(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ, as ``{name: (self_value, other_value)}``.

        ``weights`` is ignored: it only says where training started.
        """
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if f.name != "weights" and getattr(self, f.name) != getattr(other, f.name)
        }


class EmbeddingModel(nn.Module):
    """Backbone features -> linear projection -> unit vector.

    ``forward`` maps images ``[B, 3, S, S]`` (ImageNet-normalised floats) to
    embeddings ``[B, D]`` with L2 norm 1.
    """

    def __init__(self, config: ModelConfig, *, pretrained: bool = False) -> None:
        super().__init__()
        self.config = config
        weights = resolve_weights(config.weights, config.arch) if pretrained else "none"
        self.backbone, n_features = _headless_backbone(
            config.arch, None if weights.lower() == "none" else weights
        )
        self.projection = nn.Linear(n_features, config.embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return nn.functional.normalize(self.projection(features).float(), dim=1)


def is_weights_path(weights: str) -> bool:
    """Whether an ``embed.weights`` value names a file rather than torchvision weights.

    Decision: a value with a ``/``, starting with ``~``, or ending in ``.pth`` / ``.pt``
    is a path (torchvision's names have none of these), so ``weights.pth`` in the
    workspace is a file and ``IMAGENET1K_V1`` a name.
    """
    return "/" in weights or weights.startswith("~") or weights.lower().endswith((".pth", ".pt"))


def cached_default_weights(arch: str) -> Path | None:
    """torchvision's DEFAULT weights file of ``arch`` if it is already in the torch hub
    cache (``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``),
    else None. Never downloads."""
    import torchvision

    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / str(url).rsplit("/", 1)[-1]
    return path if path.is_file() else None


def resolve_weights(weights: str, arch: str) -> str:
    """What ``embed.weights`` means for a new model: ``"none"``, a torchvision weights
    name, or a file path (expanded ``~``).

    ``"auto"`` (the default) is ``"DEFAULT"`` when :func:`cached_default_weights`
    finds the file, else ``"none"``: pretrained weights are used when the machine
    has them and the first run never waits on a download. Case is kept otherwise.
    """
    if weights.lower() == "auto":
        return "DEFAULT" if cached_default_weights(arch) is not None else "none"
    if is_weights_path(weights):
        return str(Path(weights).expanduser())
    return weights


def _headless_backbone(arch: str, weights: str | None) -> tuple[nn.Module, int]:
    """The torchvision backbone with its classifier replaced by identity, and its width.

    ``weights=None`` initialises randomly (from torch's current RNG); a name loads
    torchvision's pretrained weights (from the hub cache, downloading them if they are
    not there); a path (:func:`is_weights_path`) loads that torchvision state dict.
    """
    import torchvision

    if weights is not None and is_weights_path(weights):
        backbone: nn.Module = torchvision.models.get_model(arch, weights=None)
        _load_weights_file(backbone, Path(weights), arch)
    else:
        try:
            backbone = torchvision.models.get_model(arch, weights=weights)
        except Exception as err:  # download failures, unknown weight names: all user-fixable
            raise CheckpointError(
                f"cannot load torchvision weights {weights!r} for {arch}: {err}. "
                "Put the weight file in $TORCH_HOME/hub/checkpoints on an offline machine, "
                "give its path as embed.weights, or set embed.weights=none."
            ) from err
    head_name = BACKBONES[arch]
    head = getattr(backbone, head_name)
    linear = (
        head
        if isinstance(head, nn.Linear)
        else next(m for m in head.modules() if isinstance(m, nn.Linear))
    )
    setattr(backbone, head_name, nn.Identity())
    return backbone, int(linear.in_features)


def _load_weights_file(backbone: nn.Module, path: Path, arch: str) -> None:
    """Load the torchvision state dict at ``path`` into ``backbone`` (all keys, same shapes).

    Loaded with ``weights_only=True``. Raises :class:`CheckpointError` naming the file
    when it is missing, unreadable, or not a state dict of ``arch``.
    """
    if not path.is_file():
        raise CheckpointError(f"embed.weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"embed.weights file {path} cannot be loaded safely: {err}") from err
    try:
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a state dict")
        backbone.load_state_dict(state)
    except (TypeError, RuntimeError) as err:
        why = " ".join(str(err).split())  # load_state_dict lists every key: keep the start
        why = why if len(why) <= 300 else why[:300] + " ..."
        raise CheckpointError(
            f"embed.weights file {path} is not a torchvision {arch} state dict: {why}"
        ) from err


def build_model(config: ModelConfig, *, seed: int) -> EmbeddingModel:
    """A fresh model; random parts are initialised from ``seed`` (no global RNG use)."""
    devices: list[str] = []  # fork_rng only touches the CPU generator then
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = EmbeddingModel(config, pretrained=True)
    return model.eval()


def model_id(model: EmbeddingModel) -> str:
    """16 hex digits identifying config + weights; equal ids mean equal embeddings."""
    digest = hashlib.sha256(json.dumps(asdict(model.config), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def save_checkpoint(model: EmbeddingModel, path: Path) -> str:
    """Write ``model`` to ``path`` atomically (temp file + rename); returns its model id."""
    mid = model_id(model)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": asdict(model.config),
        "model_id": mid,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    with atomic_open(path, "wb") as handle:
        torch.save(payload, handle)
    return mid


def load_checkpoint(path: Path) -> tuple[EmbeddingModel, str]:
    """Rebuild the model stored at ``path``; returns ``(model in eval mode, model id)``.

    Loads with ``weights_only=True``, so a checkpoint carrying pickled code is
    refused. Raises :class:`CheckpointError` naming the file when it is missing,
    unreadable, of another format, or its weights don't fit its config.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {err}") from err
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a datapool checkpoint ({CHECKPOINT_FORMAT})")
    try:
        config = ModelConfig(**payload["config"])
        model = EmbeddingModel(config)  # weights come from the checkpoint, not torchvision
        model.load_state_dict(payload["state_dict"])
    except (TypeError, KeyError, RuntimeError, InputError) as err:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {err}") from err
    model = model.eval()
    if model_id(model) != payload["model_id"]:
        raise CheckpointError(f"checkpoint {path} is damaged: its weights do not hash to its id")
    return model, str(payload["model_id"])


def model_for_pool(checkpoint: Path, *, wanted: ModelConfig, seed: int) -> EmbeddingModel:
    """The model a pool's next batch must be embedded with.

    The pool's own checkpoint when it exists (its config must agree with
    ``wanted``, apart from ``weights``), else a new model built from ``wanted``.
    Raises :class:`CheckpointError` naming each setting that differs, because a
    pool's embeddings all come from one model.
    """
    if not checkpoint.exists():
        return build_model(wanted, seed=seed)
    model, _ = load_checkpoint(checkpoint)
    changed = model.config.differences(wanted)
    if changed:
        was = ", ".join(f"{k}={v[0]!r}" for k, v in changed.items())
        now = ", ".join(f"{k}={v[1]!r}" for k, v in changed.items())
        raise CheckpointError(
            f"the pool's checkpoint {checkpoint} has {was} but the embed params ask for {now}; "
            "a pool keeps one model: set the params back, or start a new pool (datapool.name)"
        )
    return model
