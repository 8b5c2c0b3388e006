"""Every path of a pool is named once: datapool.layout and dvc.yaml agree."""

from __future__ import annotations

from pathlib import Path

import yaml

from datapool.layout import PLOT_FILES, PoolPaths, pool_dir, pool_of_record

ROOT = Path(__file__).resolve().parent.parent


def test_dvc_yaml_uses_the_paths_layout_names() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    paths = PoolPaths("${datapool.name}")
    commands = " ".join(str(stage["cmd"]) for stage in stages.values())
    for path in (paths.folder, paths.candidates, paths.picks, paths.reembedded):
        assert f"'{path}'" in commands, path
    assert stages["merge"]["outs"] == [
        {paths.folder: {"persist": True}},
        paths.report,
        paths.plots,
    ]
    assert paths.picks in stages["sample"]["outs"]
    assert stages["select_inputs"]["outs"] == [paths.select_inputs]
    assert paths.select_inputs in stages["sample"]["deps"]
    assert f"'{paths.select_inputs}'" in stages["sample"]["cmd"]
    assert paths.selection_info in stages["sample"]["outs"]
    for path in (paths.selection_info, paths.report, paths.metrics, paths.plots, paths.timings):
        assert f"'{path}'" in commands, path


def test_dvc_yaml_declares_the_metrics_and_every_plot_file() -> None:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
    paths = PoolPaths("${datapool.name}")
    merge = spec["stages"]["merge"]
    assert merge["metrics"] == [paths.metrics]
    assert "plots" not in merge  # drawn only by the top-level definitions, not twice
    # Each plot file drawn by a top-level definition: its key, or a y of a named one.
    drawn: set[str] = set()
    for definition in spec["plots"]:
        ((key, config),) = definition.items()
        ys = config.get("y")
        drawn |= set(ys) if isinstance(ys, dict) else {key}
    assert drawn == {paths.plot_file(role) for role in PLOT_FILES}


def test_paths_of_a_pool() -> None:
    paths = PoolPaths("cats")
    assert (paths.folder, paths.record, paths.work) == ("pools/cats", "pools/cats.dvc", "work/cats")
    assert pool_dir(Path("/ws"), "cats") == Path("/ws/pools/cats")
    assert [pool_of_record(p) for p in ("pools/cats", "pools/cats.dvc", "pools/a/b", "x/cats")] == [
        "cats",
        "cats",
        None,
        None,
    ]
