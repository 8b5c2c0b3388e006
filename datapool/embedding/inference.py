"""Batched inference: a folder of images in, one unit vector per distinct image out.

The folder is hashed first so exact duplicates are embedded once and images the
pool already embedded with the same model are reused, not recomputed. Decoding
runs in DataLoader worker processes so it overlaps with the model; a file that
fails to decode is recorded with its reason and the run goes on.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar, cast

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datapool.distributed import World, single
from datapool.embedding.model import EmbeddingModel
from datapool.errors import InputError
from datapool.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    ImageFile,
    content_hash,
    discover_images,
    load_rgb,
    printable_relpath,
)
from datapool.pool import embedding_columns

T = TypeVar("T")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EmbeddedBatch:
    """The result of embedding one input folder.

    Attributes:
        files: the distinct, decodable images, sorted by relative path.
        hashes: ``files``' content hashes (sha256 hex), same order.
        embeddings: float32 ``[len(files), D]``, rows of L2 norm 1.
        corrupt: ``{relpath: reason}`` for entries skipped by discovery (not a regular
            file, name not UTF-8, unreadable folder) or that could not be read or decoded.
        duplicates: ``{relpath: relpath of the first file with identical bytes}``.
        batch_id: 16 hex digits naming the folder's content (not its paths); an
            increment's id may add a suffix (see :func:`datapool.increment.batch_identity`).
        reused: how many embeddings were taken from ``known`` instead of computed.
    """

    files: list[ImageFile]
    hashes: list[str]
    embeddings: np.ndarray
    corrupt: dict[str, str]
    duplicates: dict[str, str]
    batch_id: str
    reused: int

    def to_table(self, *, model_id: str, source: str) -> pd.DataFrame:
        """The batch as an embeddings table in the pool's layout (no pick columns yet).

        ``labels`` holds each image's sub-folder name; whether it is kept is the
        merge's decision.
        """
        table = pd.DataFrame(self.embeddings, columns=embedding_columns(self.embeddings.shape[1]))
        table.insert(0, "filenames", [f.relpath for f in self.files])
        table["labels"] = [f.label for f in self.files]
        table["content_hash"] = self.hashes
        table["batch_id"] = self.batch_id
        table["model_id"] = model_id
        table["source"] = source
        return table


class _ImageDataset(Dataset[tuple[torch.Tensor, int, str]]):
    """Item i: (normalised ``[3, S, S]`` tensor, i, "") or (empty tensor, i, reason) on failure."""

    def __init__(self, files: Sequence[ImageFile], image_size: int) -> None:
        self.files = list(files)
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = load_rgb(self.files[index].path, size_hint=self.image_size)
        except CorruptImageError as err:
            return torch.empty(0), index, err.reason
        return to_model_input(image, self.image_size), index, ""


def to_model_input(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL RGB image -> float ``[3, S, S]``: short side to S, centre crop, ImageNet norm."""
    from torchvision.transforms import functional as tf

    tensor: torch.Tensor = tf.pil_to_tensor(
        tf.center_crop(tf.resize(image, [image_size]), [image_size])
    )
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (tensor.float() / 255 - mean) / std


def _collate(
    items: list[tuple[torch.Tensor, int, str]],
) -> tuple[torch.Tensor, list[int], dict[int, str]]:
    good = [(tensor, index) for tensor, index, reason in items if not reason]
    failed = {index: reason for _, index, reason in items if reason}
    stacked = torch.stack([t for t, _ in good]) if good else torch.empty(0)
    return stacked, [i for _, i in good], failed


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"embed.device={name!r} but no CUDA device is available; use auto or cpu")
    return device


def hash_files(
    files: Sequence[ImageFile], *, threads: int = 8
) -> tuple[list[str | None], dict[str, str]]:
    """Content hash of each file (None where unreadable) and ``{relpath: reason}`` for those."""

    def one(item: ImageFile) -> str | None:
        try:
            return content_hash(item.path)
        except OSError as err:
            failures[item.relpath] = f"unreadable: {err.strerror or err}"
            return None

    failures: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=threads) as pool:  # hashlib releases the GIL
        hashes = list(pool.map(one, files))
    return hashes, failures


def discover_batch(input_dir: Path) -> tuple[list[ImageFile], dict[str, str]]:
    """The images under ``input_dir`` and ``{entry: reason}`` of the entries discovery skipped.

    Skipped are image-named entries that are no regular file (a named pipe, a socket,
    a link to ``/dev/zero``), names that are not UTF-8, and folders that cannot be read
    or were already listed; each is named by :func:`printable_relpath`.

    Raises:
        InputError: ``input_dir`` is missing, unreadable, or holds no images.
    """
    root = Path(input_dir).absolute()
    skipped: dict[str, str] = {}

    def on_skip(path: Path, reason: str) -> None:
        skipped[printable_relpath(path, root=root)] = reason

    files = discover_images(root, on_skip=on_skip)
    if not files:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(f"no images found under {input_dir} (looked for {exts})")
    return files, skipped


# image_size "auto": sizes a model may get, and how many headers decide it.
AUTO_SIZE_MIN, AUTO_SIZE_MAX, AUTO_SIZE_STEP, AUTO_SIZE_SAMPLE = 32, 224, 32, 200


