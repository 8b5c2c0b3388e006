"""Pool versions in git and the DVC cache, on hand-made repositories (no pipeline run).

Versions are put in the cache by hand here (an older pool's CSV in a ``.dir``),
so these tests also pin that history reads such pools through DVC's API.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from datapool.errors import InputError, PoolError
from datapool.revisions import (
    adopt,
    cache_file,
    check_new_name,
    current_record,
    flat_params,
    forget_history,
    history,
    lock_pool,
    missing_objects,
    param_changes,
    parked_file,
    record_at,
    resolve,
    version_hashes,
    version_paths,
)
from datapool.tools import git_commit, git_output, run_tool
from datapool.version import restore_version, transaction

LOCK = """schema: '2.0'
stages:
  merge:
    cmd: python stages/merge.py
    outs:
    - path: pools/{name}
      hash: md5
      md5: {digest}
"""
CSV = "filenames,embedding_0,labels,content_hash,batch_id,model_id,source,pick_rank,pick_distance\n"


def put(cache: Path, data: bytes) -> str:
    md5 = hashlib.md5(data).hexdigest()
    cache_file(cache, md5).parent.mkdir(parents=True, exist_ok=True)
    cache_file(cache, md5).write_bytes(data)
    return md5


def sha(label: str) -> str:
    """A content hash (sha256 in hex) standing for the image called ``label`` in a test."""
    return hashlib.sha256(label.encode()).hexdigest()


def cached_pool(cache: Path, hashes: list[str]) -> str:
    """Store a pool folder version with one row per image label; returns its .dir digest."""
    rows = "".join(f"{h}.png,1.0,,{sha(h)},b,m,/in,1,0.5\n" for h in hashes)
    csv = put(cache, (CSV + rows).encode())
    entries = [{"md5": csv, "relpath": "datapool_latest.csv"}]
    data = json.dumps(entries).encode()
    md5 = hashlib.md5(data).hexdigest() + ".dir"
    cache_file(cache, md5).parent.mkdir(parents=True, exist_ok=True)
    cache_file(cache, md5).write_bytes(data)
    return md5


def cached(cache: Path, digest: str) -> bool:
    """True when every object of version ``digest`` is in ``cache``."""
    return missing_objects(cache, digest) == []


PIPELINE = """stages:
  merge:
    cmd: python stages/merge.py
    outs:
    - pools/${datapool.name}:
        persist: true
"""


def with_pipeline(repo: Path) -> None:
    """Commit a dvc.yaml whose merge stage outputs the pool params.yaml names, as the
    real one does, so DVC (and its API) sees dvc.lock's pool as an output."""
    (repo / "dvc.yaml").write_text(PIPELINE)
    git_commit(repo, "pipeline", paths=["dvc.yaml"])


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC repository with one commit (params.yaml naming pool A), made once:
    `git init` + `dvc init` + a commit cost ~1 s, and some 25 tests start from it."""
    ws = tmp_path_factory.mktemp("made") / "ws"
    ws.mkdir()
    run_tool(["git", "init", "-q"], cwd=ws, quiet=True)
    run_tool(["dvc", "init", "-q"], cwd=ws, quiet=True)
    (ws / "params.yaml").write_text("datapool:\n  name: A\nstopping_condition:\n  n_samples: 5\n")
    git_commit(ws, "start", paths=[".dvc", ".dvcignore", "params.yaml"])
    return ws


@pytest.fixture
def repo(made: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`made` at ``tmp_path / "ws"`` (tests use ``tmp_path`` beside
    it for clones and shared caches). Nothing in ``.git`` or ``.dvc`` names the folder, and
    DVC keys its site cache by the repository's path, so a copy is a repository of its own."""
    ws = tmp_path / "ws"
    shutil.copytree(made, ws, symlinks=True)
    return ws


def commit_version(
    ws: Path, name: str, hashes: list[str], n_samples: int, *, cache: Path | None = None
) -> str:
    digest = cached_pool(cache or ws / ".dvc" / "cache", hashes)
    (ws / "dvc.lock").write_text(LOCK.format(name=name, digest=digest))
    text = f"datapool:\n  name: {name}\nstopping_condition:\n  n_samples: {n_samples}\n"
    (ws / "params.yaml").write_text(text)
    git_commit(ws, f"pool {name}: {len(hashes)} rows", paths=version_paths(ws))
    return run_tool(["git", "rev-parse", "HEAD"], cwd=ws, quiet=True).strip()


