"""datapool.launch: when a stage runs under torch.distributed's launcher, and how."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from datapool.errors import InputError
from datapool.launch import (
    NODE_RANK_VAR,
    Launch,
    launcher_command,
    relaunch,
    run_worker,
    stage_command,
    under_launcher,
)
from datapool.store import read_any


def test_single_process_runs_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert not under_launcher()
    assert relaunch(Launch(), argv=["never-run.py"]) is None


def test_a_worker_never_launches_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert under_launcher()
    assert relaunch(Launch(nproc=4), argv=["never-run.py"]) is None


def test_one_machine_is_standalone() -> None:
    command = launcher_command(Launch(nproc=3), Path("stages/embed.py"), ["--a", "b c"])
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=3" in command and "--standalone" in command
    assert command[-3:] == ["stages/embed.py", "--a", "b c"]  # arguments pass through verbatim


def test_several_machines_meet_at_the_endpoint_with_fixed_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    launch = Launch(nproc=2, nnodes=3, rdzv_endpoint="node0.lan:29400")
    monkeypatch.delenv(NODE_RANK_VAR, raising=False)
    command = launcher_command(launch, Path("s.py"), [])
    assert "--standalone" not in command
    assert {"--nnodes=3", "--node-rank=0", "--master-addr=node0.lan", "--master-port=29400"} <= set(
        command
    )
    monkeypatch.setenv(NODE_RANK_VAR, "2")
    assert "--node-rank=2" in launcher_command(launch, Path("s.py"), [])
    assert launch.world_size == 6
    for bad in ("3", "-1", "x"):
        monkeypatch.setenv(NODE_RANK_VAR, bad)
        with pytest.raises(InputError, match=NODE_RANK_VAR):
            launcher_command(launch, Path("s.py"), [])
    ipv6 = Launch(nproc=1, nnodes=2, rdzv_endpoint="[fd00::1]:29400")
    monkeypatch.setenv(NODE_RANK_VAR, "1")
    assert "--master-addr=fd00::1" in launcher_command(ipv6, Path("s.py"), [])


def test_a_worker_machine_needs_its_number() -> None:
    with pytest.raises(InputError, match=r"numbered 1\.\.1"):
        run_worker(Path(), "sample", node=0, nnodes=2)
    with pytest.raises(InputError, match=r"numbered 1\.\.0"):
        run_worker(Path(), "sample", node=1, nnodes=1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nproc": 0}, "must be >= 1"),
        ({"nnodes": 0}, "must be >= 1"),
        ({"nnodes": 2}, "needs distributed.rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "host"}, "host:port"),
        ({"nnodes": 2, "rdzv_endpoint": "a b:1"}, "host:port"),
    ],
)
def test_bad_settings_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        Launch(**kwargs)  # type: ignore[arg-type]


WORKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from datapool.launch import Launch, relaunch

    status = relaunch(Launch(nproc=2))
    if status is not None:
        sys.exit(status)
    rank = os.environ["RANK"]
    Path(sys.argv[1], "rank-" + rank).write_text(os.environ["WORLD_SIZE"] + " " + sys.argv[2])
    if sys.argv[2] == "fail" and rank == "1":
        sys.exit(3)
    """
)


@pytest.mark.slow
def test_two_workers_run_the_same_command(tmp_path: Path) -> None:
    script = tmp_path / "stage.py"
    script.write_text(WORKER, encoding="utf-8")
    ok = subprocess.run([sys.executable, str(script), str(tmp_path), "ok"], check=False)
    assert ok.returncode == 0
    assert sorted(p.name for p in tmp_path.glob("rank-*")) == ["rank-0", "rank-1"]
    assert (tmp_path / "rank-1").read_text() == "2 ok"
    # One failing worker fails the stage: DVC must see a non-zero exit.
    failed = subprocess.run([sys.executable, str(script), str(tmp_path), "fail"], check=False)
    assert failed.returncode != 0


def _stage_inputs(tmp: Path) -> None:
    """500 candidates and an 800-row pool (as embed's re-embedded pool file), 16-d."""
    from datapool.store import write_rows

    from .test_pool import pool_table

    def stored(n: int, seed: int, batch: str) -> pd.DataFrame:
        table = pool_table(n, 16, seed=seed, batch=batch)
        table["content_hash"] = [
            hashlib.sha256(h.encode()).hexdigest() for h in table["content_hash"]
        ]
        return table

    candidates = stored(500, 3, "b2").drop(columns=["pick_rank", "pick_distance"])
    write_rows(candidates, tmp / "candidates.arrow")
    write_rows(stored(800, 4, "b1"), tmp / "pool.arrow")


