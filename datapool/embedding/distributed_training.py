"""SimCLR training under DistributedDataParallel: one global batch split across ranks (issue 14).

:func:`train_contrastive_distributed` is :func:`~datapool.embedding.training.train_contrastive`
on the ranks of a :class:`~datapool.distributed.World`. Every rank builds the
same model (same seed) and passes the same image list; each step's global
batch of ``batch_size`` images is the one one process would take, and rank
``r`` decodes and augments its contiguous slice of it
(:func:`~datapool.distributed.shard_range`). So:

* **Views do not depend on the number of ranks.** The shuffle and the
  per-image augmentation seeds come from one ``torch.Generator(seed)`` drawn
  exactly as one process draws it, and an image's two views come from its own
  seed (as in one process), whichever rank decodes it.
* **The loss is the global batch's.** Each rank all-gathers the projections of
  every rank (without gradient) and puts its own, with gradient, in its place;
  NT-Xent over all ``2B`` rows is then the same number on every rank, and its
  gradient through a rank's own rows is that rank's share of the one-process
  gradient. The backward pass runs on ``world.size x loss`` so that DDP's
  averaging of the ranks' gradients sums the shares: the one-process gradient.
* **Same optimiser and schedule.** AdamW and the cosine schedule over
  ``epochs x ceil(N / batch_size)`` steps, a step taken only when the global
  batch holds at least 2 readable images (all ranks agree: the per-rank counts
  are gathered before the forward pass).

Decisions:

* ``batch_size`` is the global batch, whatever the world size: the run then has
  the same steps, negatives and schedule as one process. When it does not
  divide by the world size, the first ``batch_size % size`` ranks take one
  image more (``shard_range``); the loss and gradient are unaffected, only the
  ranks' work differs by an image. A rank may even hold no readable image of a
  step (a last short batch, or undecodable files): it still runs the (empty)
  forward and backward pass that DDP needs, and contributes a zero gradient.
* **BatchNorm sees the global batch.** In training mode a BatchNorm layer
  normalises with the statistics of the batch it sees; per rank that would be
  the rank's slice, not one process's batch. ``torch.nn.SyncBatchNorm`` shares
  them but refuses CPU tensors (torch 2.14: "SyncBatchNorm expected input
  tensor to be on GPU or XPU"), so the model is trained with its BatchNorm
  layers swapped for :class:`GlobalBatchNorm`, which all-reduces the statistics
  on any backend (a few small collectives per layer), on CPU and CUDA alike:
  one tested code path. Running statistics then equal one process's on every
  rank; the trained weights go back into the caller's (plain BatchNorm) model.
* Every rank ends with identical weights and buffers (DDP's averaged gradients,
  all-reduced statistics; tested).

Equality with one process, measured (tests/embedding/test_distributed_training.py,
2 gloo ranks, mobilenet_v3_small at 32 px, 5 images split 3 + 2): one step's loss,
running statistics and gradients equal one process's to 1e-5 of the largest
gradient (summation order). Over several AdamW steps the models drift apart by
more than that, exactly as one process does against itself on another number of
threads: a bias feeding a BatchNorm (through a convolution) has a true gradient
of zero, so its gradient is rounding noise, which AdamW scales up to full
learning-rate steps. After 9 steps, 2 ranks against 1 process: embeddings 0.021
apart, such biases 0.008; 1 process on 1 against 2 threads: 0.025 and 0.008.
Without BatchNorm (swapped for GroupNorm in the tests) that drift is absent:
embeddings within 1e-6 after 9 steps.

At scale (bench/embed_distributed.py --train-epochs 5: resnet18, scikit-learn's
1,797 digits at 32 px, global batch 128, 70 steps, fp32, same start and seed),
embeddings of all digits against the one-process model's, mean / max |difference|:
2 ranks 0.064 / 0.36, one process on 2 threads 0.057 / 0.41 (rounding noise
alone), seed 1 instead of 0: 0.115 / 0.66 (another run). Leave-one-out 1-NN
accuracy: 0.955 on 2 ranks, 0.947 and 0.963 in one process on 1 and 2 threads
(0.952 untrained). Before GlobalBatchNorm (per-rank statistics) 2 ranks were
0.108 / 0.54 away: as far as another seed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from datapool.distributed import World, shard_range
from datapool.embedding.model import EmbeddingModel
from datapool.embedding.training import (
    WEIGHT_DECAY,
    Augmentation,
    _autocast_dtype,
    _check_settings,
    _collate,
    _one_thread,
    _PairDataset,
    nt_xent_loss,
    train_contrastive,
)
from datapool.errors import InputError

__all__ = ["train_contrastive_distributed"]


def train_contrastive_distributed(
    model: EmbeddingModel,
    images: Sequence[Path],
    *,
    world: World,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    temperature: float = 0.1,
    seed: int,
    num_workers: int = 0,
    augmentation: Augmentation | None = None,
    image_size: int | None = None,
    bf16: bool | None = None,
) -> EmbeddingModel:
    """Train ``model`` in place with SimCLR across ``world``'s ranks; returns it in eval mode.

    Arguments as :func:`~datapool.embedding.training.train_contrastive`, which a
    one-process World simply calls; training runs on ``world.device``.
    ``batch_size`` is the global batch (every rank takes its slice of it). Every
    rank must pass the same ``images`` and an identically built ``model``; every
    rank gets the same trained weights back (only rank 0 needs to save them).

    Raises:
        InputError: a setting is out of range, or fewer than 2 images could be read.
    """
    device = world.device
    if world.size == 1:
        return train_contrastive(
            model, images, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            temperature=temperature, seed=seed, device=device, num_workers=num_workers,
            augmentation=augmentation, image_size=image_size, bf16=bf16,
        )  # fmt: skip
    _check_settings(images, epochs=epochs, batch_size=batch_size, lr=learning_rate, t=temperature)
    size = image_size or model.config.image_size
    dataset = _PairDataset(images, size, augmentation or Augmentation())
    generator = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    net, ddp = _wrap(model, device)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=learning_rate, weight_decay=WEIGHT_DECAY)
    steps = epochs * math.ceil(len(dataset) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    step = _GlobalStep(ddp, optimizer, world, temperature=temperature, bf16=bf16, size=size)
    steps_taken = 0
    with tqdm(total=epochs * len(dataset), unit="img", desc=f"train {size}px x{world.size}",
              disable=not world.is_main) as bar:  # fmt: skip
        for epoch in range(epochs):
            loader = _rank_loader(dataset, generator, batch_size, num_workers, world)
            for view_a, view_b, skipped in _one_thread(loader) if num_workers == 0 else loader:
                counts = _gather_counts(view_a.shape[0], skipped, world)
                readable = [n for n, _ in counts]
                if sum(readable) >= 2:
                    loss = step(view_a, view_b, readable)
                    schedule.step()
                    steps_taken += 1
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
                bar.update(sum(n + s for n, s in counts))
    if steps_taken == 0:
        raise InputError(f"contrastive training needs at least 2 readable images of {len(images)}")
    model.load_state_dict(net.state_dict())
    return model.eval()


def _wrap(model: EmbeddingModel, device: torch.device) -> tuple[nn.Module, DistributedDataParallel]:
    """A copy of ``model`` with :class:`GlobalBatchNorm` layers to train, and its DDP wrapper.

    Buffers are not synchronised at each forward pass (``forward_sync_buffers=False``):
    the global statistics keep them equal on every rank already.
    """
    net = copy.deepcopy(model)
    for name, module in list(net.named_modules()):
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            parent, _, attr = name.rpartition(".")
            setattr(net.get_submodule(parent), attr, GlobalBatchNorm.like(module))
    device_ids = [device] if device.type == "cuda" else None
    return net, DistributedDataParallel(net, device_ids=device_ids, forward_sync_buffers=False)


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics are those of the whole global batch.

    ``torch.nn.SyncBatchNorm`` does this on accelerators only; this runs wherever the
    process group does (gloo on CPU included), with two all-reduces per layer forward
    (the sum and count, then the squared deviations from the global mean: two passes,
    as stable as one process's) and two backward. The all-reduces are
    differentiable (:class:`_SumOverRanks`, our own autograd function): a rank's gradient
    then includes its inputs' share in the other ranks' normalisation, and with
    :class:`_GlobalStep`'s scaling DDP's average is one process's gradient. Eval mode
    is plain BatchNorm (running statistics). State dict keys are BatchNorm's.
    """

    @classmethod
    def like(cls, bn: nn.modules.batchnorm._BatchNorm) -> GlobalBatchNorm:
        """A GlobalBatchNorm with ``bn``'s settings, parameters and running statistics."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        return new.to(next(iter(bn.state_dict().values())).device).train(bn.training)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:
            plain: torch.Tensor = super().forward(input)
            return plain
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor([x.numel() / max(x.shape[1], 1)], device=x.device)
        summed = _summed(torch.cat([x.sum(dims), count]))
        total = summed[-1].detach()
        mean = summed[:-1] / total
        var = _summed(((x - mean.view(shape)) ** 2).sum(dims)) / total  # biased, as BN
        out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None:
            self._update_running(mean.detach(), var.detach(), total)
        return out.to(input.dtype)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, total: torch.Tensor) -> None:
        """Running averages as BatchNorm keeps them (unbiased variance, ``momentum``)."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # cumulative average, as BatchNorm's momentum=None
            momentum = 1.0 / float(self.num_batches_tracked)
        unbiased = var * total / (total - 1).clamp(min=1)
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def _rank_loader(
    dataset: _PairDataset,
    generator: torch.Generator,
    batch_size: int,
    num_workers: int,
    world: World,
) -> DataLoader[tuple[torch.Tensor, torch.Tensor, int]]:
    """This rank's slice of each of one epoch's global batches (possibly empty slices).

    Draws from ``generator`` exactly what one process's epoch loader draws (the
    shuffle, one augmentation seed per image, the DataLoader's base seed), so the
    next epoch's shuffle is the same too.
    """
    order = torch.randperm(len(dataset), generator=generator).tolist()
    aug_seeds = torch.randint(0, 2**62, (len(dataset),), generator=generator).tolist()
    items = list(zip(order, aug_seeds, strict=True))
    slices = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        part = shard_range(len(batch), world)
        slices.append(batch[part.start : part.stop])
    return DataLoader(
        dataset,  # indexed by (index, seed) pairs
        batch_sampler=slices,
        collate_fn=_collate,
        num_workers=num_workers,
        generator=generator,  # the base seed one process's loader draws too
        pin_memory=world.device.type == "cuda",
    )


