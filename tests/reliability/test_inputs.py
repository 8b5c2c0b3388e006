"""Bad input never loses the pool: each case is refused with a clear message, or handled and said.

The stages are driven through their real command-line entry points (Typer's
runner, in-process) on a real pool folder whose bytes are compared before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner, Result

from datapool.images import content_hash
from datapool.pool import CHECKPOINT, POOL_CSV, column_order, read_pool, write_table
from datapool.store import MANIFEST, read_manifest, read_rows
from datapool.tools import tool_env
from datapool.transaction import save_pool
from stages.embed import app as embed_app
from stages.merge import app as merge_app
from stages.sample import app as sample_app

from ..synthetic import candidate_rows, snapshot, write_unchecked

RUNNER = CliRunner()
DIM = 4


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """A pool of 5 rows (batch b1) with its images and a checkpoint file."""
    rows, sources = candidate_rows(
        tmp_path / "old_inbox", 5, dim=DIM, seed=0, batch="b1", label="x"
    )
    (tmp_path / "model.ckpt").write_bytes(b"model")
    folder = tmp_path / "pools" / "p"
    save_pool(
        folder,
        rows.assign(pick_rank=1, pick_distance=1.0)[column_order(DIM)],
        checkpoint=tmp_path / "model.ckpt",
        sources=sources,
    )
    return folder


def _sample(tmp_path: Path, pool: Path, candidates: pd.DataFrame, *extra: str) -> Result:
    write_table(candidates, tmp_path / "candidates.csv")
    return RUNNER.invoke(
        sample_app,
        [
            "--candidates",
            str(tmp_path / "candidates.csv"),
            "--pool-dir",
            str(pool),
            "--out",
            str(tmp_path / "picks.csv"),
            "--lock-file",
            str(tmp_path / "dvc.lock"),
            "--reembedded-pool",
            str(tmp_path / "no_reembedding.csv"),
            *extra,
        ],
    )


def _merge(tmp_path: Path, pool: Path) -> Result:
    return RUNNER.invoke(
        merge_app,
        [
            "--candidates",
            str(tmp_path / "candidates.csv"),
            "--picks",
            str(tmp_path / "picks.csv"),
            "--checkpoint",
            str(tmp_path / "model.ckpt"),
            "--pool-dir",
            str(pool),
            "--lock-file",
            str(tmp_path / "dvc.lock"),
            "--reembedded-pool",
            str(tmp_path / "no_reembedding.csv"),
            "--append-weak-labels",
            "true",
        ],
    )


@pytest.mark.parametrize(
    ("value", "message"), [("-0.1", "must be a number >= 0"), ("nan", "must be a number >= 0")]
)
def test_bad_min_distance_is_refused(tmp_path: Path, pool: Path, value: str, message: str) -> None:
    before = snapshot(pool)
    candidates, _ = candidate_rows(tmp_path / "inbox", 3, dim=DIM, seed=1, batch="b2", label="x")
    result = _sample(tmp_path, pool, candidates, "--n-samples", "2", "--min-distance", value)
    assert result.exit_code == 1
    assert message in result.output
    assert snapshot(pool) == before


def test_no_stopping_condition_is_refused(tmp_path: Path, pool: Path) -> None:
    candidates, _ = candidate_rows(tmp_path / "inbox", 3, dim=DIM, seed=1, batch="b2", label="x")
    result = _sample(tmp_path, pool, candidates, "--n-samples", "0", "--min-distance", "0")
    assert result.exit_code == 1 and "never stop" in result.output


def test_every_candidate_already_in_pool(tmp_path: Path, pool: Path) -> None:
    before = snapshot(pool)
    rows, _ = candidate_rows(
        tmp_path / "old_inbox", 5, dim=DIM, seed=0, batch="b1", label="x"
    )  # the same five images again
    result = _sample(tmp_path, pool, rows.assign(batch_id="b2"), "--n-samples", "3")
    assert result.exit_code == 0, result.output
    assert "picked 0 of 0 new candidates (5 already in the pool)" in result.output
    merged = _merge(tmp_path, pool)
    assert merged.exit_code == 0, merged.output
    # Nothing changed but the record of the latest increment: b2, though it added no row.
    after = snapshot(pool)
    assert {k: v for k, v in after.items() if k != MANIFEST} == {
        k: v for k, v in before.items() if k != MANIFEST
    }
    manifest = read_manifest(pool)
    assert manifest is not None and manifest.latest_batch == "b2"


def test_more_samples_than_candidates_picks_all_and_says_so(tmp_path: Path, pool: Path) -> None:
    candidates, _ = candidate_rows(tmp_path / "inbox", 4, dim=DIM, seed=1, batch="b2", label="x")
    result = _sample(tmp_path, pool, candidates, "--n-samples", "100")
    assert result.exit_code == 0, result.output
    assert "picked 4 of 4" in result.output and "every one" in result.output
    assert _merge(tmp_path, pool).exit_code == 0
    assert len(read_pool(pool)) == 9  # type: ignore[arg-type]


def _rewrite(edit: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Path], None]:
    """A breakage that edits the pool's rows and stores them unchecked (a bad tool's write)."""

    def breakage(folder: Path) -> None:
        table = read_pool(folder)
        assert table is not None
        write_unchecked(folder, edit(table))

    return breakage


def _manifest_dim(folder: Path) -> None:
    """The manifest claims one more dimension than the shards hold."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["dim"] += 1
    (folder / MANIFEST).write_text(json.dumps(manifest))


BREAKAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing column": (_rewrite(lambda t: t.drop(columns=["labels"])), "lacks column(s) labels"),
    "wrong dimension": (_manifest_dim, "holds embeddings of dimension 4, the manifest says 5"),
    "nan embedding": (
        _rewrite(lambda t: t.assign(embedding_1=np.float32([0.1, np.nan, 0.2, 0.3, 0.4]))),
        "row 2 (filenames='b1_1.png'), column embedding_1",
    ),
    "inf embedding": (
        _rewrite(lambda t: t.assign(embedding_0=np.float32([0.1, 0.1, 0.1, np.inf, 0.1]))),
        "row 4 (filenames='b1_3.png'), column embedding_0",
    ),
    "duplicate row": (
        _rewrite(lambda t: pd.concat([t, t.iloc[[2]]], ignore_index=True)),
        "row 6 (filenames='b1_2.png') repeats the content_hash",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKAGES))
def test_hand_broken_pool_is_refused_and_untouched(tmp_path: Path, pool: Path, case: str) -> None:
    breakage, message = BREAKAGES[case]
    breakage(pool)
    before = snapshot(pool)
    candidates, _ = candidate_rows(tmp_path / "inbox", 3, dim=DIM, seed=1, batch="b2", label="x")
    result = _sample(tmp_path, pool, candidates, "--n-samples", "2")
    assert result.exit_code == 1
    assert message in result.output, result.output
    assert "Traceback" not in result.output
    assert snapshot(pool) == before


def _embed(tmp_path: Path, input_dir: Path, pool: Path) -> Result:
    return RUNNER.invoke(
        embed_app,
        [
            "--input-dir",
            str(input_dir),
            "--pool-dir",
            str(pool),
            "--out-dir",
            str(tmp_path / "out"),
            "--lock-file",
            str(tmp_path / "dvc.lock"),
            "--embedding-dim",
            "8",
            "--image-size",
            "32",
            "--num-workers",
            "0",
            "--device",
            "cpu",
            "--bootstrap-epochs",
            "0",  # these tests are about the files; the SimCLR warm-up has its own tests
        ],
    )


def test_empty_or_missing_input_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for folder, message in (
        (tmp_path / "empty", "no images found"),
        (tmp_path / "nowhere", "does not exist"),
    ):
        result = _embed(tmp_path, folder, tmp_path / "pools" / "new")
        assert result.exit_code == 1, result.output
        assert message in result.output
    assert not (tmp_path / "pools").exists()


