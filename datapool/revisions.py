"""Pool versions as git revisions: where a pool is recorded, its history, restore, forgetting.

A version of pool NAME is DVC's hash of the folder ``pools/NAME`` (``<md5>.dir``)
as a commit records it, in one of two places:

* ``dvc.lock`` -- the ``merge`` stage's output -- while NAME is the pipeline's
  pool (``datapool.name`` in params.yaml);
* ``pools/NAME.dvc`` while the pool is *parked*: every other pool of the
  workspace (made by combine or import, or left behind when the pipeline
  switched to another name). Parking keeps every pool tracked, so git never
  sees pool files, ``dvc push``/``dvc pull`` carry all of them and
  ``dvc gc -w`` keeps their current versions.

History reads records from git (``git log``, ``git show REV:dvc.lock``) and
each version's content through DVC's public API (``dvc.api.DVCFileSystem`` at
that revision). Restoring goes through ``git restore --source=REV -- FILE`` and
``dvc checkout``, inside a version transaction (:mod:`datapool.version`), which
puts every file back when a step fails. Two things still read DVC's cache
layout (a ``.dir`` object is a JSON list of ``{md5, relpath}``): restore's
check that a version's objects are all here before anything changes
(:func:`missing_objects`), and forgetting, which must delete objects and does
so under DVC's repository lock. dvc is imported only inside the functions that
need it, so ``datapool --help`` stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from datapool.atomic import put_back, read_text_if_file
from datapool.errors import InputError, PoolError
from datapool.layout import LOCK, PARAMS, POOL_IGNORE, POOLS, PoolPaths, pool_dir, pool_of_record
from datapool.settings import check_pool_name, flatten, load_params, strategies_summary
from datapool.store import pool_exists
from datapool.tools import git_output, run_tool

__all__ = ["LOCK", "PARAMS", "POOL_IGNORE"]  # re-exported: their home is datapool.layout


@dataclass(frozen=True)
class Record:
    """One recorded version of a pool.

    Attributes:
        digest: DVC's md5 of the pool folder, ``<32 hex>.dir``.
        parked: True when recorded by ``pools/NAME.dvc``, False when by dvc.lock.
    """

    digest: str
    parked: bool


@dataclass(frozen=True)
class Revision:
    """One row of a pool's history.

    Attributes:
        rev: full commit hash; ``date``: its author date (ISO 8601); ``subject``: its message.
        rows, added, removed: the pool's row count and the content hashes gained and lost
            since the previous revision; None when the version is not in the local cache.
        changed: ``{dotted param: (before, after)}`` in params.yaml since the previous revision.
        strategies: the selection strategies that picked this revision's new rows, as
            :func:`datapool.settings.strategies_summary` words (``"diversity"`` for plain
            k-center and for versions from before strategies existed); ``""`` when no
            pipeline run made the version (combine, import, restore of a parked pool).
    """

    rev: str
    date: str
    subject: str
    rows: int | None
    added: int | None
    removed: int | None
    changed: dict[str, tuple[Any, Any]]
    strategies: str = ""


def parked_file(workspace: Path, name: str) -> Path:
    """``pools/NAME.dvc``: the record of a pool that is not the pipeline's."""
    return workspace / PoolPaths(name).record


def merge_entry(lock_text: str | None) -> Any:
    """The ``merge`` stage's entry of a dvc.lock text (None without one).

    DVC rewrites it exactly when a run gets through merge; its ``outs`` name the pool.
    """
    data = yaml.safe_load(lock_text) if lock_text else None
    return ((data or {}).get("stages") or {}).get("merge") if isinstance(data, dict) else None