def test_lock_pool_reads_merges_output() -> None:
    assert lock_pool(LOCK.format(name="cats", digest="ab.dir")) == ("cats", "ab.dir")
    assert lock_pool("stages: {}") is None
    assert lock_pool(None) is None


def test_flat_params_reads_yaml_1_2_like_dvc() -> None:
    assert flat_params("embed:\n  learning_rate: 1e-05\n  on: on\n") == {
        "embed.learning_rate": 1e-05,
        "embed.on": "on",
    }


def test_flat_params_and_changes() -> None:
    before = flat_params("a:\n  b: 1\n  c: x\nd: true\n")
    assert before == {"a.b": 1, "a.c": "x", "d": True}
    after = {**before, "a.b": 2, "e": 0}
    assert param_changes(before, after) == {"a.b": (1, 2), "e": (None, 0)}


def test_missing_objects(tmp_path: Path) -> None:
    digest = cached_pool(tmp_path, ["h1", "h2"])
    assert missing_objects(tmp_path, digest) == []
    assert missing_objects(tmp_path, "0" * 32 + ".dir") == ["0" * 32 + ".dir"]


def test_a_version_is_read_through_dvcs_api_and_absent_data_is_none(repo: Path) -> None:
    with_pipeline(repo)
    v1 = commit_version(repo, "A", ["h1", "h2"], 5)
    assert version_hashes(repo, v1, "A") == [sha("h1"), sha("h2")]
    assert version_hashes(repo, v1, "B") is None
    shutil.rmtree(repo / ".dvc" / "cache")  # a clone without `dvc pull`
    assert version_hashes(repo, v1, "A") is None
    assert [r.rows for r in history(repo, "A")] == [None]


def test_history_counts_rows_added_removed_and_params(repo: Path) -> None:
    with_pipeline(repo)
    v1 = commit_version(repo, "A", ["h1", "h2"], 5)
    v2 = commit_version(repo, "A", ["h1", "h2", "h3"], 7)
    v3 = commit_version(repo, "A", ["h1", "h4"], 7)
    revisions = history(repo, "A")
    assert [r.rev for r in revisions] == [v1, v2, v3]
    assert [(r.rows, r.added, r.removed) for r in revisions] == [(2, 2, 0), (3, 1, 0), (2, 1, 2)]
    assert revisions[1].changed == {"stopping_condition.n_samples": (5, 7)}
    assert revisions[2].changed == {}
    assert history(repo, "B") == []


def test_record_and_resolve(repo: Path) -> None:
    v1 = commit_version(repo, "A", ["h1"], 5)
    record = record_at(repo, v1, "A")
    assert record is not None and not record.parked
    assert current_record(repo, "A") == record
    assert record_at(repo, v1, "B") is None
    with pytest.raises(InputError, match="no revision 'nope'"):
        resolve(repo, "nope")
    with pytest.raises(PoolError, match="has no version of pool B"):
        restore_version(repo, "B", v1)


def test_forget_history_drops_only_this_pools_old_versions(repo: Path) -> None:
    v1 = commit_version(repo, "A", ["h1"], 5)
    vb = commit_version(repo, "B", ["h9"], 5)
    v2 = commit_version(repo, "A", ["h1", "h2"], 5)
    cache = repo / ".dvc" / "cache"
    forgotten = forget_history(repo, "A")
    assert forgotten.deleted == 2 and forgotten.shared_cache is None  # v1's manifest and CSV
    records = [record_at(repo, rev, name) for rev, name in ((v1, "A"), (vb, "B"), (v2, "A"))]
    assert all(r is not None for r in records)
    present = [cached(cache, r.digest) for r in records if r is not None]
    assert present == [False, True, True]