def test_foreign_checkpoint_in_pool_is_refused(tmp_path: Path, pool: Path) -> None:
    # The fixture's checkpoint is not a torch file at all: embedding with it must stop clearly.
    (tmp_path / "inbox").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "inbox" / "a.png")
    before = snapshot(pool)
    result = _embed(tmp_path, tmp_path / "inbox", pool)
    assert result.exit_code == 1
    assert f"checkpoint {pool / CHECKPOINT}" in result.output
    assert snapshot(pool) == before


def _bad_inbox(root: Path) -> dict[str, str]:
    """A folder with one good image and every kind of bad file; returns {relpath: reason part}."""
    from PIL import Image

    root.mkdir()
    Image.new("RGB", (40, 30), "blue").save(root / "good.png")
    Image.new("RGB", (40, 30), "green").save(root / "whole.jpg", quality=95)
    (root / "truncated.jpg").write_bytes((root / "whole.jpg").read_bytes()[:300])
    (root / "whole.jpg").unlink()
    (root / "empty.png").write_bytes(b"")
    (root / "random.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    (root / "text.png").write_text("not an image")
    bomb = Image.new("1", (12_000, 8_000))  # 96 Mpx: over the 89 Mpx limit, 12 MB as bits
    bomb.save(root / "bomb.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.full((20, 20), 40000, np.uint16)).save(root / "deep.png")
    palette = Image.new("P", (20, 20), 3)
    palette.info["transparency"] = 3
    palette.save(root / "palette.png")
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "yellow")]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    (root / "loop").symlink_to(root, target_is_directory=True)
    return {
        "truncated.jpg": "truncated",
        "empty.png": "empty file",
        "random.jpg": "not a recognised image format",
        "text.png": "not a recognised image format",
        "bomb.png": "decompression bomb",
        "loop": "folder already listed",  # skipped, and said: nothing under it is lost
    }


def test_every_bad_image_is_listed_and_the_run_goes_on(tmp_path: Path) -> None:
    expected = _bad_inbox(tmp_path / "inbox")
    result = _embed(tmp_path, tmp_path / "inbox", tmp_path / "pools" / "new")
    assert result.exit_code == 0, result.output
    import json

    corrupt = json.loads((tmp_path / "out" / "corrupt.json").read_text())
    assert set(corrupt) == set(expected)
    for name, reason in expected.items():
        assert reason in corrupt[name], (name, corrupt[name])
    embedded = read_rows(tmp_path / "out" / "candidates.arrow")
    assert sorted(embedded["filenames"]) == [
        "anim.gif",
        "cmyk.jpg",
        "deep.png",
        "good.png",
        "palette.png",
    ]


def _hostile_inbox(root: Path) -> dict[str, str]:
    """Entries that hang, stop or blow up a naive reader; returns {corrupt.json key: reason}."""
    import socket

    from PIL import Image

    root.mkdir()
    Image.new("RGB", (40, 30), "blue").save(root / "good.png")
    Image.new("RGB", (30, 40), "red").save(root / "good2.png")  # a bootstrap needs two
    os.mkfifo(root / "pipe.png")  # opening it blocks until a writer appears: never
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "socket.png"))  # opening it fails with ENXIO
    (root / "zeros.png").symlink_to("/dev/zero")  # endless bytes
    with open(os.fsencode(root) + b"/caf\xe9.png", "wb") as fh:  # noqa: PTH123 - bytes path
        fh.write((root / "good.png").read_bytes())  # a Latin-1 name: not valid UTF-8
    # 100000x1: a few hundred bytes, yet resizing its short side to the model's input
    # would need 224 x 22.4 million pixels (a MemoryError at the default image size).
    Image.new("L", (100_000, 1)).save(root / "wide.png")
    return {
        "pipe.png": "not a regular file",
        "socket.png": "not a regular file",
        "zeros.png": "not a regular file",
        "caf\\xe9.png": "not valid UTF-8",
        "wide.png": "extreme aspect ratio: 100000x1",
    }


