"""Self-supervised training of an :class:`EmbeddingModel`: SimCLR on a list of images.

Two random augmentations ("views") of each image go through the model; the
NT-Xent loss pulls the two views of one image together and pushes them away
from the views of every other image in the batch. No labels are needed, so a
pool can give its model meaning from its own first batch on an offline machine
(see docs/BENCHMARKS.md, "Embedding", for what that buys on real digits).

The loss is applied directly to the model's output, the L2-normalised
projection, with no extra MLP head: the vectors that greedy k-center compares
are then exactly the vectors the loss shaped. (SimCLR's discarded MLP head helps
the *backbone* features for a linear probe, but would leave our projection, the
part k-center reads, an untrained random map of them.)

Randomness comes only from a :class:`torch.Generator` seeded with ``seed``: it
shuffles the images and draws one augmentation seed per image and epoch, so a
run on CPU is reproducible bit for bit and independent of ``num_workers``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datapool.embedding.inference import IMAGENET_MEAN, IMAGENET_STD
from datapool.embedding.model import EmbeddingModel
from datapool.errors import InputError
from datapool.hardware import cpu_has_native_bf16
from datapool.images import CorruptImageError, load_rgb

logger = logging.getLogger(__name__)

T = TypeVar("T")

WEIGHT_DECAY = 1e-6  # SimCLR's value; larger decay fights the loss on short runs


@dataclass(frozen=True)
class Augmentation:
    """SimCLR's augmentation recipe (Chen et al. 2020, appendix A), milder by default.

    The defaults differ from SimCLR's in two places, both measured on real digits
    (docs/BENCHMARKS.md, "Embedding"): no horizontal flip (SimCLR: 0.5; a flip
    changes what a digit, letter or sign means) and crops of at least 40 % of the
    image (SimCLR: 8 %). After a short run, 1-NN accuracy in the embedding was 0.956
    with these and 0.901 with SimCLR's flip and 20 % crops.

    Attributes:
        min_scale: smallest crop area, as a fraction of the image.
        flip: probability of a horizontal flip.
        jitter: probability of colour jitter; its strengths follow below.
        brightness, contrast, saturation, hue: jitter strengths (torchvision's meaning).
        grayscale: probability of dropping colour.
        blur: probability of a Gaussian blur with sigma in ``blur_sigma`` (pixels at
            224 px, scaled with the image) and kernel about a tenth of the side.
    """

    min_scale: float = 0.4
    flip: float = 0.0
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)


def augment(
    image: torch.Tensor, *, size: int, generator: torch.Generator, recipe: Augmentation
) -> torch.Tensor:
    """One random view: uint8 ``[3, H, W]`` -> ImageNet-normalised float ``[3, size, size]``."""
    from torchvision.transforms.v2 import functional as tf

    def chance(p: float) -> bool:
        return bool(torch.rand((), generator=generator) < p)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    top, left, height, width = _crop_box(image.shape[-2:], recipe.min_scale, generator)
    view = tf.resized_crop(image, top, left, height, width, [size, size], antialias=True)
    view = view.float() / 255
    if chance(recipe.flip):
        view = tf.horizontal_flip(view)
    if chance(recipe.jitter):
        view = _colour_jitter(view, recipe, generator)
    if chance(recipe.grayscale):
        view = tf.rgb_to_grayscale(view, num_output_channels=3)
    if chance(recipe.blur):
        sigma = uniform(*recipe.blur_sigma) * size / 224
        kernel = max(3, (size // 10) | 1)  # odd, about 10% of the side
        view = tf.gaussian_blur(view, [kernel, kernel], [max(sigma, 1e-3)] * 2)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised: torch.Tensor = (view - mean) / std
    return normalised


def _colour_jitter(
    view: torch.Tensor, recipe: Augmentation, generator: torch.Generator
) -> torch.Tensor:
    """ColorJitter on float ``[3, S, S]`` in [0, 1]: four factors, applied in random order."""
    from torchvision.transforms.v2 import functional as tf

    spread = torch.tensor([recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue])
    low = torch.tensor([1.0, 1.0, 1.0, 0.0]) - spread
    factors = (low + 2 * spread * torch.rand(4, generator=generator)).tolist()
    ops = (tf.adjust_brightness, tf.adjust_contrast, tf.adjust_saturation, tf.adjust_hue)
    for i in torch.randperm(4, generator=generator).tolist():  # random order, as in SimCLR
        view = ops[i](view, factors[i])
    return view


def _crop_box(
    shape: Sequence[int], min_scale: float, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, height, width)`` in pixels, drawn from ``generator``.

    Area uniform in ``[min_scale, 1]`` of the image, aspect log-uniform in [3/4, 4/3];
    after 10 misses the whole image (torchvision falls back to a centre crop likewise).
    """
    img_h, img_w = int(shape[0]), int(shape[1])
    log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        draws = torch.rand(2, generator=generator).tolist()
        area = img_h * img_w * (min_scale + (1 - min_scale) * draws[0])
        ratio = math.exp(log_lo + (log_hi - log_lo) * draws[1])
        width = round(math.sqrt(area * ratio))
        height = round(math.sqrt(area / ratio))
        if 0 < width <= img_w and 0 < height <= img_h:
            top = int(torch.randint(0, img_h - height + 1, (), generator=generator))
            left = int(torch.randint(0, img_w - width + 1, (), generator=generator))
            return top, left, height, width
    return 0, 0, img_h, img_w


# Item: (view_a [3,S,S], view_b [3,S,S], index) or (empty, empty, index) when undecodable.
_Pair = tuple[torch.Tensor, torch.Tensor, int]


class _PairDataset(Dataset[_Pair]):
    """Two views of image ``index``; the sampler passes ``(index, augmentation seed)``.

    Images are decoded again each epoch (no cache) so memory stays flat for any
    number of images; the short side is first resized to ``size`` so that a crop
    costs the same for a 12-megapixel photo as for a thumbnail.
    """

    def __init__(self, paths: Sequence[Path], size: int, recipe: Augmentation) -> None:
        self.paths = list(paths)
        self.size = size
        self.recipe = recipe

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> _Pair:
        from torchvision.transforms.v2 import functional as tf

        index, aug_seed = key
        try:
            image = load_rgb(self.paths[index], size_hint=self.size)
        except CorruptImageError as err:
            logger.warning("skipping %s in training: %s", err.path, err.reason)
            return torch.empty(0), torch.empty(0), index
        pixels = tf.pil_to_tensor(tf.resize(image, [self.size]))
        generator = torch.Generator().manual_seed(aug_seed)
        view_a = augment(pixels, size=self.size, generator=generator, recipe=self.recipe)
        view_b = augment(pixels, size=self.size, generator=generator, recipe=self.recipe)
        return view_a, view_b, index


def _collate(items: list[_Pair]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the decodable pairs: ``([n, 3, S, S], [n, 3, S, S], number skipped)``."""
    good = [(a, b) for a, b, _ in items if a.numel()]
    if not good:
        return torch.empty(0), torch.empty(0), len(items)
    skipped = len(items) - len(good)
    return torch.stack([a for a, _ in good]), torch.stack([b for _, b in good]), skipped


def nt_xent_loss(view_a: torch.Tensor, view_b: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent loss of two batches of unit vectors; a scalar tensor.

    Args:
        view_a, view_b: ``[B, D]`` L2-normalised embeddings, B >= 2; row i of each is a
            view of the same image (the positive pair), every other row a negative.
        temperature: divides the cosine similarities; smaller = sharper.

    Each of the 2B rows is a (2B-1)-way classification of its partner; the loss is
    the mean cross-entropy, between 0 and ln(2B-1) + 2/temperature.
    """
    batch = view_a.shape[0]
    embeddings = torch.cat([view_a, view_b]).float()  # [2B, D]
    logits = embeddings @ embeddings.T / temperature  # [2B, 2B] cosine / T
    self_pairs = torch.eye(2 * batch, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_pairs, float("-inf"))  # a row is not its own positive
    partner = torch.arange(2 * batch, device=logits.device).roll(batch)  # i <-> i + B
    return nn.functional.cross_entropy(logits, partner)


def train_contrastive(
    model: EmbeddingModel,
    images: Sequence[Path],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    temperature: float = 0.1,
    seed: int,
    device: torch.device,
    num_workers: int = 0,
    augmentation: Augmentation | None = None,
    image_size: int | None = None,
    bf16: bool | None = None,
) -> EmbeddingModel:
    """Train ``model`` in place with SimCLR on ``images``; returns it, in eval mode, on ``device``.

    Args:
        model: the model to train (all of it: backbone and projection).
        images: image files; ones :func:`~datapool.images.load_rgb` cannot decode are
            skipped with a warning, each epoch.
        epochs: passes over ``images``, >= 1.
        batch_size: images per step (each gives two views), >= 2; bigger gives the
            loss more negatives. A last step with fewer than 2 readable images is skipped.
        learning_rate: AdamW's peak rate, decayed to 0 by a cosine schedule over the run.
        temperature: NT-Xent temperature (:func:`nt_xent_loss`).
        seed: decides shuffling and augmentations; same seed, images and settings
            give identical weights on CPU.
        device: where to train.
        num_workers: DataLoader processes decoding and augmenting; 0 = in this process,
            between steps, on one torch thread (:func:`_one_thread`).
        augmentation: the view recipe; ``None`` = :class:`Augmentation` defaults.
        image_size: side in pixels of the training views; ``None`` = the model's
            ``config.image_size``. Smaller costs the square of the ratio less, but
            64 px views for a 224 px model were worse than no training on upscaled
            digits (docs/BENCHMARKS.md, "First run on CPU"): the pipeline trains at
            the model's own size.
        bf16: autocast in bfloat16. ``None`` = where it is native: on CUDA (fp16 with
            loss scaling where bf16 is unsupported) and on CPUs with ``avx512_bf16`` or
            ``amx_bf16`` (:func:`cpu_has_native_bf16`; elsewhere emulated bf16 would be
            slower than fp32). Weights and the loss stay fp32 either way.

    Raises:
        InputError: a setting is out of range, or fewer than 2 images could be read.
    """
    _check_settings(images, epochs=epochs, batch_size=batch_size, lr=learning_rate, t=temperature)
    recipe = augmentation or Augmentation()
    generator = torch.Generator().manual_seed(seed)
    size = image_size or model.config.image_size
    dataset = _PairDataset(images, size, recipe)
    model = model.to(device).train()
    steps_per_epoch = math.ceil(len(dataset) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    step = _Step(model, optimizer, temperature=temperature, device=device, bf16=bf16)
    steps_taken = 0
    # The total is known up front (images x epochs), so tqdm's estimate is of the whole run.
    desc = f"train {size}px{' bf16' if step.dtype == torch.bfloat16 else ''}"
    with tqdm(total=epochs * len(dataset), unit="img", desc=desc) as bar:
        for epoch in range(epochs):
            loader = _epoch_loader(dataset, generator, batch_size, num_workers, device)
            for view_a, view_b, skipped in _one_thread(loader) if num_workers == 0 else loader:
                if view_a.shape[0] >= 2:
                    loss = step(view_a, view_b)
                    schedule.step()
                    steps_taken += 1
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
                bar.update(view_a.shape[0] + skipped)
    if steps_taken == 0:
        raise InputError(f"contrastive training needs at least 2 readable images of {len(images)}")
    return model.eval()


def _one_thread(batches: Iterable[T]) -> Iterator[T]:
    """Yield ``batches``, each made with torch limited to one thread, the model's steps not.

    Why: augmenting a 32-64 px view is a chain of tiny ops (jitter, blur) that torch
    still spreads over its threads; on a busy 2-core machine each op then waits for a
    descheduled thread, and a view took 12 ms instead of 1 ms with one thread (the
    bootstrap ran 8x below the model's speed). DataLoader worker processes use one
    thread for the same reason. The thread count is process-wide, so this is serial:
    no read-ahead thread may run the model meanwhile.
    """
    threads = torch.get_num_threads()
    iterator = iter(batches)
    while True:
        torch.set_num_threads(1)
        try:
            item = next(iterator)
        except StopIteration:
            return
        finally:
            torch.set_num_threads(threads)
        yield item


def _epoch_loader(
    dataset: _PairDataset,
    generator: torch.Generator,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> DataLoader[_Pair]:
    """One epoch's batches: a fresh shuffle, one augmentation seed per image."""
    # Sampler items carry their own augmentation seed, so an image gets the same
    # views whichever worker process decodes it.
    order = torch.randperm(len(dataset), generator=generator).tolist()
    aug_seeds = torch.randint(0, 2**62, (len(dataset),), generator=generator).tolist()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=list(zip(order, aug_seeds, strict=True)),
        collate_fn=_collate,
        num_workers=num_workers,
        generator=generator,  # else DataLoader draws its base seed from the global RNG
        pin_memory=device.type == "cuda",
    )


def _check_settings(
    images: Sequence[Path], *, epochs: int, batch_size: int, lr: float, t: float
) -> None:
    """Raise :class:`InputError` naming the first unusable training setting."""
    if len(images) < 2:
        raise InputError(f"contrastive training needs at least 2 images, got {len(images)}")
    if epochs < 1:
        raise InputError(f"training epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise InputError(f"training batch_size must be >= 2 (for negatives), got {batch_size}")
    if not lr > 0:
        raise InputError(f"training learning_rate must be > 0, got {lr}")
    if not t > 0:
        raise InputError(f"training temperature must be > 0, got {t}")


def _autocast_dtype(device: torch.device, bf16: bool | None) -> torch.dtype | None:
    """The autocast dtype of training on ``device`` (None = fp32); see train_contrastive."""
    if bf16 is False:
        return None
    if device.type == "cuda":
        if bf16 or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu" and (bf16 or cpu_has_native_bf16()):
        return torch.bfloat16
    return None


class _Step:
    """One optimisation step on a batch of pairs, under autocast in ``dtype`` (None = fp32)."""

    def __init__(
        self,
        model: EmbeddingModel,
        optimizer: torch.optim.Optimizer,
        *,
        temperature: float,
        device: torch.device,
        bf16: bool | None = None,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.temperature, self.device = temperature, device
        self.dtype = _autocast_dtype(device, bf16)
        # fp16's narrow range needs loss scaling; bf16 and fp32 don't.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def __call__(self, view_a: torch.Tensor, view_b: torch.Tensor) -> float:
        """Both views ``[n, 3, S, S]`` -> one update; returns the batch loss."""
        batch = torch.cat([view_a, view_b]).to(self.device, non_blocking=True)
        enabled = self.dtype is not None
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled):
            out = self.model(batch)  # one pass: BatchNorm sees both views together
        loss = nt_xent_loss(*out.float().chunk(2), temperature=self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        scaled: torch.Tensor = self.scaler.scale(loss)
        scaled.backward()  # type: ignore[no-untyped-call]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())