def test_check_new_name(repo: Path) -> None:
    (repo / "pools" / "taken").mkdir(parents=True)
    check_new_name(repo, "fresh")
    # New names get check_pool_name's rule, as datapool.name of a run does.
    for name in ("taken", "A", "a/b", ".hidden", "my pool", "données", "a+b", "x.dvc"):
        with pytest.raises(InputError):
            check_new_name(repo, name)


def _two_pools(repo: Path) -> Path:
    """Pool A is the pipeline's (dvc.lock), pool B is parked (pools/B.dvc), both present."""
    for name in ("A", "B"):
        folder = repo / "pools" / name
        folder.mkdir(parents=True)
        row = f"{name}.png,1.0,,{sha(name)},b,m,/in,1,1\n"
        (folder / "datapool_latest.csv").write_text(CSV + row)
    run_tool(["dvc", "add", "pools/B"], cwd=repo, quiet=True)
    with (repo / "pools" / ".gitignore").open("a") as ignore:
        ignore.write("/A\n")  # as DVC does for the merge stage's output
    lock = LOCK.format(name="A", digest="0" * 32 + ".dir")
    (repo / "dvc.lock").write_text(lock)
    git_commit(repo, "A is the pipeline's pool, B is parked", paths=version_paths(repo))
    return repo / "pools" / "B.dvc"


