"""Sharing every pool version through a DVC remote, not only the current one.

``dvc push --all-commits`` in DVC 3.67 pushes only the objects of the newest
revision when several revisions record the same path (reproduced here with a
pool folder; DVC issue #10617), so a clone could see a pool's history in git but
never restore its older versions. These functions collect the objects every
commit records -- each output's hash and, for folders, every file in it --
and transfer them with DVC's own object transfer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datapool.errors import InputError


def _recorded_objects(repo: Any, *, expand: bool) -> set[Any]:
    """HashInfos of every output in every commit; with ``expand``, the files of folders too.

    Expanding a folder needs its ``.dir`` object in the local cache.
    """
    from dvc_data.hashfile.tree import Tree

    objects: set[Any] = set()
    for _ in repo.brancher(all_commits=True):
        for stage in repo.index.stages:
            for out in stage.outs:
                info = out.hash_info
                if not (info and info.value and out.use_cache):
                    continue
                objects.add(info)
                if expand and info.isdir and repo.cache.local.exists(info.value):
                    objects.update(child for _, _, child in Tree.load(repo.cache.local, info))
    return objects


def push_all_versions(workspace: Path, *, remote: str | None = None) -> tuple[int, int]:
    """Upload every committed version's data to the remote; returns (sent, failed) counts.

    Raises :class:`InputError` when no remote is configured.
    """
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        try:
            result = repo.cloud.push(_recorded_objects(repo, expand=True), remote=remote)
        except NoRemoteError as err:
            raise InputError(f"no DVC remote to push to: {err}") from err
    return len(result.transferred), len(result.failed)


def fetch_all_versions(workspace: Path, *, remote: str | None = None) -> tuple[int, int]:
    """Download every committed version's data into the local cache; (received, failed).

    Folder listings come first (their ``.dir`` objects name the files), then the files.
    After this, ``git checkout REV && dvc checkout`` works offline for every revision.
    """
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        try:
            first = repo.cloud.pull(_recorded_objects(repo, expand=False), remote=remote)
            second = repo.cloud.pull(_recorded_objects(repo, expand=True), remote=remote)
        except NoRemoteError as err:
            raise InputError(f"no DVC remote to fetch from: {err}") from err
    received = len(first.transferred) + len(second.transferred)
    return received, len(second.failed)
