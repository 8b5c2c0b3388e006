"""Starting a stage on several processes with PyTorch's own launcher (``torchrun``).

A stage that can share its work (``embed``, ``sample``) calls :func:`relaunch`
first thing. With one process it returns ``None`` and the stage runs as
always: a laptop never pays for a launcher. With ``nproc > 1`` (or several
machines) it runs the very same command line again under
``python -m torch.distributed.run`` and returns that run's exit status, which the
stage passes on; each worker then sees ``RANK``/``WORLD_SIZE`` in its
environment, so :func:`under_launcher` is true there and :func:`relaunch`
returns ``None``: no worker ever starts workers of its own.

Decisions:

* We use ``torch.distributed.run`` rather than spawning processes ourselves:
  it is the launcher users already know (elastic rendezvous, one command per
  machine for multi-machine runs, a clear summary when a worker fails) and it
  sets one OpenMP thread per worker, which is what a CPU host with N workers
  wants.
* It runs as ``sys.executable -m torch.distributed.run``, not the ``torchrun``
  script on ``PATH``, so the workers use this interpreter and installation (a
  virtual environment or the Docker image's), like :mod:`datapool.tools` does
  for DVC.
* One machine uses ``--standalone`` (a private rendezvous on a free local port:
  two workspaces on one host never meet). Several machines use torchrun's
  static rendezvous at ``rdzv_endpoint`` with a fixed node rank: the machine
  running ``dvc repro`` is node 0 (so global rank 0, which writes the stage's
  outputs, is always in the workspace DVC watches) and every other machine runs
  the same stage command with ``DATAPOOL_NODE_RANK`` set (``datapool worker``
  does both). torchrun's elastic ``c10d`` rendezvous would number the machines
  by arrival, and a worker machine could end up writing the outputs.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datapool.errors import InputError

# Variables torchrun sets in every worker; either one means "already launched".
_WORKER_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE")
# Set by `datapool worker` on every machine but the first (see the module docstring).
NODE_RANK_VAR = "DATAPOOL_NODE_RANK"
# host:port (an IPv6 host in brackets); also checked up front by datapool.settings.
RENDEZVOUS = re.compile(r"[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5}")


@dataclass(frozen=True)
class Launch:
    """How many processes run a stage, and where.

    Attributes:
        nproc: worker processes on this machine (>= 1).
        nnodes: machines taking part (>= 1); each runs the same stage command.
        rdzv_endpoint: ``host:port`` of the rendezvous, required when ``nnodes > 1``
            (the first machine's address, a port free on it).

    Raises:
        InputError: a count below 1, or several machines without a valid endpoint.
    """

    nproc: int = 1
    nnodes: int = 1
    rdzv_endpoint: str = ""

    def __post_init__(self) -> None:
        if self.nproc < 1 or self.nnodes < 1:
            raise InputError(
                f"distributed.nproc and distributed.nnodes must be >= 1, "
                f"got {self.nproc} and {self.nnodes}"
            )
        if self.nnodes > 1 and not RENDEZVOUS.fullmatch(self.rdzv_endpoint):
            raise InputError(
                f"distributed.nnodes={self.nnodes} needs distributed.rdzv_endpoint as "
                f"host:port (the first machine's address), got {self.rdzv_endpoint!r}"
            )

    @property
    def world_size(self) -> int:
        """Processes in all: ``nproc * nnodes``."""
        return self.nproc * self.nnodes


def under_launcher() -> bool:
    """True inside a worker started by ``torchrun`` (or anything setting its variables)."""
    return any(name in os.environ for name in _WORKER_VARS)


def node_rank() -> int:
    """This machine's place among the machines: ``DATAPOOL_NODE_RANK``, default 0.

    Raises:
        InputError: the variable is set but not a whole number >= 0.
    """
    text = os.environ.get(NODE_RANK_VAR, "0")
    if not text.isdigit():
        raise InputError(f"{NODE_RANK_VAR} must be a whole number >= 0, got {text!r}")
    return int(text)


def launcher_command(launch: Launch, script: Path, args: Sequence[str]) -> list[str]:
    """The ``torch.distributed.run`` command that starts ``script ARGS`` on ``launch``'s workers.

    Several machines meet at ``launch.rdzv_endpoint`` (static rendezvous), this one
    as node :func:`node_rank`. Raises InputError for a node rank >= ``nnodes``.
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    if launch.nnodes == 1:
        command.append("--standalone")
    else:
        rank = node_rank()
        if rank >= launch.nnodes:
            raise InputError(
                f"{NODE_RANK_VAR}={rank} but distributed.nnodes={launch.nnodes}: "
                f"machines are numbered 0..{launch.nnodes - 1}"
            )
        host, _, port = launch.rdzv_endpoint.rpartition(":")
        command += [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={rank}",
            f"--master-addr={host.strip('[]')}",
            f"--master-port={port}",
        ]
    return [*command, str(script), *args]


def relaunch(launch: Launch, *, argv: Sequence[str] | None = None) -> int | None:
    """Run this stage again on ``launch``'s workers; ``None`` when this process should do the work.

    Returns ``None`` for a single process, and inside a worker. Otherwise blocks
    until every worker has finished and returns the launcher's exit status
    (0 only when all workers succeeded). ``argv`` defaults to ``sys.argv``
    (script first).
    """
    if launch.world_size == 1 or under_launcher():
        return None
    script, *args = list(sys.argv if argv is None else argv)
    command = launcher_command(launch, Path(script), args)
    return subprocess.run(command, check=False).returncode


def stage_command(workspace: Path, stage: str) -> list[str]:
    """``stage``'s command line as ``dvc repro`` runs it in ``workspace`` (dvc.yaml with
    params.yaml's values filled in), split into arguments, run by this interpreter.

    Raises:
        InputError: the workspace's pipeline has no such stage.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(workspace)) as repo:
            found = repo.stage.collect(stage)
    except DvcException as err:
        raise InputError(f"no stage {stage!r} in {workspace / 'dvc.yaml'}: {err}") from err
    argv = shlex.split(str(found[0].cmd))
    if argv and argv[0] == "python":
        argv[0] = sys.executable
    return argv


def run_worker(workspace: Path, stage: str, *, node: int, nnodes: int) -> int:
    """Take part, as machine ``node`` (1 .. nnodes - 1), in ``stage`` of the run that
    machine 0 is doing; returns the launcher's exit status.

    Blocks in the rendezvous until machine 0 starts the stage. This machine's
    ranks compute their share and write nothing (rank 0, on machine 0, writes).

    Raises:
        InputError: ``nnodes`` is 1 or ``node`` is not a worker machine's number.
    """
    if nnodes < 2 or not 1 <= node < nnodes:
        raise InputError(
            f"a worker machine is numbered 1..{nnodes - 1} (distributed.nnodes={nnodes}), "
            f"got {node}; machine 0 runs `datapool run`"
        )
    argv = stage_command(workspace, stage)
    env = dict(os.environ, **{NODE_RANK_VAR: str(node)})
    return subprocess.run(argv, cwd=workspace, env=env, check=False).returncode