def _gather_counts(readable: int, skipped: int, world: World) -> list[tuple[int, int]]:
    """Every rank's (readable, skipped) images of this step, in rank order."""
    mine = torch.tensor([readable, skipped], dtype=torch.int64, device=world.device)
    every = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(every, mine)
    return [(int(t[0]), int(t[1])) for t in every]


def _gather_with_grad(local: torch.Tensor, counts: Sequence[int], world: World) -> torch.Tensor:
    """All ranks' rows ``[sum(counts), ...]`` in rank order; this rank's block keeps its gradient.

    ``local``: ``[counts[rank], ...]``. The other ranks' blocks are constants here:
    their gradient is computed on their own rank.
    """
    most = max(counts)
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[: local.shape[0]] = local.detach()
    blocks = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(blocks, padded)
    parts = [b[:n] for b, n in zip(blocks, counts, strict=True)]
    parts[world.rank] = local
    return torch.cat(parts)


class _GlobalStep:
    """One optimisation step: the NT-Xent loss of the global batch, gradients through DDP."""

    def __init__(
        self,
        ddp: DistributedDataParallel,
        optimizer: torch.optim.Optimizer,
        world: World,
        *,
        temperature: float,
        bf16: bool | None,
        size: int,
    ) -> None:
        self.ddp, self.optimizer, self.world = ddp, optimizer, world
        self.temperature, self.size = temperature, size
        self.dtype = _autocast_dtype(world.device, bf16)
        # fp16's narrow range needs loss scaling; bf16 and fp32 don't.
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def __call__(self, view_a: torch.Tensor, view_b: torch.Tensor, counts: list[int]) -> float:
        """This rank's views ``[n, 3, S, S]`` (n = ``counts[rank]``, maybe 0) -> one update.

        Returns the global batch's loss (the same on every rank).
        """
        n, device = counts[self.world.rank], self.world.device
        if n == 0:  # _collate's empty result is 1-D; DDP still needs this rank's pass
            view_a = view_b = torch.empty((0, 3, self.size, self.size))
        batch = torch.cat([view_a, view_b]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None):
            out = self.ddp(batch)  # one pass: BatchNorm sees both views together
        pairs = torch.stack([out[:n], out[n:]], dim=1).float()  # [n, 2, D]
        every = _gather_with_grad(pairs, counts, self.world)  # [B, 2, D]
        loss = nt_xent_loss(every[:, 0], every[:, 1], temperature=self.temperature)
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients; each holds its rows' share of the sum.
        scaled: torch.Tensor = self.scaler.scale(loss * self.world.size)
        scaled.backward()  # type: ignore[no-untyped-call]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())


def _summed(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks; differentiable (its gradient is summed back likewise)."""
    out: torch.Tensor = _SumOverRanks.apply(t)
    return out


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with a gradient: the sum's gradient is every rank's, summed.

    Written here because torch's own (``torch.distributed.nn.functional.all_reduce``,
    the same two all-reduces) warns that it is deprecated in torch 2.14, and the
    functional collectives it points to are private (``torch.distributed._...``).
    """

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        total = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total
