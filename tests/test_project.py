"""The project's wiring: dvc.yaml, params.yaml and the stages agree with each other."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import typer.main
import yaml
from typer.core import TyperOption

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _lookup(dotted: str) -> object:
    node: object = PARAMS
    for key in dotted.split("."):
        assert isinstance(node, dict) and key in node, f"{dotted} is not in params.yaml"
        node = node[key]
    return node


def test_every_interpolated_key_exists_in_params() -> None:
    text = (ROOT / "dvc.yaml").read_text()
    keys = set(re.findall(r"\$\{([^}]+)\}", text))
    assert keys, "dvc.yaml interpolates nothing?"
    for key in keys:
        _lookup(key)


def test_every_value_in_a_stage_command_is_single_quoted() -> None:
    # DVC pastes values into a shell command line: unquoted, an input folder named
    # `in box` splits in two and one named `x$(touch PWNED)` runs a command. Inside
    # single quotes only a quote itself is special, and datapool.settings refuses those.
    for name, stage in PIPELINE["stages"].items():
        outside_quotes = re.sub(r"'[^']*'", "", stage["cmd"])
        assert "${" not in outside_quotes, f"stage {name}: {outside_quotes}"


def test_declared_params_exist() -> None:
    for stage in PIPELINE["stages"].values():
        for entry in stage.get("params", []):
            _lookup(entry)


def test_every_flag_is_an_option_of_its_stage() -> None:
    for name, stage in PIPELINE["stages"].items():
        module = importlib.import_module(f"stages.{name}")
        command = typer.main.get_command(module.app)
        options = {opt for p in command.params if isinstance(p, TyperOption) for opt in p.opts}
        flags = re.findall(r"(--[a-z][a-z0-9-]*)", stage["cmd"])
        assert flags, name
        unknown = sorted(set(flags) - options)
        assert not unknown, f"stage {name} passes unknown options {unknown}"
        required = {p.opts[0] for p in command.params if isinstance(p, TyperOption) and p.required}
        assert required <= set(flags), f"stage {name} lacks required {required - set(flags)}"


def test_every_stage_option_is_passed_explicitly() -> None:
    # One source of truth: a stage default must never silently stand in for params.yaml.
    for name, stage in PIPELINE["stages"].items():
        command = typer.main.get_command(importlib.import_module(f"stages.{name}").app)
        options = {p.opts[0] for p in command.params if isinstance(p, TyperOption)} - {"--help"}
        missing = sorted(options - set(re.findall(r"(--[a-z][a-z0-9-]*)", stage["cmd"])))
        assert not missing, f"dvc.yaml does not pass {missing} to stage {name}"


def test_library_imports_without_typer_or_dvc() -> None:
    code = (
        "import sys, datapool, datapool.pool, datapool.increment, datapool.selection, "
        "datapool.images, datapool.embedding.model, datapool.embedding.inference, "
        "datapool.workspace, datapool.revisions, datapool.combine, datapool.exchange, "
        "datapool.container, datapool.tools, datapool.settings, datapool.transaction, "
        "datapool.embedding.pool_model; "
        "bad = [m for m in ('typer', 'dvc', 'click') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _modules_loaded_by(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running ``code``."""
    report = "; import sys; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    result = subprocess.run(
        [sys.executable, "-c", code + report], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return set(result.stdout.split())


def test_bare_package_imports_no_heavy_or_command_line_dependency() -> None:
    loaded = _modules_loaded_by("import datapool")
    assert loaded & {"torch", "torchvision", "typer", "click", "dvc", "pandas"} == set()


def test_command_line_and_workspace_modules_import_without_torch() -> None:
    # torch alone costs seconds; only `datapool run`'s stages and combine's re-embedding
    # need it, so `datapool --help` and the light commands must not pay for it.
    loaded = _modules_loaded_by(
        "import datapool.cli, datapool.workspace, datapool.settings, datapool.revisions, "
        "datapool.increment, datapool.combine, datapool.exchange, datapool.container, "
        "datapool.strategy_config, datapool.strategy_inputs"
    )
    assert "datapool" in loaded
    assert loaded & {"torch", "torchvision", "dvc"} == set()


def test_help_runs_without_importing_torch() -> None:
    # -X importtime names every module the command imports, on stderr, one per line.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "datapool", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restore" in result.stdout  # the usage text, listing the commands
    imported = {
        line.rpartition("|")[2].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert {"datapool", "typer"} <= imported
    assert imported & {"torch", "torchvision", "dvc"} == set()


def test_torch_and_torchvision_import_together() -> None:
    # The pinned pair must load torchvision's compiled ops on a CPU-only machine.
    import torch
    import torchvision

    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    kept = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8]), 0.5)
    assert kept.tolist() == [0]


def test_packaged_pipeline_is_the_repository_pipeline() -> None:
    # `datapool init` copies datapool/pipeline/: symlinks here, real files in a wheel.
    from datapool.workspace import TEMPLATE_FILES, template_dir

    for name in TEMPLATE_FILES:
        assert (template_dir() / name).read_bytes() == (ROOT / name).read_bytes(), name
