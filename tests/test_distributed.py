"""Process-group plumbing (datapool.distributed): slices, env, gathers on two gloo ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from datapool.distributed import (
    World,
    agree,
    all_gather_rows,
    check_same,
    gather_in_order,
    init_from_env,
    main_first,
    shard_range,
    single,
)
from datapool.errors import InputError
from tests.ranks import run_ranks, world_of


@pytest.mark.parametrize("n", [0, 1, 2, 5, 10, 11])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_shard_ranges_are_contiguous_in_rank_order_and_cover_every_row(n: int, size: int) -> None:
    ranges = [shard_range(n, world_of(r, size)) for r in range(size)]
    assert [i for r in ranges for i in r] == list(range(n))
    lengths = [len(r) for r in ranges]
    assert max(lengths) - min(lengths) <= 1
    assert lengths == sorted(lengths, reverse=True)  # the longer slices come first


def test_negative_row_count_is_refused() -> None:
    with pytest.raises(InputError, match="negative"):
        shard_range(-1, single())


def test_without_torchrun_the_world_is_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    world = init_from_env()
    assert (world.rank, world.size, world.device, world.distributed) == (
        0,
        1,
        torch.device("cpu"),
        False,
    )
    assert world.is_main
    t = torch.arange(6).reshape(3, 2)
    assert torch.equal(gather_in_order(t, world), t)
    assert agree(world, None, "facts") == ["facts"]


def test_incomplete_torchrun_environment_names_what_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        init_from_env()


def test_rank_outside_the_world_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "RANK": "2",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "x",
        "MASTER_PORT": "1",
    }
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(InputError, match="outside WORLD_SIZE"):
        init_from_env()


def test_a_one_process_world_refuses_its_own_error() -> None:
    with pytest.raises(InputError, match="bad row"):
        agree(single(), "bad row")


def _gathers(world: World, out: Path) -> None:
    """Each rank: its slice of 5 rows (3 and 2) and of 1 row (1 and 0), gathered; then errors."""
    table = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3)
    mine = shard_range(5, world)
    whole = gather_in_order(table[mine.start : mine.stop], world)
    one = torch.tensor([[7]], dtype=torch.int64)
    lone = shard_range(1, world)
    blocks = all_gather_rows(one[lone.start : lone.stop], world)
    facts = agree(world, None, {"rank": world.rank})
    try:
        agree(world, "row 4 is bad" if world.rank == 1 else None)
        message = ""
    except InputError as e:
        message = str(e)
    np.savez(
        out / f"rank{world.rank}.npz",
        whole=whole.numpy(),
        counts=np.array([b.shape[0] for b in blocks]),
        lone=torch.cat(blocks).numpy(),
        facts=np.array([f["rank"] for f in facts]),
        message=np.array(message),
    )


def test_two_gloo_ranks_gather_uneven_and_empty_slices_in_file_order(tmp_path: Path) -> None:
    run_ranks(_gathers, 2, tmp_path, tmp_path)
    expected = np.arange(15, dtype=np.float32).reshape(5, 3)
    messages = []
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(got["whole"], expected)
        np.testing.assert_array_equal(got["counts"], [1, 0])  # rank 1 holds no row of 1
        np.testing.assert_array_equal(got["lone"], [[7]])
        np.testing.assert_array_equal(got["facts"], [0, 1])
        messages.append(str(got["message"]))
    # every rank raises: the failing one its own message, the other names the failing rank
    assert messages == ["rank 1: row 4 is bad", "row 4 is bad"]


def _checks(world: World, out: Path) -> None:
    """check_same and main_first on every rank; what each saw goes to a file."""
    seen: list[str] = []
    check_same(world, "the stage", "sample")
    try:
        check_same(world, "the model", world.rank)  # ranks 0 and 1 differ
    except InputError as err:
        seen.append(str(err))
    order = out / "order.txt"

    def step() -> int:
        with order.open("a") as f:
            f.write(f"{world.rank}\n")
        return world.rank

    seen.append(f"result {main_first(world, step)}")

    def failing() -> int:
        raise InputError("pool is damaged")

    try:
        main_first(world, failing)
    except InputError as err:
        seen.append(str(err))
    (out / f"seen{world.rank}.txt").write_text("\n".join(seen))


def test_check_same_and_main_first_on_two_ranks(tmp_path: Path) -> None:
    run_ranks(_checks, 2, tmp_path, tmp_path)
    assert (tmp_path / "order.txt").read_text().splitlines()[0] == "0"  # rank 0 first
    for rank in (0, 1):
        seen = (tmp_path / f"seen{rank}.txt").read_text().splitlines()
        assert seen[0].startswith("the processes disagree on the model: rank 0 has 0, rank 1 1")
        assert seen[1] == f"result {rank}"
        assert seen[2] == ("pool is damaged" if rank == 0 else "rank 0: pool is damaged")