def auto_image_size(paths: Sequence[Path], *, seed: int, sample: int = AUTO_SIZE_SAMPLE) -> int:
    """The model input side that follows the images: ``embed.image_size: auto``.

    Reads the headers (``Image.open(...).size``, no pixels decoded) of a seeded sample
    of ``sample`` of ``paths``, takes the median short side, rounds it up to a multiple
    of 32 and clamps it to [32, 224] pixels: 28 px digits get 32 (not a 64x costlier
    224), photos get 224 (ImageNet's size, where ResNets were designed). Files whose
    header cannot be read are left out; if none can be, 224.
    """
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(sample, len(paths)), replace=False))
    sides: list[int] = []
    for i in chosen:
        try:
            with Image.open(paths[i]) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue  # embed_folder reports it as corrupt
    if not sides:
        return AUTO_SIZE_MAX
    side = AUTO_SIZE_STEP * -(-int(np.median(sides)) // AUTO_SIZE_STEP)
    return min(max(side, AUTO_SIZE_MIN), AUTO_SIZE_MAX)


def embed_folder(
    *,
    input_dir: Path,
    model: EmbeddingModel,
    known: Mapping[str, np.ndarray],
    batch_size: int,
    num_workers: int,
    device: torch.device,
    world: World | None = None,
) -> EmbeddedBatch:
    """Embed every distinct image under ``input_dir`` (recursively).

    With a ``world`` of several ranks, every rank passes the same folder, hashes and
    embeds its slice, and returns the whole batch (:mod:`datapool.embedding.sharded`).

    ``known`` maps content hash -> embedding ``[D]`` already computed by this same
    model (e.g. the pool's rows); those images are not run through the model again.
    Entries that are skipped, unreadable or undecodable go to ``corrupt`` with a reason.
    Raises :class:`InputError` when the folder is missing or holds no images.
    """
    from datapool.embedding.sharded import embed_files_sharded, hash_files_sharded

    world = world or single(device)
    files, corrupt = discover_batch(input_dir)
    hashes, unreadable = hash_files_sharded(files, world=world)
    corrupt.update(unreadable)
    batch_id = hashlib.sha256("\n".join(sorted(h for h in hashes if h)).encode()).hexdigest()[:16]
    first_with: dict[str, ImageFile] = {}
    duplicates: dict[str, str] = {}
    for item, digest in zip(files, hashes, strict=True):
        if digest is None:
            continue
        if digest in first_with:
            duplicates[item.relpath] = first_with[digest].relpath
        else:
            first_with[digest] = item
    unique = list(first_with.values())
    todo = [item for item, digest in zip(unique, first_with, strict=True) if digest not in known]
    computed, failed = embed_files_sharded(
        todo,
        model=model,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        world=world,
    )
    corrupt.update(failed)
    kept = [
        (item, d) for item, d in zip(unique, first_with, strict=True) if item.relpath not in failed
    ]
    dim = model.config.embedding_dim
    vectors = [known[d] if d in known else computed[item.relpath] for item, d in kept]
    embeddings = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dim), np.float32)
    return EmbeddedBatch(
        files=[item for item, _ in kept],
        hashes=[d for _, d in kept],
        embeddings=embeddings,
        corrupt=dict(sorted(corrupt.items())),
        duplicates=duplicates,
        batch_id=batch_id,
        reused=len(unique) - len(todo),
    )


def read_ahead(batches: Iterable[T]) -> Iterator[T]:
    """Yield ``batches`` while a background thread already produces the next one.

    With ``num_workers=0`` decoding would otherwise wait for the model and the
    model for decoding. A thread is enough: PIL's decoders and torch's kernels
    release the GIL, and unlike a worker process it needs no spare core of its
    own. Errors raised while producing a batch are re-raised here, in order.
    """
    done = object()
    ahead: queue.Queue[object] = queue.Queue(maxsize=1)

    def produce() -> None:
        try:
            for item in batches:
                ahead.put(item)
        except BaseException as err:  # handed to the consumer, which re-raises it
            ahead.put(_Failure(err))
        ahead.put(done)

    thread = threading.Thread(target=produce, name="datapool-read-ahead", daemon=True)
    thread.start()
    while (item := ahead.get()) is not done:
        if isinstance(item, _Failure):
            raise item.error
        yield cast(T, item)
    thread.join()


@dataclass(frozen=True)
class _Failure:
    error: BaseException


def embed_files(
    files: Sequence[ImageFile],
    *,
    model: EmbeddingModel,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``{relpath: [D] float32}`` of decodable files, ``{relpath: reason}`` of the rest.

    Runs under bf16 autocast when the model's config says ``precision="bf16"``.
    """
    if not files:
        return {}, {}
    loader = DataLoader(
        _ImageDataset(files, model.config.image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    model = model.to(device).to(memory_format=torch.channels_last)
    out: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    use_bf16 = model.config.precision == "bf16"
    with torch.inference_mode(), tqdm(total=len(files), unit="img", desc="embed") as bar:
        for images, indices, errors in read_ahead(loader) if num_workers == 0 else loader:
            failed.update({files[i].relpath: reason for i, reason in errors.items()})
            if indices:
                batch = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    vectors = model(batch).float().cpu().numpy()
                out.update({files[i].relpath: v for i, v in zip(indices, vectors, strict=True)})
            bar.update(len(indices) + len(errors))
    return out, failed
