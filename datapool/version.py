"""One pool version, made as one transaction: lock, journal, change, commit, and crash recovery.

Every command that makes a version (``run``, ``restore``, ``combine``,
``import``, and the container's run) goes through :func:`transaction`::

    with transaction(workspace) as txn:       # workspace lock, then recover()
        ...checks, nothing changed yet...
        txn.begin(command=..., pool=..., message=..., parked=...)   # journal written
        ...the change: params edit, adopt/park, dvc repro / restore / create + park...
        txn.done(message)                     # optional: the final commit message
    # on leaving: journal marked "recorded", the version committed (or, with
    # keep_history=false, the pool's older versions forgotten), journal deleted

The journal (:data:`JOURNAL`, under ``.dvc/tmp`` which DVC keeps out of git)
holds the command, the pool, HEAD before, the bytes of every file the change
may touch (params.yaml, dvc.lock, ``pools/.gitignore``, every pool record that
exists or that HEAD tracks, and the new pool's record), the commit message and
whether the commit takes a parked pool's records or the whole version
(:func:`datapool.revisions.parked_paths` / :func:`~datapool.revisions.version_paths`,
listed from the working tree when committing: adopting a pool may create a record).

A version is *recorded* once the journal says so (written after the change
finished, before the commit) or, for ``run``, once dvc.lock's ``merge`` entry
differs from the journal's copy (DVC rewrites it when merge finishes; stages
after merge may still fail or be killed). Until then an error or a crash rolls
back: the saved files come back byte for byte and a new pool folder that no
record names is removed. After it, the version is kept and committed.

A crash (SIGKILL, power loss: no Python cleanup) leaves the journal behind; the
next command that takes the lock runs :func:`recover` first, which finishes or
rolls back as above and reports one line. Decisions:

* The pool's data is left to the pool store's own crash safety
  (:mod:`datapool.transaction`), except after an interrupted ``restore``,
  whose ``dvc checkout --force`` may have half-rewritten the folder: recovery
  checks the pool out again at the version its record names (best effort; a
  failure is reported in the line). A failed *run* never checks out: the user
  may have edited the pool's labels, and merge keeps such edits.
* "Recorded" for restore/import/combine is the journal's mark, not an
  inspection of the folder: telling a whole folder from a half one would mean
  hashing it, and both outcomes (old or new version) are correct.
* A journal datapool cannot parse is never guessed at: every command refuses
  with the file named and what to do.

Test hook: when the environment variable :data:`CRASH_AT` names a point passed
to :func:`crash_point` (``begun``, ``after-repro``, ``done``, ``recorded``, ``committed``
here; ``staged`` and ``applying`` in :mod:`datapool.transaction`), the process kills
itself there with SIGKILL, so tests can crash a real command at a chosen step.
Nothing else reads it.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from datapool.atomic import atomic_open, put_back, read_text_if_file
from datapool.errors import DatapoolError, InputError
from datapool.layout import LOCK, PoolPaths, pool_dir
from datapool.pool import POOL_CSV
from datapool.revisions import (
    Forgotten,
    Record,
    check_new_name,
    current_record,
    forget_history,
    lock_pool,
    merge_entry,
    park,
    parked_paths,
    restorable,
    restore_record,
    version_paths,
)
from datapool.store import MANIFEST, row_count
from datapool.tools import git_commit, git_output, run_tool

# Held for a whole transaction (see workspace_lock); under .dvc/tmp, which
# DVC's own .gitignore keeps out of every commit.
LOCK_FILE = Path(".dvc") / "tmp" / "datapool.lock"
JOURNAL = Path(".dvc") / "tmp" / "datapool-journal.json"
JOURNAL_FORMAT = "datapool-journal/1"
CRASH_AT = "DATAPOOL_TEST_CRASH_AT"

Report = Callable[[str], None]


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL if :data:`CRASH_AT` names ``name`` (a test hook)."""
    if os.environ.get(CRASH_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def to_stderr(line: str) -> None:
    """The default :data:`Report`: the line on stderr, prefixed ``datapool:``."""
    print(f"datapool: {line}", file=sys.stderr, flush=True)


@contextmanager
def workspace_lock(workspace: Path) -> Iterator[None]:
    """Hold the workspace's lock for a command that edits params.yaml or commits.

    Two runs at once would otherwise commit each other's settings (the second
    rewrites params.yaml while the first is inside ``dvc repro``). A second
    command is refused at once rather than queued: it would run on settings the
    first one is about to change. The lock is an ``flock`` on :data:`LOCK_FILE`,
    so the kernel releases it when its process ends, even by SIGKILL.

    Raises :class:`InputError` when another process holds it.
    """
    path = workspace / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise InputError(
                f"another datapool command is in progress in {workspace.resolve()} "
                f"(process {holder} holds {path}); wait for it to finish, then run again"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- the journal ------------------------------------------------------------------------------


@dataclass
class Journal:
    """What an unfinished transaction is doing, as :data:`JOURNAL` holds it.

    Attributes:
        command: ``run``, ``restore``, ``combine`` or ``import``.
        pool: the pool the version is of.
        head: HEAD's full hash when the transaction began (None in a repo without commits).
        message: the commit message (a run's is final only once it is recorded).
        parked: True when the commit takes the pool's parked records only.
        files: ``{path relative to the workspace: base64 of its bytes, or None if absent}``.
        new_folder: True when the pool's folder did not exist when the transaction began.
        keep_history: False for a run that forgets the pool's older versions instead of
            committing.
        replaced: ``[digest, parked]`` of the pool's record before a run (what
            forgetting drops), or None.
        recorded: True once the change is complete and the version is to be kept.
        pool_state: sha256 of the pool's manifest (or older CSV) when the transaction
            began, ``"none"`` without one, ``""`` unknown: a rolled-back run whose merge
            had already rewritten the pool (DVC had not yet recorded it) checks the
            recorded version out again, so its rows cannot fold into the next commit.
    """

    command: str
    pool: str
    head: str | None
    message: str
    parked: bool
    files: dict[str, str | None]
    new_folder: bool = False
    keep_history: bool = True
    replaced: list[str | bool] | None = None
    recorded: bool = False
    pool_state: str = ""
    format: str = field(default=JOURNAL_FORMAT)

    def saved(self, path: str) -> bytes | None:
        """The bytes ``path`` held when the transaction began (None: it did not exist)."""
        data = self.files.get(path)
        return None if data is None else base64.b64decode(data)


def write_journal(workspace: Path, journal: Journal) -> None:
    """Write :data:`JOURNAL` atomically (a reader sees the old journal or the new one)."""
    with atomic_open(workspace / JOURNAL, "w") as handle:
        handle.write(json.dumps(asdict(journal), indent=1) + "\n")


def read_journal(workspace: Path) -> Journal | None:
    """The journal an unfinished transaction left, or None when there is none.

    Raises :class:`InputError` naming the file when it cannot be read as one:
    what the interrupted command did is then unknown, so nothing is guessed.
    """
    path = workspace / JOURNAL
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != JOURNAL_FORMAT:
            raise ValueError(f"format is not {JOURNAL_FORMAT!r}")
        journal = Journal(**data)
        if not isinstance(journal.files, dict) or not all(
            v is None or isinstance(v, str) for v in journal.files.values()
        ):
            raise ValueError("files is not a mapping of paths to saved bytes")
        for data_of_file in journal.files.values():
            if data_of_file is not None:
                base64.b64decode(data_of_file, validate=True)
    except (ValueError, TypeError, UnicodeDecodeError) as err:
        raise InputError(
            f"{path} records an interrupted datapool command but cannot be read ({err}); "
            "datapool will not guess what it did. Check the workspace with `git status` "
            "(`git restore dvc.lock params.yaml pools` brings back the last commit's records, "
            "`dvc checkout` its data), then delete that file and run again"
        ) from None
    return journal


def _touched(workspace: Path, pool: str) -> list[str]:
    """Every file a change of ``pool``'s version may write: the version's files, the
    pool's record, and the record of the pool dvc.lock names (adopting parks it)."""
    paths = version_paths(workspace)
    locked = lock_pool(read_text_if_file(workspace / LOCK))
    names = [pool] if locked is None else [pool, locked[0]]
    paths += [PoolPaths(name).record for name in names]
    return sorted(set(paths))


def _snapshot(workspace: Path, paths: Sequence[str]) -> dict[str, str | None]:
    """``{path: base64 of its bytes or None}``: what :func:`roll_back` puts back."""
    found: dict[str, str | None] = {}
    for path in paths:
        file = workspace / path
        found[path] = base64.b64encode(file.read_bytes()).decode() if file.is_file() else None
    return found


# --- deciding, finishing, rolling back --------------------------------------------------------


def is_recorded(workspace: Path, journal: Journal) -> bool:
    """True when the journal's version is to be kept: marked recorded, or (for a run)
    dvc.lock's merge entry is no longer the one saved when the run began."""
    if journal.recorded:
        return True
    if journal.command != "run":
        return False
    saved = journal.saved(LOCK)
    before = merge_entry(saved.decode("utf-8") if saved is not None else None)
    return bool(merge_entry(read_text_if_file(workspace / LOCK)) != before)


@dataclass(frozen=True)
class Finished:
    """How a transaction ended.

    Attributes:
        revision: the commit made (or HEAD when nothing differed); None without history.
        committed: False when the version's files equalled HEAD's (already committed).
        forgotten: what forgetting did (keep_history=false), else None.
    """

    revision: str | None
    committed: bool
    forgotten: Forgotten | None = None


def finish(workspace: Path, journal: Journal) -> Finished:
    """Keep the journal's version: mark it recorded, commit exactly its files (or forget
    the pool's older versions), delete the journal.

    Raises :class:`InputError` when git or DVC fails; the journal then stays, so the
    next command tries again.
    """
    if not journal.recorded:
        journal.recorded = True
        write_journal(workspace, journal)
    crash_point("recorded")
    if journal.keep_history:
        paths = parked_paths(journal.pool) if journal.parked else version_paths(workspace)
        committed = git_commit(workspace, journal.message, paths=paths)
        crash_point("committed")
        done = Finished(revision=_head(workspace), committed=committed)
    else:
        replaced = journal.replaced
        record = Record(str(replaced[0]), bool(replaced[1])) if replaced else None
        done = Finished(None, False, forget_history(workspace, journal.pool, replaced=record))
    (workspace / JOURNAL).unlink(missing_ok=True)
    return done


def _head(workspace: Path) -> str | None:
    found = git_output(workspace, "rev-parse", "--verify", "--quiet", "HEAD")
    return found.strip() if found else None


def roll_back(workspace: Path, journal: Journal, *, check_out: bool = False) -> str:
    """Put the workspace back as the journal found it and delete the journal; returns a
    note ('' when all went well) about what could not be put back.

    Every saved file gets its bytes back (atomically) or is removed where it did
    not exist; the pool's folder is removed when it is new and no record names it
    now. With ``check_out`` (an interrupted restore), the pool's data is checked out
    again at the version its record names.
    """
    for path in journal.files:
        put_back(workspace / path, journal.saved(path))
    folder = pool_dir(workspace, journal.pool)
    unnamed = current_record(workspace, journal.pool) is None
    if journal.new_folder and unnamed and folder.exists():
        shutil.rmtree(folder)
    changed = bool(journal.pool_state) and pool_state(workspace, journal.pool) != journal.pool_state
    note = ""
    if (check_out or changed) and not unnamed:
        paths = PoolPaths(journal.pool)
        parked = (workspace / paths.record).is_file()
        try:
            run_tool(
                ["dvc", "checkout", "--force", paths.record if parked else paths.folder],
                cwd=workspace,
                quiet=True,
            )
        except InputError as err:
            note = f"; its data could not be checked out again ({err}): run `dvc checkout`"
    (workspace / JOURNAL).unlink(missing_ok=True)
    return note


def pool_state(workspace: Path, pool: str) -> str:
    """sha256 of pool ``pool``'s manifest (or, in the older layout, its CSV); ``"none"``
    when it has neither. Any write of a pool version changes it (the manifest's
    shards carry fingerprints of their rows)."""
    folder = pool_dir(workspace, pool)
    for name in (MANIFEST, POOL_CSV):
        if (folder / name).is_file():
            return hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return "none"


def recover(workspace: Path, *, report: Report = to_stderr) -> str | None:
    """Finish or roll back the transaction a killed process left; returns the line
    reported (also passed to ``report``), or None when there was nothing to do.

    The caller holds :func:`workspace_lock`. Raises :class:`InputError` for a
    journal that cannot be read, or when finishing fails (git/DVC error; the
    journal stays).
    """
    journal = read_journal(workspace)
    if journal is None:
        return None
    what = f"the interrupted `{journal.command}` of pool {journal.pool}"
    if _dvc_busy(workspace):
        raise InputError(
            f"{what} left {workspace / JOURNAL}, and a DVC command still holds the "
            f"repository's lock in {workspace} (perhaps that command's `dvc repro`, which "
            "outlives a killed datapool); wait until it ends, then run again"
        )
    if is_recorded(workspace, journal):
        try:
            done = finish(workspace, journal)
        except DatapoolError as err:
            raise InputError(
                f"cannot finish {what} ({err}); fix that and run again, or delete "
                f"{workspace / JOURNAL} to leave the workspace as it is"
            ) from err
        if done.forgotten is not None:
            line = f"finished {what}: not committed (keep_history=false; {done.forgotten.note})"
        elif done.committed:
            line = f"finished {what}: revision {(done.revision or '?')[:7]}"
        else:
            line = f"{what} was already committed: revision {(done.revision or '?')[:7]}"
    else:
        note = roll_back(workspace, journal, check_out=journal.command == "restore")
        at = (journal.head or "no commit")[:7]
        line = f"rolled back {what}: the workspace is at its previous version ({at}){note}"
    report(line)
    return line


def _dvc_busy(workspace: Path) -> bool:
    """True when a DVC command holds the repository's lock. A killed datapool's ``dvc
    repro`` child keeps running and may still write dvc.lock: deciding before it ends
    could roll back files it then rewrites. (A probe: the lock is released at once, as
    rolling back and finishing run DVC commands of their own.)"""
    from dvc.lock import LockError
    from dvc.repo import Repo, lock_repo

    with Repo(str(workspace)) as repo:
        try:
            with lock_repo(repo):
                return False
        except LockError:
            return True


# --- the transaction --------------------------------------------------------------------------


class Transaction:
    """One version in the making; see the module docstring for the sequence.

    After the ``with`` block ends without error, :attr:`finished` says how it ended
    (None when :meth:`begin` was never called: the command changed nothing).
    """

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.journal: Journal | None = None
        self.finished: Finished | None = None

    def begin(
        self,
        *,
        command: str,
        pool: str,
        message: str,
        parked: bool,
        keep_history: bool = True,
        replaced: Record | None = None,
    ) -> None:
        """Write the journal: from here until the commit, an error or crash rolls back
        what the change did (see :func:`roll_back`). Call it once, right before the change."""
        if self.journal is not None:
            raise RuntimeError("a transaction begins once")
        self.journal = Journal(
            command=command,
            pool=pool,
            head=_head(self.workspace),
            message=message,
            parked=parked,
            files=_snapshot(self.workspace, _touched(self.workspace, pool)),
            new_folder=not pool_dir(self.workspace, pool).exists(),
            keep_history=keep_history,
            replaced=None if replaced is None else [replaced.digest, replaced.parked],
            pool_state=pool_state(self.workspace, pool),
        )
        write_journal(self.workspace, self.journal)
        crash_point("begun")

    def done(self, message: str) -> None:
        """The change is complete; commit it with ``message`` (instead of begin's)."""
        if self.journal is None:
            raise RuntimeError("done() before begin()")
        self.journal.message = message
        crash_point("done")

    def _end(self, error: BaseException | None) -> None:
        journal = self.journal
        if journal is None:
            return
        if error is None or is_recorded(self.workspace, journal):
            # On error after the version was recorded: keep and commit it, the error
            # still propagates (a stage after merge failed, say).
            self.finished = finish(self.workspace, journal)
        else:
            # A restore interrupted in this process (Ctrl-C, a failing checkout) may have
            # half-rewritten the pool's folder: check it out again, as recovery would.
            roll_back(self.workspace, journal, check_out=journal.command == "restore")


@contextmanager
def transaction(
    workspace: Path, *, locked: bool = False, report: Report = to_stderr
) -> Iterator[Transaction]:
    """Take the workspace lock (unless the caller holds it: ``locked``), recover what a
    killed command left (:func:`recover`), and yield a :class:`Transaction`; on leaving,
    finish it, or roll it back when the block raised before the version was recorded.

    Raises :class:`InputError` when the lock is held or recovery fails, and what the
    block raises.
    """
    with nullcontext() if locked else workspace_lock(workspace):
        recover(workspace, report=report)
        txn = Transaction(workspace)
        try:
            yield txn
        except BaseException as error:
            try:
                txn._end(error)
            except BaseException as cleanup:
                # The command's own error is what the user must see; the journal stays,
                # so the next command recovers what this clean-up could not.
                error.add_note(f"datapool could not finish cleaning up: {cleanup}")
            raise
        txn._end(None)


@contextmanager
def locked(workspace: Path, *, report: Report = to_stderr) -> Iterator[None]:
    """The workspace lock with :func:`recover` first, for a command that changes the
    workspace without making a version (``pull``)."""
    with workspace_lock(workspace):
        recover(workspace, report=report)
        yield


# --- the commands that make a version besides run (see datapool.workspace) -------------------


@dataclass(frozen=True)
class Restored:
    """What :func:`restore_version` did: the version brought back, the pool's rows, and
    the new revision recording it."""

    record: Record
    rows: int
    revision: str | None


def restore_version(
    workspace: Path, name: str, rev: str, *, report: Report = to_stderr
) -> Restored:
    """Bring pool ``name`` back to its version at ``rev`` and commit that as a new
    revision, as one transaction (see :func:`datapool.revisions.restore`).

    Refused before the journal is written when ``rev`` has no version of the pool or
    its data is not in the cache; a failing step puts every file back. Raises
    :class:`InputError` / :class:`~datapool.errors.PoolError` naming what failed.
    """
    with transaction(workspace, report=report) as txn:
        full, record = restorable(workspace, name, rev)
        message = f"pool {name}: restored from {rev}"
        txn.begin(command="restore", pool=name, message=message, parked=record.parked)
        restore_record(workspace, name, full, record)
        rows = row_count(pool_dir(workspace, name))
        txn.done(f"pool {name}: {rows} rows, restored from {rev}")
    return Restored(record, rows, txn.finished.revision if txn.finished else None)


def add_pool(
    workspace: Path,
    name: str,
    *,
    command: str,
    make: Callable[[Path], str],
    report: Report = to_stderr,
) -> str:
    """A new parked pool ``name`` as one transaction (``import``, ``combine``):
    ``make(folder)`` writes the pool into the (absent) folder and returns the commit
    message; the pool is parked (``dvc add``) and its record committed. Returns the
    message.

    The name is checked under the lock (:func:`datapool.revisions.check_new_name`).
    When ``make`` or parking fails, or the process is killed before the record is
    complete, the folder and every record come back as they were.
    Raises :class:`InputError` for a taken name, and what ``make`` raises.
    """
    with transaction(workspace, report=report) as txn:
        check_new_name(workspace, name)
        txn.begin(command=command, pool=name, message=f"pool {name}: {command}", parked=True)
        message = make(pool_dir(workspace, name))
        park(workspace, name)
        txn.done(message)
    return message