def _sample(tmp: Path, out: str, *extra: str, node: int = 0, wait: bool = True) -> Any:
    """Run the real sample stage on the files ``_stage_inputs`` wrote, as machine ``node``
    (a finished CompletedProcess, or the running Popen with ``wait=False``)."""
    script = Path(__file__).resolve().parents[1] / "stages" / "sample.py"
    args = [sys.executable, str(script), "--candidates", str(tmp / "candidates.arrow")]
    args += ["--pool-dir", str(tmp / "pools" / "p"), "--out", str(tmp / out)]
    args += ["--lock-file", str(tmp / "dvc.lock"), "--reembedded-pool", str(tmp / "pool.arrow")]
    args += ["--n-samples", "60", "--device", "cpu", *extra]
    env = dict(os.environ, **{NODE_RANK_VAR: str(node)})
    if not wait:
        pipe = subprocess.PIPE
        return subprocess.Popen(args, cwd=tmp, env=env, text=True, stdout=pipe, stderr=pipe)
    return subprocess.run(args, cwd=tmp, env=env, text=True, capture_output=True, check=False)


@pytest.mark.slow
def test_sample_stage_on_two_processes_picks_as_one(tmp_path: Path) -> None:
    _stage_inputs(tmp_path)
    one = _sample(tmp_path, "one.arrow")
    assert one.returncode == 0, one.stderr
    two = _sample(tmp_path, "two.arrow", "--processes", "2")
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("sample: picked 60 of 500") == 1  # rank 0 reports, once
    assert read_any(tmp_path / "two.arrow").equals(read_any(tmp_path / "one.arrow"))


@pytest.mark.slow
def test_sample_stage_on_two_machines_picks_as_one(tmp_path: Path) -> None:
    """Two "machines" on this host (static rendezvous on a free local port): machine 0
    writes the picks one process makes, machine 1 (DATAPOOL_NODE_RANK=1) writes nothing."""
    _stage_inputs(tmp_path)
    one = _sample(tmp_path, "one.arrow")
    assert one.returncode == 0, one.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    meet = ["--machines", "2", "--rendezvous", f"127.0.0.1:{port}"]
    worker = _sample(tmp_path, "worker.arrow", *meet, node=1, wait=False)
    main = _sample(tmp_path, "main.arrow", *meet)
    _, err = worker.communicate(timeout=300)
    assert main.returncode == 0, main.stderr
    assert worker.returncode == 0, err
    assert read_any(tmp_path / "main.arrow").equals(read_any(tmp_path / "one.arrow"))
    assert not (tmp_path / "worker.arrow").exists()


@pytest.mark.parametrize("stage", ["embed", "sample"])
def test_the_launcher_hands_every_stage_option_through(stage: str) -> None:
    """torch.distributed.run's parser swallows options after the script, except an
    abbreviation of its own options (``--nproc``), which it refuses: our stages' option
    names must never be one."""
    import click
    import typer.main
    from torch.distributed.run import get_args_parser

    script = Path(__file__).resolve().parents[1] / "stages" / f"{stage}.py"
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    command = typer.main.get_command(module.app)
    names = [n for p in command.params if isinstance(p, click.Option) for n in p.opts]
    args = [a for name in names for a in (name, "1")]
    launched = launcher_command(Launch(nproc=2), script, args)
    parsed = get_args_parser().parse_args(launched[3:])
    assert parsed.training_script == str(script)
    assert parsed.training_script_args == args


def test_a_worker_runs_the_stage_command_dvc_would_run(tmp_path: Path) -> None:
    from datapool.workspace import create_workspace

    ws = tmp_path / "ws"
    create_workspace(ws)
    argv = stage_command(ws, "sample")
    assert argv[:2] == [sys.executable, "stages/sample.py"]
    assert argv[argv.index("--n-samples") + 1] == "30"  # params.yaml's value, filled in
    assert argv[argv.index("--machines") + 1] == "1"
    with pytest.raises(InputError, match="no stage 'nope'"):
        stage_command(ws, "nope")


@pytest.mark.slow
def test_machines_in_different_stages_stop_with_a_message(tmp_path: Path) -> None:
    """Every stage meets at one address: a worker in `embed` while machine 0 runs `sample`
    must not compute anything; both stop naming the disagreement."""
    _stage_inputs(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    meet = ["--machines", "2", "--rendezvous", f"127.0.0.1:{port}"]
    script = Path(__file__).resolve().parents[1] / "stages" / "embed.py"
    embed = [sys.executable, str(script), "--input-dir", str(tmp_path), "--pool-dir"]
    embed += [str(tmp_path / "pools" / "p"), "--out-dir", str(tmp_path / "e")]
    embed += ["--lock-file", str(tmp_path / "dvc.lock"), "--device", "cpu", *meet]
    env = dict(os.environ, **{NODE_RANK_VAR: "1"})
    pipe = subprocess.PIPE
    worker = subprocess.Popen(embed, cwd=tmp_path, env=env, text=True, stdout=pipe, stderr=pipe)
    main = _sample(tmp_path, "main.arrow", *meet)
    _, err = worker.communicate(timeout=300)
    assert main.returncode != 0 and worker.returncode != 0
    assert "the processes disagree on the stage they run" in main.stderr
    assert "the processes disagree on the stage they run" in err
    assert not (tmp_path / "main.arrow").exists()