def lock_strategies(lock_text: str | None) -> str:
    """The strategies a dvc.lock text records for its ``sample`` run, in words.

    Every pool row a run added was picked by them, so a version's strategies live
    where DVC records the run: ``sample``'s ``params`` in dvc.lock (the same values
    ``dvc params diff`` compares in params.yaml). ``""`` without a sample entry; a
    sample entry without ``selection`` (before strategies existed) is ``"diversity"``.
    """
    data = yaml.safe_load(lock_text) if lock_text else None
    stages = (data or {}).get("stages") or {} if isinstance(data, dict) else {}
    sample = stages.get("sample") if isinstance(stages, dict) else None
    if not isinstance(sample, dict):
        return ""
    recorded = (sample.get("params") or {}).get(PARAMS) or {}
    selection = recorded.get("selection") or {}
    return strategies_summary(selection.get("strategies") if isinstance(selection, dict) else None)


def lock_pool(lock_text: str | None) -> tuple[str, str] | None:
    """``(name, digest)`` of the pool a dvc.lock text records as merge's output, if any."""
    stage = merge_entry(lock_text) or {}
    for out in stage.get("outs") or []:
        name = pool_of_record(str(out.get("path", "")))
        if name is not None and out.get("md5"):
            return name, str(out["md5"])
    return None


def _record(lock_text: str | None, dvc_text: str | None, name: str) -> Record | None:
    locked = lock_pool(lock_text)
    if locked is not None and locked[0] == name:
        return Record(locked[1], parked=False)
    data = yaml.safe_load(dvc_text) if dvc_text else None
    outs = (data or {}).get("outs") or []
    if outs and outs[0].get("md5"):
        return Record(str(outs[0]["md5"]), parked=True)
    return None


def record_at(workspace: Path, rev: str, name: str) -> Record | None:
    """How commit ``rev`` records pool ``name``; None if it does not."""
    return _record(
        git_output(workspace, "show", f"{rev}:{LOCK}"),
        git_output(workspace, "show", f"{rev}:{PoolPaths(name).record}"),
        name,
    )


def current_record(workspace: Path, name: str) -> Record | None:
    """How the working tree records pool ``name`` now; None if it does not."""
    return _record(
        read_text_if_file(workspace / LOCK), read_text_if_file(parked_file(workspace, name)), name
    )


def pipeline_pool(workspace: Path) -> str:
    """``datapool.name`` as params.yaml has it now."""
    params = load_params((workspace / PARAMS).read_text(encoding="utf-8")) or {}
    return str(params["datapool"]["name"])


def parked_paths(name: str) -> list[str]:
    """What parking pool ``name`` changes, relative to the workspace: ``pools/NAME.dvc``
    and ``pools/.gitignore`` (where ``dvc add`` lists the folder). All that an import,
    a combine or the restore of a parked version commits."""
    return [PoolPaths(name).record, POOL_IGNORE]


def version_paths(workspace: Path) -> list[str]:
    """Every file a version of the workspace's pools consists of, relative to it:
    dvc.lock, params.yaml, ``pools/.gitignore`` and each ``pools/NAME.dvc`` that
    exists now or that HEAD or the index tracks. What a run or the restore of a
    pipeline version commits: one that adopted NAME deleted NAME's ``.dvc``, and
    :func:`datapool.tools.git_commit` records that as a deletion."""
    tracked = (git_output(workspace, "ls-files", "-z", "--", POOLS) or "").split("\0")
    tracked += (
        git_output(workspace, "ls-tree", "-z", "--name-only", "HEAD", "--", f"{POOLS}/") or ""
    ).split("\0")
    tracked += [f"{POOLS}/{p.name}" for p in (workspace / POOLS).glob("*.dvc")]
    names = {pool_of_record(p) for p in tracked if p.endswith(".dvc")}
    records = {PoolPaths(n).record for n in names if n is not None}
    return [LOCK, PARAMS, POOL_IGNORE, *sorted(records & set(tracked))]


# --- the DVC cache ----------------------------------------------------------------------------


def cache_dir(workspace: Path) -> Path:
    """The workspace's DVC cache folder (``dvc cache dir``)."""
    path = Path(run_tool(["dvc", "cache", "dir"], cwd=workspace, quiet=True).strip())
    return path if path.is_absolute() else workspace / path


