"""DVC stage `embed`: embed every image of the input folder with the pool's model.

Uses the pool's checkpoint when the pool exists, else builds the configured
model (bootstrapped by a short self-supervised run when it has random weights;
``--weights auto`` = torchvision's DEFAULT weights if already in the torch hub
cache, ``--image-size auto`` = follows the first batch's images, see
datapool.embedding.pool_model.resolve_image_size);
trains it further when embed.train_epochs > 0. If the model is not the one that
embedded the pool, the pool's stored images are embedded again. Writes to
--out-dir: candidates.arrow (the pool's shard format, datapool.store), model.ckpt,
corrupt.json, duplicates.json, settings.json (the options it ran with, for the
report) and, when the model changed, pool_reembedded.arrow.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from datapool.console import user_errors
from datapool.distributed import check_same, init_from_env, main_first, shutdown
from datapool.embedding.inference import resolve_device
from datapool.embedding.model import ModelConfig, resolve_weights
from datapool.embedding.pool_model import Training, embed_increment, resolve_image_size
from datapool.launch import Launch, relaunch
from datapool.metrics import write_seconds
from datapool.store import write_rows
from datapool.transaction import open_pool

app = typer.Typer(add_completion=False)


@app.command()
def main(
    input_dir: Annotated[Path, typer.Option(help="folder of new images, searched recursively")],
    pool_dir: Annotated[Path, typer.Option(help="the pool folder, pools/NAME")],
    out_dir: Annotated[Path, typer.Option(help="where the candidates and model go")],
    lock_file: Annotated[Path, typer.Option(help="dvc.lock, to detect a pool not yet pulled")],
    model: Annotated[str, typer.Option(help="torchvision backbone")] = "resnet18",
    weights: Annotated[
        str, typer.Option(help="auto, none, a torchvision weights name, or a weights file")
    ] = "auto",
    embedding_dim: Annotated[int, typer.Option(help="embedding length D")] = 64,
    image_size: Annotated[
        str, typer.Option(help="square crop side in pixels, or auto (follows the images)")
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="images per forward pass / training step")] = 64,
    num_workers: Annotated[int, typer.Option(help="decoding processes, 0 = a thread")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of initialisation and training")] = 0,
    train_epochs: Annotated[int, typer.Option(help="SimCLR epochs every run; 0 = off")] = 0,
    bootstrap_epochs: Annotated[
        int, typer.Option(help="SimCLR epochs on a new pool's first batch; 0 = off")
    ] = 5,
    learning_rate: Annotated[float, typer.Option(help="peak learning rate of training")] = 1e-3,
    train_batch_size: Annotated[int, typer.Option(help="images per training step")] = 128,
    precision: Annotated[str, typer.Option(help="fp32, or bf16 (faster, ~1e-3 apart)")] = "fp32",
    timings: Annotated[
        Path | None, typer.Option(help="folder recording each stage's seconds")
    ] = None,
    processes: Annotated[int, typer.Option(help="processes per machine sharing the work")] = 1,
    machines: Annotated[int, typer.Option(help="machines taking part")] = 1,
    rendezvous: Annotated[
        str, typer.Option(help="host:port where the machines meet (machines > 1)")
    ] = "",
) -> None:
    """Embed --input-dir into --out-dir."""
    started = time.perf_counter()
    with user_errors("embed"):
        status = relaunch(Launch(processes, machines, rendezvous))
    if status is not None:  # the workers did the work (and reported any error)
        raise SystemExit(status)
    # What the report shows of this stage's settings (it never reads params.yaml).
    settings = {"input_dir": str(input_dir)} | {
        f"embed.{k}": v
        for k, v in {
            "model": model,
            "weights": weights,
            "embedding_dim": embedding_dim,
            "image_size": image_size,
            "precision": precision,
            "device": device,
            "seed": seed,
            "bootstrap_epochs": bootstrap_epochs,
            "train_epochs": train_epochs,
        }.items()
    }
    with user_errors("embed"):
        # Under torchrun every rank hashes, embeds (and trains on) its share of the files
        # and ends with the whole batch; rank 0 writes. One process: a World of one.
        world = init_from_env(device=None if device == "auto" else device)
        check_same(world, "the stage they run", "embed")  # machines meet at one address
        # Rank 0 alone may finish an interrupted save (recovery moves files); then the rest.
        pool = main_first(world, lambda: open_pool(pool_dir, lock_file=lock_file))
        training = Training(train_epochs, bootstrap_epochs, learning_rate, train_batch_size)
        start_weights = resolve_weights(weights, model)
        # A new model trained from random weights gets a size a CPU can bootstrap.
        bootstraps = start_weights.lower() == "none" and bootstrap_epochs > 0
        size, size_from = resolve_image_size(
            image_size, pool_dir=pool_dir, input_dir=input_dir, seed=seed,
            cap=training.max_image_size if bootstraps else None,
        )  # fmt: skip
        # The report shows what ran: the resolved values, and where an "auto" led.
        settings["embed.image_size"] = (
            size if size_from == "setting" else f"{size} (auto: {size_from})"
        )
        if start_weights != weights:
            settings["embed.weights"] = f"{start_weights} ({weights})"
        # "auto" reads each machine's torch cache and images: all must choose the same.
        check_same(world, "the model's start (embed.weights, image_size)", (start_weights, size))
        wanted = ModelConfig(
            arch=model,
            embedding_dim=embedding_dim,
            image_size=size,
            weights=start_weights,
            precision=precision,
        )
        done = embed_increment(
            pool_dir=pool_dir,
            pool=pool,
            input_dir=input_dir,
            wanted=wanted,
            seed=seed,
            training=training,
            batch_size=batch_size,
            num_workers=num_workers,
            device=world.device if world.size > 1 else resolve_device(device),
            checkpoint=out_dir / "model.ckpt",
            world=world,
        )
        check_same(world, "the model (its id)", done.model_id)
        shutdown(world)
        if not world.is_main:
            return
        batch, model_id, refreshed = done.batch, done.model_id, done.reembedded
        if refreshed is not None:
            write_rows(refreshed, out_dir / "pool_reembedded.arrow")
        table = batch.to_table(model_id=model_id, source=str(input_dir))
        write_rows(table, out_dir / "candidates.arrow")
        for name, listing in (
            ("corrupt.json", batch.corrupt),
            ("duplicates.json", batch.duplicates),
            ("settings.json", settings),
        ):
            text = json.dumps(listing, indent=2, ensure_ascii=False) + "\n"
            (out_dir / name).write_text(text, encoding="utf-8")
        write_seconds(timings, "embed", time.perf_counter() - started)
    reembedded = "" if refreshed is None else f"; pool re-embedded ({len(refreshed)} rows)"
    print(
        f"embed: {len(batch.files)} images from {input_dir} (batch {batch.batch_id}, "
        f"model {model_id}): {batch.reused} reused from the pool, "
        f"{len(batch.duplicates)} duplicates, {len(batch.corrupt)} corrupt{reembedded}"
    )


if __name__ == "__main__":
    app()