def test_hostile_inbox_entries_are_listed_and_the_run_goes_on(tmp_path: Path) -> None:
    import json

    expected = _hostile_inbox(tmp_path / "inbox")
    result = _embed(tmp_path, tmp_path / "inbox", tmp_path / "pools" / "new")
    assert result.exit_code == 0, result.output
    corrupt = json.loads((tmp_path / "out" / "corrupt.json").read_text(encoding="utf-8"))
    assert set(corrupt) == set(expected), corrupt
    for name, reason in expected.items():
        assert reason in corrupt[name], (name, corrupt[name])
    assert "5 corrupt" in result.output
    embedded = read_rows(tmp_path / "out" / "candidates.arrow")
    assert list(embedded["filenames"]) == ["good.png", "good2.png"]


def _repro(workspace: Path) -> subprocess.CompletedProcess[str]:
    """`dvc repro` in ``workspace``; the timeout only keeps a hang from stalling the suite."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", "repro"],
        cwd=workspace,
        env=tool_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )


@pytest.mark.slow
def test_hostile_inbox_through_real_dvc_repro(tmp_path: Path) -> None:
    # DVC used to hash the inbox itself: the pipe hung `dvc repro`, the socket and the
    # Latin-1 name stopped it. Now it tracks the inbox stage's listing instead.
    import json

    from datapool.pool import read_pool
    from datapool.workspace import create_workspace, set_params

    expected = _hostile_inbox(tmp_path / "inbox")
    ws = tmp_path / "ws"
    create_workspace(ws)
    fast = {"embed.image_size": 32, "embed.bootstrap_epochs": 1, "embed.embedding_dim": 8}
    set_params(ws / "params.yaml", {**fast, "input_dir": str(tmp_path / "inbox")})
    done = _repro(ws)
    assert done.returncode == 0, done.stdout + done.stderr
    work = ws / "work" / "my_datapool"
    corrupt = json.loads((work / "embed" / "corrupt.json").read_text(encoding="utf-8"))
    assert set(corrupt) == set(expected)
    pool = read_pool(ws / "pools" / "my_datapool")
    assert pool is not None and sorted(pool["filenames"]) == ["good.png", "good2.png"]
    # Nothing changed, or only timestamps: only the listing runs, embed is not redone.
    good = tmp_path / "inbox" / "good.png"
    os.utime(good, ns=(good.stat().st_atime_ns, good.stat().st_mtime_ns + 10**9))
    again = _repro(ws)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Running stage 'inbox'" in again.stdout
    assert "Running stage 'embed'" not in again.stdout
    # A new image is noticed through the listing.
    from PIL import Image

    Image.new("RGB", (30, 30), "yellow").save(tmp_path / "inbox" / "new.png")
    bmp = tmp_path / "inbox" / "new.bmp"
    Image.new("RGB", (30, 30), "red").save(bmp)
    third = _repro(ws)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "Running stage 'embed'" in third.stdout
    pool = read_pool(ws / "pools" / "my_datapool")
    assert pool is not None and "new.png" in set(pool["filenames"])
    # Rewritten in place at the same size, its mtime restored (cp -p, tar -x): still seen.
    before = bmp.stat()
    Image.new("RGB", (30, 30), "blue").save(bmp)
    os.utime(bmp, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (bmp.stat().st_size, bmp.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    fourth = _repro(ws)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert "Running stage 'embed'" in fourth.stdout
    listing = json.loads((work / "inbox.json").read_text(encoding="utf-8"))
    assert ["new.bmp", content_hash(bmp)] in listing["images"]


def _increment(tmp_path: Path, inbox: Path, pool: Path, *, n: int, train: int = 0) -> None:
    """embed (unless ``train`` < 0: keep the last embed's output), sample, merge, as DVC would."""
    out = tmp_path / "out"
    if train >= 0:
        shutil.rmtree(out, ignore_errors=True)  # DVC removes a stage's outputs before it runs
        embedded = RUNNER.invoke(
            embed_app,
            [
                *("--input-dir", str(inbox), "--pool-dir", str(pool), "--out-dir", str(out)),
                *("--lock-file", str(tmp_path / "dvc.lock"), "--embedding-dim", "8"),
                *("--image-size", "32", "--device", "cpu", "--bootstrap-epochs", "1"),
                *("--train-epochs", str(train), "--train-batch-size", "4"),
            ],
        )
        assert embedded.exit_code == 0, embedded.output
    common = [
        *("--pool-dir", str(pool), "--lock-file", str(tmp_path / "dvc.lock")),
        *("--reembedded-pool", str(out / "pool_reembedded.arrow")),
        *("--candidates", str(out / "candidates.arrow")),
    ]
    picks = str(tmp_path / "picks.csv")
    sampled = RUNNER.invoke(sample_app, [*common, "--out", picks, "--n-samples", str(n)])
    assert sampled.exit_code == 0, sampled.output
    merged = RUNNER.invoke(
        merge_app,
        [*common, "--picks", picks, "--checkpoint", str(out / "model.ckpt")],
    )
    assert merged.exit_code == 0, merged.output


def _edit_pool(pool: Path, edit: Callable[[pd.DataFrame], None]) -> pd.DataFrame:
    """Change the pool's rows as a review would (labels, a column of one's own), through
    the store; returns the edited table as the derived CSV shows it."""
    table = read_pool(pool)
    assert table is not None
    edit(table)
    save_pool(pool, table, checkpoint=None, sources={})
    return pd.read_csv(pool / POOL_CSV, dtype=str, keep_default_na=False)


@pytest.mark.slow
def test_user_edits_and_earlier_batches_survive_later_increments(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    first = make_images("week1", {f"a/{i}.png": i for i in range(4)})
    second = make_images("week2", {f"b/{i}.png": 10 + i for i in range(4)})
    pool = tmp_path / "pools" / "p"
    _increment(tmp_path, first, pool, n=2)

    def review(table: pd.DataFrame) -> None:
        table["reviewed"] = "yes"  # a column of the user's own
        table.loc[0, "labels"] = "cat"

    _edit_pool(pool, review)
    # Training on: week2 retrains the model, so embed re-embeds the pool into a copy.
    _increment(tmp_path, second, pool, n=2, train=1)
    after = pd.read_csv(pool / POOL_CSV, dtype=str, keep_default_na=False)
    assert list(after["reviewed"]) == ["yes", "yes", "", ""]
    assert after.loc[0, "labels"] == "cat"

    def relabel(table: pd.DataFrame) -> None:
        table.loc[1, "labels"] = "dog"

    _edit_pool(pool, relabel)
    # A changed n_samples re-runs sample and merge only, on embed's earlier copy.
    _increment(tmp_path, second, pool, n=1, train=-1)
    redone = pd.read_csv(pool / POOL_CSV, dtype=str, keep_default_na=False)
    assert list(redone["labels"][:2]) == ["cat", "dog"]
    assert list(redone["reviewed"]) == ["yes", "yes", ""]
    # week1's inbox again, unchanged: a new increment, not a redo of week1's batch.
    _increment(tmp_path, first, pool, n=2)
    again = pd.read_csv(pool / POOL_CSV, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(again.iloc[:3], redone)
    assert len(again) == 5  # week1's two images not picked the first time
    assert again.loc[3, "batch_id"] != again.loc[0, "batch_id"]
    assert set(again.loc[3:, "content_hash"]).isdisjoint(again.loc[:2, "content_hash"])


@pytest.mark.slow
def test_a_raised_n_samples_keeps_the_labels_edited_on_the_latest_increment(
    tmp_path: Path, make_images: Callable[..., Path]
) -> None:
    inbox = make_images("week1", {f"cats/{i}.png": i for i in range(5)})
    pool = tmp_path / "pools" / "p"
    _increment(tmp_path, inbox, pool, n=2)

    def review(table: pd.DataFrame) -> None:
        table.loc[0, "labels"] = "tabby"  # corrected
        table.loc[1, "labels"] = ""  # unsure: label removed on purpose

    edited = _edit_pool(pool, review)
    # A raised n_samples re-runs sample and merge on the same batch: a redo of it.
    _increment(tmp_path, inbox, pool, n=3, train=-1)

    redone = pd.read_csv(pool / POOL_CSV, dtype=str, keep_default_na=False)
    assert len(redone) == 3 and redone["batch_id"].nunique() == 1
    assert list(redone["content_hash"][:2]) == list(edited["content_hash"])
    assert list(redone["labels"]) == ["tabby", "", "cats"]