def cache_file(cache: Path, md5: str) -> Path:
    """Where DVC 3 keeps the object ``md5`` (a file, or a ``.dir`` manifest)."""
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def manifest(cache: Path, digest: str) -> dict[str, str] | None:
    """``{relpath: md5}`` of a cached folder version; None if ``digest`` is not a folder's
    (``.dir``) or its manifest is not cached."""
    path = cache_file(cache, digest)
    if not digest.endswith(".dir") or not path.is_file():
        return None
    return {str(e["relpath"]): str(e["md5"]) for e in json.loads(path.read_text(encoding="utf-8"))}


def objects_of(cache: Path, digest: str) -> set[str]:
    """The cache objects one output needs: its own hash and, for a folder, its files'."""
    return {digest, *(manifest(cache, digest) or {}).values()}


def missing_objects(cache: Path, digest: str) -> list[str]:
    """Objects of ``digest`` absent from the cache (the manifest itself first)."""
    if not digest.endswith(".dir"):
        return [] if cache_file(cache, digest).is_file() else [digest]
    if manifest(cache, digest) is None:
        return [digest]
    return sorted(md5 for md5 in objects_of(cache, digest) if not cache_file(cache, md5).is_file())


def version_hashes(
    workspace: Path, rev: str, name: str, *, memo: dict[str, list[str]] | None = None
) -> list[str] | None:
    """The content hashes of pool ``name`` as commit ``rev`` records it, read through
    ``dvc.api.DVCFileSystem`` at ``rev`` (from dvc.lock's merge output or
    ``pools/NAME.dvc``, whichever records it there); one per row, in row order.

    None when that version's data is not available locally (not in the cache: a
    clone without ``dvc pull``, or dropped by keep_history=false) or cannot be read
    as a pool; no remote is contacted. ``memo``: see :func:`datapool.store.content_hashes`.
    """
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    from datapool.store import content_hashes

    try:
        fs = DVCFileSystem(str(workspace), rev=rev)
        try:
            return content_hashes(fs, PoolPaths(name).folder, memo=memo)
        finally:
            fs.close()
    except (OSError, DvcException, PoolError, ValueError):
        # OSError covers FileNotFoundError ("No storage files available"); ValueError a
        # shard or CSV that is not what its name says.
        return None


# --- history ----------------------------------------------------------------------------------


def _commits(workspace: Path, *paths: str) -> list[tuple[str, str, str]]:
    """``(hash, ISO date, subject)`` of commits touching ``paths``, oldest first."""
    text = git_output(workspace, "log", "--reverse", "--format=%H%x1f%aI%x1f%s", "--", *paths)
    rows = [line.split("\x1f") for line in (text or "").splitlines() if line]
    return [(r[0], r[1], r[2]) for r in rows]


def flat_params(text: str | None) -> dict[str, Any]:
    """A params.yaml text as ``{dotted key: value}`` (read as DVC reads it, YAML 1.2)."""
    data = load_params(text) if text else None
    return flatten(data) if isinstance(data, dict) else {}