@pytest.fixture(scope="module")
def made_two(made: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`made` after :func:`_two_pools` (its `dvc add` costs ~1 s), made once."""
    ws = tmp_path_factory.mktemp("two") / "ws"
    shutil.copytree(made, ws, symlinks=True)
    _two_pools(ws)
    return ws


@pytest.fixture
def two(made_two: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`made_two` at ``tmp_path / "ws"``: pool A the pipeline's,
    B parked (its record ``pools/B.dvc``), both present and committed."""
    ws = tmp_path / "ws"
    shutil.copytree(made_two, ws, symlinks=True)
    return ws


def _corrupt_cache_object(repo: Path, file: Path) -> None:
    """Put a folder where DVC will store ``file``'s object: `dvc add` of it then fails."""
    md5 = hashlib.md5(file.read_bytes()).hexdigest()
    (cache_file(repo / ".dvc" / "cache", md5) / "corrupt").mkdir(parents=True)


def test_a_failed_switch_leaves_both_pools_recorded(two: Path) -> None:
    # Switching the pipeline to B parks A with `dvc add`; a corrupt cache object
    # makes that fail. B's record must still be there (it used to be deleted first).
    record = two / "pools" / "B.dvc"
    before = record.read_text()
    _corrupt_cache_object(two, two / "pools" / "A" / "datapool_latest.csv")
    with pytest.raises(InputError, match=r"dvc add pools/A.*Is a directory"):
        adopt(two, "B")
    assert record.read_text() == before
    assert current_record(two, "A") is not None and not parked_file(two, "A").exists()
    assert git_output(two, "status", "--porcelain", "pools") == ""


def test_a_switch_is_refused_before_anything_changes_when_the_old_pool_is_absent(
    two: Path,
) -> None:
    record = two / "pools" / "B.dvc"
    shutil.rmtree(two / "pools" / "A")  # e.g. a clone whose `dvc pull` missed an object
    with pytest.raises(PoolError, match="missing from"):
        adopt(two, "B")
    assert record.is_file()


def test_a_record_lost_by_an_earlier_failed_switch_is_restored(two: Path) -> None:
    # What a failed run used to leave: B's record deleted in the working tree
    # (HEAD still has it), its folder present. The next run must not commit that.
    record = two / "pools" / "B.dvc"
    before = record.read_text()
    record.unlink()
    adopt(two, "A")
    assert record.read_text() == before
    git_commit(two, "next run", paths=version_paths(two))
    assert record_at(two, "HEAD", "B") is not None


def test_forget_history_keeps_versions_a_tag_or_branch_uses(repo: Path) -> None:
    v1 = commit_version(repo, "A", ["h1"], 5)
    run_tool(["git", "tag", "release", v1], cwd=repo, quiet=True)
    v2 = commit_version(repo, "A", ["h2"], 5)
    run_tool(["git", "branch", "before-v3", v2], cwd=repo, quiet=True)
    commit_version(repo, "A", ["h3"], 5)
    commit_version(repo, "A", ["h4"], 5)
    assert forget_history(repo, "A").deleted == 2  # only v3: the tag uses v1, the branch v2
    cache = repo / ".dvc" / "cache"
    kept = [record_at(repo, rev, "A") for rev in (v1, v2)]
    assert all(r is not None and cached(cache, r.digest) for r in kept)


def _shared(ws: Path, cache: Path) -> None:
    run_tool(["dvc", "cache", "dir", str(cache)], cwd=ws, quiet=True)
    git_commit(ws, "use the shared cache", paths=[".dvc/config"])


def test_forget_history_leaves_a_shared_cache_alone(repo: Path, tmp_path: Path) -> None:
    # Two workspaces share one cache (`dvc cache dir`); the other one is a clone
    # still at v1. Which objects other workspaces use cannot be known, so none go.
    shared = tmp_path / "shared-cache"
    _shared(repo, shared)
    v1 = commit_version(repo, "A", ["h1"], 5, cache=shared)
    other = tmp_path / "other"
    run_tool(["git", "clone", "-q", str(repo), str(other)], cwd=tmp_path, quiet=True)
    commit_version(repo, "A", ["h2"], 5, cache=shared)
    forgotten = forget_history(repo, "A")
    assert forgotten.deleted == 0 and forgotten.shared_cache == shared
    assert "shared" in forgotten.note and str(shared) in forgotten.note
    used = record_at(other, "HEAD", "A")
    assert used is not None and used == record_at(repo, v1, "A")
    assert missing_objects(shared, used.digest) == []


@pytest.mark.slow  # DVC retries its lock for ~3 s before giving up (as test_version's recovery)
def test_forget_history_waits_for_dvcs_lock_and_deletes_nothing_without_it(repo: Path) -> None:
    # Another DVC command holds the repository lock: nothing is deleted behind its back.
    commit_version(repo, "A", ["h1"], 5)
    commit_version(repo, "A", ["h2"], 5)
    cache = repo / ".dvc" / "cache"
    before = sorted(p for p in cache.rglob("*") if p.is_file())
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(repo)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(InputError, match=r"lock.*nothing was deleted"):
            forget_history(repo, "A")
    finally:
        holder.communicate("")
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == before
    assert forget_history(repo, "A").deleted == 2


HOLD_LOCK = """
import sys
from dvc.repo import Repo
repo = Repo(sys.argv[1])
with repo.lock:
    print("locked", flush=True)
    sys.stdin.read()
"""


FAILING_MERGE = """stages:
  merge:
    cmd: python -c "raise SystemExit('merge failed')"
    outs:
    - pools/B:
        persist: true
"""


def test_a_run_that_fails_after_the_switch_undoes_it(two: Path) -> None:
    # params.yaml names B (so dvc.yaml declares pools/B); the pipeline then fails
    # for real. Until dvc.lock records B the switch has not happened: both
    # pools' records and pools/.gitignore must be as HEAD has them.
    (two / "dvc.yaml").write_text(FAILING_MERGE)
    with pytest.raises(InputError, match="merge failed"), transaction(two) as txn:
        txn.begin(command="run", pool="B", message="pool B", parked=False)
        adopt(two, "B")
        assert not parked_file(two, "B").exists() and parked_file(two, "A").exists()
        run_tool(["dvc", "repro"], cwd=two, quiet=True)
    assert git_output(two, "status", "--porcelain", "pools") == ""
    assert record_at(two, "HEAD", "B") == current_record(two, "B")


def test_a_switch_that_took_effect_is_kept_and_committed(two: Path) -> None:
    with pytest.raises(RuntimeError), transaction(two) as txn:
        txn.begin(command="run", pool="B", message="pool B: kept", parked=False)
        adopt(two, "B")
        (two / "dvc.lock").write_text(LOCK.format(name="B", digest="1" * 32 + ".dir"))
        raise RuntimeError("failed after the merge stage recorded pool B")
    assert not parked_file(two, "B").exists() and parked_file(two, "A").exists()
    assert git_output(two, "log", "-1", "--format=%s") == "pool B: kept\n"
    assert record_at(two, "HEAD", "B") == current_record(two, "B")


def _leave_user_changes(repo: Path) -> None:
    """A stray untracked file and an edit to a tracked file that is not a pool record."""
    (repo / "notes.txt").write_text("a note of the user's\n")
    with (repo / ".dvcignore").open("a") as ignore:
        ignore.write("# the user's comment\n")


def _changed(repo: Path, rev: str = "HEAD") -> list[str]:
    text = git_output(repo, "show", "--format=", "--name-status", "--no-renames", rev) or ""
    return sorted(line for line in text.splitlines() if line)


def _user_changes_left(repo: Path) -> list[str]:
    return sorted((git_output(repo, "status", "--porcelain") or "").splitlines())


def test_a_switch_commits_its_records_and_the_dropped_one_as_a_deletion(two: Path) -> None:
    _leave_user_changes(two)
    adopt(two, "B")  # parks A, drops pools/B.dvc: merge's output records B from now on
    (two / "dvc.lock").write_text(LOCK.format(name="B", digest="1" * 32 + ".dir"))
    (two / "params.yaml").write_text("datapool:\n  name: B\n")
    paths = version_paths(two)
    assert {"pools/A.dvc", "pools/B.dvc", "dvc.lock", "params.yaml"} <= set(paths)
    assert git_commit(two, "pool B", paths=paths)
    assert _changed(two) == ["A\tpools/A.dvc", "D\tpools/B.dvc", "M\tdvc.lock", "M\tparams.yaml"]
    assert _user_changes_left(two) == [" M .dvcignore", "?? notes.txt"]


def test_forget_history_drops_the_uncommitted_version_each_run_replaced(repo: Path) -> None:
    # keep_history=false commits nothing, so the version a run leaves is in no commit;
    # the next run must still drop it, or the cache grows by one version per run.
    cache = repo / ".dvc" / "cache"
    commit_version(repo, "A", ["h1"], 5)
    versions, deleted = [], []
    for hashes in (["h1", "h2"], ["h1", "h2", "h3"], ["h1", "h2", "h3", "h4"]):
        replaced = current_record(repo, "A")  # what the working tree recorded before the run
        versions.append(cached_pool(cache, hashes))
        (repo / "dvc.lock").write_text(LOCK.format(name="A", digest=versions[-1]))
        deleted.append(forget_history(repo, "A", replaced=replaced).deleted)
    assert deleted == [2, 2, 2]  # each time the replaced version's manifest and CSV
    assert [cached(cache, v) for v in versions] == [False, False, True]
    # A run that changed nothing replaced the version it keeps: nothing goes.
    same = current_record(repo, "A")
    assert forget_history(repo, "A", replaced=same).deleted == 0
    assert cached(cache, versions[-1])


def test_forget_history_keeps_a_replaced_version_a_branch_uses(repo: Path) -> None:
    cache = repo / ".dvc" / "cache"
    commit_version(repo, "A", ["h1"], 5)
    run_tool(["git", "checkout", "-q", "-b", "experiment"], cwd=repo, quiet=True)
    branch = commit_version(repo, "A", ["h1", "h2"], 5)
    run_tool(["git", "checkout", "-q", "-"], cwd=repo, quiet=True)
    # A keep_history=false run here made the branch's version again, uncommitted.
    run_tool(["git", "checkout", "-q", branch, "--", "dvc.lock"], cwd=repo, quiet=True)
    replaced = current_record(repo, "A")
    (repo / "dvc.lock").write_text(LOCK.format(name="A", digest=cached_pool(cache, ["h3"])))
    forget_history(repo, "A", replaced=replaced)
    used = record_at(repo, branch, "A")
    assert used is not None and used == replaced and cached(cache, used.digest)


def _pipeline_files(repo: Path) -> dict[str, bytes]:
    return {f: (repo / f).read_bytes() for f in ("params.yaml", "dvc.lock")}


def test_a_failed_restore_leaves_params_and_lock_as_they_were(repo: Path) -> None:
    # The pipeline moved on to pool B, whose folder is not here (a clone without
    # `dvc pull`): restoring A's pipeline version fails in the switch. v1's
    # params.yaml must not stay behind, staged, for the next run to commit.
    v1 = commit_version(repo, "A", ["h1"], 5)
    commit_version(repo, "B", ["h2"], 9)
    with (repo / "params.yaml").open("a") as params:
        params.write("# the user's uncommitted note\n")
    before = _pipeline_files(repo)
    with pytest.raises(PoolError, match="missing from"):
        restore_version(repo, "A", v1)
    assert _pipeline_files(repo) == before
    assert _user_changes_left(repo) == [" M params.yaml"]


def test_a_restore_that_fails_parking_the_current_pool_changes_nothing(repo: Path) -> None:
    # Restoring B's pipeline version parks A with `dvc add`; a corrupt cache
    # object makes that fail after params.yaml already named B.
    v1 = commit_version(repo, "B", ["h1"], 5)
    (repo / "params.yaml").write_text("datapool:\n  name: A\n")
    record = _two_pools(repo)
    before, saved = _pipeline_files(repo), record.read_text()
    _corrupt_cache_object(repo, repo / "pools" / "A" / "datapool_latest.csv")
    with pytest.raises(InputError, match=r"dvc add pools/A"):
        restore_version(repo, "B", v1)
    assert _pipeline_files(repo) == before and record.read_text() == saved
    assert _user_changes_left(repo) == []


def _checkouts_fail(repo: Path) -> None:
    """Allow DVC only reflinks, which this filesystem lacks: `dvc checkout` then fails
    for real (a workspace moved from a filesystem that had them)."""
    from dvc_objects.fs.system import reflink

    probe = repo.parent / "probe"
    probe.write_bytes(b"x")
    try:
        reflink(str(probe), str(repo.parent / "probe-link"))
    except OSError:
        run_tool(["dvc", "config", "--local", "cache.type", "reflink"], cwd=repo, quiet=True)
        return
    pytest.skip("this filesystem has reflinks, so `dvc checkout` would succeed")


MERGE_A = """stages:
  merge:
    cmd: python stages/merge.py
    outs:
    - pools/A:
        persist: true
"""


def test_a_restore_whose_checkout_fails_puts_everything_back(repo: Path) -> None:
    (repo / "dvc.yaml").write_text(MERGE_A)  # so `dvc checkout` checks out dvc.lock's pool
    git_commit(repo, "pipeline", paths=["dvc.yaml"])
    v1 = commit_version(repo, "A", ["h1"], 5)
    commit_version(repo, "A", ["h1", "h2"], 7)
    record = _two_pools(repo)  # A the pipeline's, B parked at a first version
    b1 = run_tool(["git", "rev-parse", "HEAD"], cwd=repo, quiet=True).strip()
    (repo / "pools" / "B" / "datapool_latest.csv").write_text(CSV)
    run_tool(["dvc", "add", "pools/B"], cwd=repo, quiet=True)
    git_commit(repo, "B emptied", paths=version_paths(repo))
    before, saved = _pipeline_files(repo), record.read_text()
    _checkouts_fail(repo)
    for name, rev in (("A", v1), ("B", b1)):  # a pipeline version, a parked one
        with pytest.raises(InputError, match="dvc checkout"):
            restore_version(repo, name, rev)
        assert _pipeline_files(repo) == before and record.read_text() == saved
        assert _user_changes_left(repo) == []


def test_forget_history_drops_versions_a_branch_shares_with_head_but_not_its_own(
    repo: Path,
) -> None:
    # What forget_history's docstring promises for other branches, exactly: their
    # tip's version and their own commits' stay; shared history goes like HEAD's.
    cache = repo / ".dvc" / "cache"
    v1 = commit_version(repo, "A", ["h1"], 5)
    run_tool(["git", "checkout", "-q", "-b", "feature"], cwd=repo, quiet=True)
    own = commit_version(repo, "A", ["h1", "f1"], 5)
    tip = commit_version(repo, "A", ["h1", "f1", "f2"], 5)
    run_tool(["git", "checkout", "-q", "-"], cwd=repo, quiet=True)
    commit_version(repo, "A", ["h1", "h2"], 5)
    forget_history(repo, "A")
    records = [record_at(repo, rev, "A") for rev in (v1, own, tip)]
    assert [r is not None and cached(cache, r.digest) for r in records] == [False, True, True]
