"""DVC stage `embed`: embed every image of the input folder with the pool's model.

Uses the pool's checkpoint when the pool exists, else builds the configured
model. Writes to --out-dir: candidates.csv (Lightly's embeddings layout plus our
columns), model.ckpt, corrupt.json and duplicates.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from datapool.console import user_errors
from datapool.embedding.inference import embed_folder, resolve_device
from datapool.embedding.model import ModelConfig, model_for_pool, save_checkpoint
from datapool.pool import CHECKPOINT, known_embeddings, write_table
from datapool.transaction import open_pool

app = typer.Typer(add_completion=False)


@app.command()
def main(
    input_dir: Annotated[Path, typer.Option(help="folder of new images, searched recursively")],
    pool_dir: Annotated[Path, typer.Option(help="the pool folder, pools/NAME")],
    out_dir: Annotated[Path, typer.Option(help="where the candidates and model go")],
    lock_file: Annotated[Path, typer.Option(help="dvc.lock, to detect a pool not yet pulled")],
    model: Annotated[str, typer.Option(help="torchvision backbone")] = "resnet18",
    weights: Annotated[str, typer.Option(help="torchvision weights name, or none")] = "none",
    embedding_dim: Annotated[int, typer.Option(help="embedding length D")] = 64,
    image_size: Annotated[int, typer.Option(help="square crop side in pixels")] = 224,
    batch_size: Annotated[int, typer.Option(help="images per forward pass")] = 64,
    num_workers: Annotated[int, typer.Option(help="decoding processes, 0 = in-process")] = 2,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    seed: Annotated[int, typer.Option(help="seed of a new model's random initialisation")] = 0,
) -> None:
    """Embed --input-dir into --out-dir."""
    with user_errors("embed"):
        pool = open_pool(pool_dir, lock_file=lock_file)
        wanted = ModelConfig(
            arch=model, embedding_dim=embedding_dim, image_size=image_size, weights=weights
        )
        net = model_for_pool(pool_dir / CHECKPOINT, wanted=wanted, seed=seed)
        model_id = save_checkpoint(net, out_dir / "model.ckpt")
        batch = embed_folder(
            input_dir=input_dir,
            model=net,
            known=known_embeddings(pool, model_id=model_id),
            batch_size=batch_size,
            num_workers=num_workers,
            device=resolve_device(device),
        )
        write_table(
            batch.to_table(model_id=model_id, source=str(input_dir)), out_dir / "candidates.csv"
        )
        for name, listing in (
            ("corrupt.json", batch.corrupt),
            ("duplicates.json", batch.duplicates),
        ):
            text = json.dumps(listing, indent=2, ensure_ascii=False) + "\n"
            (out_dir / name).write_text(text, encoding="utf-8")
    print(
        f"embed: {len(batch.files)} images from {input_dir} (batch {batch.batch_id}, "
        f"model {model_id}): {batch.reused} reused from the pool, "
        f"{len(batch.duplicates)} duplicates, {len(batch.corrupt)} corrupt"
    )


if __name__ == "__main__":
    app()