def param_changes(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (old, new)}`` for keys whose value differs (None where absent)."""
    keys = sorted(set(before) | set(after))
    return {k: (before.get(k), after.get(k)) for k in keys if before.get(k) != after.get(k)}


def history(workspace: Path, name: str) -> list[Revision]:
    """Every revision that changed pool ``name``, oldest first.

    A revision is a commit whose record of the pool (dvc.lock or pools/NAME.dvc)
    differs from the commit before it; parking a pool unchanged is not one.
    Row counts are the pool's real content at that revision, read through DVC's
    API (:func:`version_hashes`); None where the data is not available locally.
    """
    out: list[Revision] = []
    digest: str | None = None
    hashes: set[str] = set()
    params: dict[str, Any] | None = None
    memo: dict[str, list[str]] = {}  # each shard read once across the versions
    for rev, date, subject in _commits(workspace, LOCK, PoolPaths(name).record):
        record = record_at(workspace, rev, name)
        if record is None or record.digest == digest:
            continue
        digest = record.digest
        if params is None:
            params = flat_params(git_output(workspace, "show", f"{rev}^:{PARAMS}"))
        now = flat_params(git_output(workspace, "show", f"{rev}:{PARAMS}"))
        listed = version_hashes(workspace, rev, name, memo=memo)
        found = None if listed is None else set(listed)
        out.append(
            Revision(
                rev=rev,
                date=date,
                subject=subject,
                rows=None if found is None else len(found),
                added=None if found is None else len(found - hashes),
                removed=None if found is None else len(hashes - found),
                changed=param_changes(params, now),
                strategies=""
                if record.parked
                else lock_strategies(git_output(workspace, "show", f"{rev}:{LOCK}")),
            )
        )
        hashes, params = (found if found is not None else hashes), now
    return out


# --- switching, restoring, forgetting ---------------------------------------------------------


def park(workspace: Path, name: str) -> None:
    """Track ``pools/NAME`` by ``pools/NAME.dvc`` (``dvc add``), so it stays versioned
    while the pipeline works on another pool. Raises :class:`PoolError` if it is absent,
    :class:`InputError` if ``dvc add`` fails."""
    from datapool.transaction import recover  # pandas/pyarrow: not on the CLI's import path

    _check_present(workspace, name)
    # A write of the pool interrupted mid-apply is finished first: `dvc add` would
    # otherwise record its stage folder, and a mix of two versions, as the pool.
    recover(pool_dir(workspace, name))
    run_tool(["dvc", "add", PoolPaths(name).folder], cwd=workspace, quiet=True)


def _check_present(workspace: Path, name: str) -> None:
    if not pool_exists(pool_dir(workspace, name)):
        raise PoolError(
            f"pool {name} is recorded in {workspace / LOCK} but missing from "
            f"{pool_dir(workspace, name)}; run `dvc pull` (or `dvc checkout`) before "
            "switching to another pool, or its latest version would no longer be tracked"
        )


def adopt(workspace: Path, name: str) -> None:
    """Make ``pools/NAME`` the pipeline's pool; params.yaml must already name it.

    Parks the pool dvc.lock records if it is another one, and drops NAME's own
    ``.dvc`` record (its folder stays; the merge stage's output takes over).
    All or nothing: when parking fails, NAME's record is put back, so no pool is
    left unrecorded for the next commit to drop. Any pool that HEAD records but
    the working tree no longer does (a run that failed after switching left it
    so) is parked again from its folder.
    Raises :class:`PoolError` when a pool to park or a parked NAME is not in the
    workspace (fresh clone without ``dvc pull``), :class:`InputError` when
    ``dvc add`` fails; nothing is changed then.
    """
    record = parked_file(workspace, name)
    saved = read_text_if_file(record)
    if saved is not None and not pool_exists(pool_dir(workspace, name)):
        raise PoolError(
            f"{record} records pool {name} but {pool_dir(workspace, name)} is missing; "
            f"run `dvc pull {record.relative_to(workspace)}` first"
        )
    current = lock_pool(read_text_if_file(workspace / LOCK))
    previous = current[0] if current is not None and current[0] != name else None
    if previous is not None:
        _check_present(workspace, previous)
    # NAME's record goes first: dvc.yaml already declares pools/NAME, DVC refuses overlaps.
    record.unlink(missing_ok=True)
    try:
        _repark_lost(workspace, name)
        if previous is not None:
            park(workspace, previous)
    except BaseException:
        if saved is not None:
            put_back(record, saved.encode("utf-8"))
        raise


def _repark_lost(workspace: Path, name: str) -> None:
    """Park again every pool (other than ``name``) that HEAD records, whose folder is
    here, but that neither dvc.lock nor a ``.dvc`` file of the working tree records."""
    locked = lock_pool(git_output(workspace, "show", f"HEAD:{LOCK}"))
    listing = git_output(workspace, "ls-tree", "--name-only", f"HEAD:{POOLS}") or ""
    names = {e.removesuffix(".dvc") for e in listing.split() if e.endswith(".dvc")}
    names |= {locked[0]} if locked is not None else set()
    for pool in sorted(names - {name}):
        lost = current_record(workspace, pool) is None
        if lost and pool_exists(pool_dir(workspace, pool)):
            park(workspace, pool)


def check_new_name(workspace: Path, name: str) -> None:
    """Refuse a name a new pool cannot take: one :func:`check_pool_name` refuses, an
    existing folder, a parked record, or the pipeline's pool (which dvc.yaml already
    declares as merge's output). Raises :class:`InputError`."""
    check_pool_name(name)
    taken = pool_dir(workspace, name).exists() or parked_file(workspace, name).exists()
    if taken or pipeline_pool(workspace) == name:
        raise InputError(
            f"pool name {name!r} is taken in {workspace} (an existing pool, or the pipeline's "
            "datapool.name); choose a new name"
        )


def resolve(workspace: Path, rev: str) -> str:
    """Full commit hash of ``rev``; :class:`InputError` if the workspace has no such commit."""
    full = git_output(workspace, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if not full:
        raise InputError(
            f"{workspace} has no revision {rev!r}; see `git log` or `datapool history NAME`"
        )
    return full.strip()


def restorable(workspace: Path, name: str, rev: str) -> tuple[str, Record]:
    """``(full hash, record)`` of pool ``name``'s version at ``rev``, checked restorable:
    the revision exists, records the pool, and every object of that version is in the
    local DVC cache (read from the cache layout, so nothing changes before a refusal).

    Raises :class:`InputError` for an unknown rev, :class:`PoolError` when ``rev`` has
    no version of the pool or its data is not in the cache.
    """
    full = resolve(workspace, rev)
    record = record_at(workspace, full, name)
    if record is None:
        raise PoolError(
            f"revision {rev} has no version of pool {name}; `datapool history {name}` lists them"
        )
    cache = cache_dir(workspace)
    if missing_objects(cache, record.digest):
        raise PoolError(
            f"pool {name} at {rev} ({record.digest}) is not in the DVC cache {cache}: fetch it "
            "with `dvc pull` from a remote; versions dropped by datapool.keep_history=false "
            "cannot come back"
        )
    return full, record


def restore(workspace: Path, name: str, rev: str) -> Record:
    """Bring pool ``name`` back to its version at ``rev`` (through ``dvc checkout``).

    For a version the pipeline made, params.yaml and dvc.lock of ``rev`` come back
    too, so ``dvc status`` is clean and the next run grows the restored pool; a
    parked version comes back through its ``pools/NAME.dvc``. The caller commits
    the result as a new revision, so nothing after ``rev`` is lost. The git index
    is never touched.

    Call it inside a version transaction (:func:`datapool.version.restore_version`
    does): when a step fails (a pool the switch must park is not here, ``dvc add``
    or ``dvc checkout`` fails), the transaction puts params.yaml, dvc.lock and the
    pools' records back byte for byte, so no setting of ``rev`` is left behind.
    Raises what :func:`restorable` raises, :class:`InputError` for a failing
    git/dvc command, :class:`PoolError` when a pool the switch must park is not in
    the workspace or ``name`` is the pipeline's pool and ``rev`` parked it.
    """
    full, record = restorable(workspace, name, rev)
    restore_record(workspace, name, full, record)
    return record


def restore_record(workspace: Path, name: str, full: str, record: Record) -> None:
    """:func:`restore` of a version :func:`restorable` already checked: ``record`` is
    how commit ``full`` records pool ``name``."""
    if record.parked:
        _restore_parked(workspace, name, full)
    else:
        _restore_pipeline(workspace, name, full)


def _restore_pipeline(workspace: Path, name: str, full: str) -> None:
    """params.yaml and dvc.lock of ``full``, pool ``name`` the pipeline's, its data checked out."""
    _file_from(workspace, full, PARAMS)
    adopt(workspace, name)  # after params.yaml: dvc.yaml's merge must output NAME already
    _file_from(workspace, full, LOCK)  # after adopt, which parks the pool dvc.lock has now
    # Not -q: when it fails, its output says why (run_tool puts it in the error).
    run_tool(["dvc", "checkout", "--force"], cwd=workspace, quiet=True)


def _file_from(workspace: Path, rev: str, path: str) -> None:
    """Write ``path`` of ``rev`` into the working tree. Decision: the index is left
    alone (``git restore`` without ``--staged``, unlike ``git checkout REV --``), so
    a restore that fails leaves nothing staged, and what the user staged stays."""
    run_tool(["git", "restore", f"--source={rev}", "--", path], cwd=workspace, quiet=True)


def _restore_parked(workspace: Path, name: str, full: str) -> None:
    if pipeline_pool(workspace) == name:
        raise PoolError(
            f"pool {name} at {full[:7]} was made by combine/import, and {name} is now the "
            "pipeline's pool (datapool.name); restore one of its later revisions instead"
        )
    target = PoolPaths(name).record
    _file_from(workspace, full, target)
    run_tool(["dvc", "checkout", "--force", target], cwd=workspace, quiet=True)


def _records_at(workspace: Path, rev: str) -> Iterator[tuple[str, Record]]:
    """``(pool name, record)`` for every pool commit ``rev`` records."""
    locked = lock_pool(git_output(workspace, "show", f"{rev}:{LOCK}"))
    if locked is not None:
        yield locked[0], Record(locked[1], parked=False)
    listing = git_output(workspace, "ls-tree", "--name-only", f"{rev}:{POOLS}") or ""
    for entry in listing.split():
        if entry.endswith(".dvc"):
            found = record_at(workspace, rev, entry.removesuffix(".dvc"))
            if found is not None:
                yield entry.removesuffix(".dvc"), found


def _all_records(workspace: Path) -> Iterator[tuple[str, Record]]:
    """``(pool name, record)`` for every pool every commit of HEAD's history records."""
    for rev, _, _ in _commits(workspace, LOCK, POOLS):
        yield from _records_at(workspace, rev)


def _git_words(workspace: Path, *args: str) -> list[str]:
    """The words ``git ARGS`` prints (hashes, ref names); none when git fails."""
    return (git_output(workspace, *args) or "").split()


def _other_refs_records(workspace: Path) -> Iterator[tuple[str, Record]]:
    """Records the other local branches and the tags use: at their tips, and in
    the commits only they reach (HEAD's own branch is the one being forgotten)."""
    current = _git_words(workspace, "symbolic-ref", "-q", "HEAD")
    listed = _git_words(workspace, "for-each-ref", "--format=%(refname)", "refs/heads", "refs/tags")
    refs = [ref for ref in listed if ref not in current]
    if not refs:
        return
    revs = set(_git_words(workspace, "rev-list", *refs, "--not", "HEAD", "--", LOCK, POOLS))
    for ref in refs:
        revs.update(_git_words(workspace, "rev-parse", "-q", "--verify", f"{ref}^{{commit}}"))
    for rev in sorted(revs):
        yield from _records_at(workspace, rev)


def _workspace_objects(workspace: Path, cache: Path) -> set[str]:
    """Objects every output the working tree tracks now needs (dvc.lock + pools/*.dvc)."""
    digests: set[str] = set()
    lock = yaml.safe_load(read_text_if_file(workspace / LOCK) or "") or {}
    for stage in (lock.get("stages") or {}).values():
        digests |= {str(o["md5"]) for o in stage.get("outs") or [] if o.get("md5")}
    for record in (workspace / POOLS).glob("*.dvc"):
        found = _record(None, read_text_if_file(record), record.stem)
        digests |= {found.digest} if found else set()
    return set().union(*(objects_of(cache, d) for d in digests)) if digests else set()


@dataclass(frozen=True)
class Forgotten:
    """What :func:`forget_history` did.

    Attributes:
        deleted: cache objects deleted.
        shared_cache: the cache, when it is not the workspace's own and so was left alone.
    """

    deleted: int
    shared_cache: Path | None = None

    @property
    def note(self) -> str:
        """One line for the person running datapool."""
        if self.shared_cache is None:
            return f"{self.deleted} cache objects of earlier versions dropped"
        return (
            f"earlier versions kept: the DVC cache {self.shared_cache} is set by cache.dir, "
            "so other workspaces may share it, and which objects they use cannot be known"
        )


def forget_history(workspace: Path, name: str, *, replaced: Record | None = None) -> Forgotten:
    """Delete earlier versions of pool ``name`` from the DVC cache (``keep_history=false``).

    Decision: the run still updates the pool in the workspace (and dvc.lock) but
    makes no commit, and the cache objects only older versions of *this* pool
    need go: every version of it HEAD's history records, and ``replaced`` -- the
    version the working tree recorded before the run (:func:`current_record`),
    which no commit holds when the previous run had ``keep_history=false`` too.
    Kept, unlike ``dvc gc -w``: what the working tree tracks (the new version,
    other pools, work/), every version of other pools in HEAD's history, and for
    each other local branch and each tag the versions its tip records and those
    of the commits only it reaches. A version of this pool in history such a
    branch shares with HEAD is deleted all the same, unless its tip records it.
    Commits that recorded dropped versions stay in git; restoring one says the
    data is gone.

    Only a cache of the workspace's own (``.dvc/cache``) is touched: DVC keeps no
    list of the workspaces that share a cache set elsewhere by ``cache.dir``, so
    there nothing is deleted and :attr:`Forgotten.note` says so. All of it runs
    under DVC's repository lock, so no DVC command of the workspace runs meanwhile.
    Raises :class:`InputError` (nothing deleted) when another DVC command holds it.
    """
    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    with Repo(str(workspace)) as repo:
        try:
            with lock_repo(repo):
                return _forget_locked(repo, workspace, name, replaced)
        except LockError as err:
            raise InputError(
                f"cannot take DVC's lock in {workspace} to drop the earlier versions of pool "
                f"{name} ({err}); nothing was deleted. The pool itself is updated; run again "
                "when the other DVC command has finished"
            ) from err


def _forget_locked(repo: Any, workspace: Path, name: str, replaced: Record | None) -> Forgotten:
    """:func:`forget_history`'s work, with ``repo`` (a dvc Repo) locked."""
    odb, own = repo.cache.local, repo.cache.default_local_cache_dir
    cache = Path(repo.cache.local_cache_dir)
    if own is None or cache.resolve() != Path(own).resolve():
        return Forgotten(deleted=0, shared_cache=cache)
    # The replaced version may be in no commit at all (an earlier run without history).
    doomed = objects_of(cache, replaced.digest) if replaced is not None else set()
    keep = _workspace_objects(workspace, cache)
    for pool, record in _all_records(workspace):
        if pool == name:
            doomed |= objects_of(cache, record.digest)
        else:
            keep |= objects_of(cache, record.digest)
    for _, record in _other_refs_records(workspace):
        keep |= objects_of(cache, record.digest)
    gone = [md5 for md5 in sorted(doomed - keep) if cache_file(cache, md5).is_file()]
    if gone:
        odb.fs.remove([odb.oid_to_path(md5) for md5 in gone])
    return Forgotten(deleted=len(gone))
