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
  two workspaces on one host never meet). Several machines use the ``c10d``
  rendezvous at ``rdzv_endpoint``; every machine runs the same command and the
  run id is fixed per stage, so the machines of one stage find each other and
  those of another stage do not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datapool.errors import InputError

# Variables torchrun sets in every worker; either one means "already launched".
_WORKER_VARS = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE")
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


def launcher_command(
    launch: Launch, script: Path, args: Sequence[str], *, run_id: str
) -> list[str]:
    """The ``torch.distributed.run`` command that starts ``script ARGS`` on ``launch``'s workers.

    ``run_id`` names the rendezvous of a multi-machine run (letters, digits, ``-``).
    """
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc}"]
    if launch.nnodes == 1:
        command.append("--standalone")
    else:
        command += [
            f"--nnodes={launch.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={run_id}",
        ]
    return [*command, str(script), *args]


def relaunch(launch: Launch, *, stage: str, argv: Sequence[str] | None = None) -> int | None:
    """Run this stage again on ``launch``'s workers; ``None`` when this process should do the work.

    Returns ``None`` for a single process, and inside a worker. Otherwise blocks
    until every worker has finished and returns the launcher's exit status
    (0 only when all workers succeeded). ``argv`` defaults to ``sys.argv``
    (script first).
    """
    if launch.world_size == 1 or under_launcher():
        return None
    script, *args = list(sys.argv if argv is None else argv)
    command = launcher_command(launch, Path(script), args, run_id=f"datapool-{stage}")
    return subprocess.run(command, check=False).returncode
