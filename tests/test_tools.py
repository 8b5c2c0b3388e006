"""git_commit on small hand-made git repositories: it commits the paths it is given, no more."""

from __future__ import annotations

from pathlib import Path

import pytest

from datapool.errors import InputError
from datapool.tools import git_commit, git_output, run_tool


def status(repo: Path) -> list[str]:
    """``git status --porcelain`` lines, e.g. ``?? notes.txt`` or `` M README.md``."""
    return (git_output(repo, "status", "--porcelain", "--untracked-files=all") or "").splitlines()


def changed_in(repo: Path, rev: str = "HEAD") -> list[str]:
    """``STATUS\\tPATH`` for every file commit ``rev`` changed."""
    text = git_output(repo, "show", "--format=", "--name-status", "--no-renames", rev) or ""
    return [line for line in text.splitlines() if line]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A committed repository with a record (``pools/A.dvc``) and a user's README."""
    root = tmp_path / "repo"
    (root / "pools").mkdir(parents=True)
    run_tool(["git", "init", "-q"], cwd=root, quiet=True)
    (root / "params.yaml").write_text("n: 1\n")
    (root / "pools" / "A.dvc").write_text("outs: []\n")
    (root / "README.md").write_text("my notes\n")
    assert git_commit(root, "start", paths=["params.yaml", "pools/A.dvc", "README.md"])
    return root


def test_the_first_commit_takes_only_the_named_paths(tmp_path: Path) -> None:
    run_tool(["git", "init", "-q"], cwd=tmp_path, quiet=True)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "scratch.png").write_bytes(b"\x89PNG not ours")
    assert git_commit(tmp_path, "first", paths=["dvc.yaml"])
    assert changed_in(tmp_path) == ["A\tdvc.yaml"]
    assert status(tmp_path) == ["?? scratch.png"]


def test_strays_and_other_changes_stay_out_of_the_commit(repo: Path) -> None:
    (repo / "notes.txt").write_text("a stray file\n")
    (repo / "README.md").write_text("my notes, edited\n")
    (repo / "pools" / "scratch.dvc").write_text("a user's own file beside the records\n")
    (repo / "params.yaml").write_text("n: 2\n")
    assert git_commit(repo, "run", paths=["params.yaml", "dvc.lock"])  # dvc.lock: none here
    assert changed_in(repo) == ["M\tparams.yaml"]
    assert sorted(status(repo)) == [" M README.md", "?? notes.txt", "?? pools/scratch.dvc"]
    assert (repo / "README.md").read_text() == "my notes, edited\n"


def test_a_change_the_user_staged_stays_staged_and_uncommitted(repo: Path) -> None:
    (repo / "README.md").write_text("staged by the user\n")
    run_tool(["git", "add", "README.md"], cwd=repo, quiet=True)
    (repo / "params.yaml").write_text("n: 3\n")
    assert git_commit(repo, "run", paths=["params.yaml"])
    assert changed_in(repo) == ["M\tparams.yaml"]
    assert status(repo) == ["M  README.md"]


def test_a_deleted_record_is_committed_as_a_deletion(repo: Path) -> None:
    (repo / "pools" / "A.dvc").unlink()
    (repo / "pools" / "B.dvc").write_text("outs: [b]\n")
    assert git_commit(repo, "switch", paths=["pools/A.dvc", "pools/B.dvc", "pools/.gitignore"])
    assert sorted(changed_in(repo)) == ["A\tpools/B.dvc", "D\tpools/A.dvc"]
    assert status(repo) == []


def test_nothing_changed_means_no_commit(repo: Path) -> None:
    before = git_output(repo, "rev-parse", "HEAD")
    (repo / "notes.txt").write_text("a stray file\n")
    assert not git_commit(repo, "nothing", paths=["params.yaml", "pools/gone.dvc"])
    assert not git_commit(repo, "nothing", paths=["never-there.txt"])
    assert git_output(repo, "rev-parse", "HEAD") == before


def test_paths_are_literal_not_globs(repo: Path) -> None:
    (repo / "pools" / "B.dvc").write_text("outs: [b]\n")
    assert not git_commit(repo, "glob", paths=["pools/*.dvc"])
    assert status(repo) == ["?? pools/B.dvc"]


def test_an_ignored_path_is_refused_with_gits_message(repo: Path) -> None:
    (repo / ".gitignore").write_text("*.lock\n")
    (repo / "dvc.lock").write_text("stages: {}\n")
    with pytest.raises(InputError, match=r"git --literal-pathspecs add .*dvc\.lock"):
        git_commit(repo, "run", paths=["dvc.lock"])
