"""Settings are checked before any stage runs: known keys, types, ranges, safe text."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from datapool.errors import InputError
from datapool.settings import (
    DEVICE_TYPES,
    SETTINGS,
    check_existing_pool_name,
    check_params,
    check_pool_name,
    check_selection,
    check_value,
    flatten,
    load_params,
    parse_settings,
    strategies_summary,
)

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _flat(node: object, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _flat(value, f"{prefix}{key}.")]
    return [prefix.rstrip(".")]


def test_every_setting_of_params_yaml_has_a_rule() -> None:
    assert sorted(SETTINGS) == sorted(_flat(PARAMS))


def test_the_shipped_params_pass() -> None:
    settings = check_params(PARAMS, source="params.yaml")
    assert settings.name == PARAMS["datapool"]["name"]
    assert settings.keep_history is True


def test_choices_agree_with_the_model_code() -> None:
    from datapool.embedding.model import BACKBONES, PRECISIONS

    assert SETTINGS["embed.model"].choices == tuple(sorted(BACKBONES))
    assert SETTINGS["embed.precision"].choices == PRECISIONS


def test_values_are_parsed_by_the_type_of_their_setting() -> None:
    parsed = parse_settings(
        [
            "stopping_condition.min_distance=0.1",
            "stopping_condition.n_samples=1e3",
            "datapool.keep_history=False",
            "datapool.name=2024",  # text, although YAML would read a number
            "embed.weights=none",
            "input_dir=/data/in box/x$(touch PWNED)",
        ]
    )
    assert parsed == {
        "stopping_condition.min_distance": 0.1,
        "stopping_condition.n_samples": 1000,
        "datapool.keep_history": False,
        "datapool.name": "2024",
        "embed.weights": "none",
        "input_dir": "/data/in box/x$(touch PWNED)",
    }
    assert type(parsed["stopping_condition.n_samples"]) is int


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("stopping_condition.min_distance=2.5", "min_distance must be a number in [0, 2], got 2.5"),
        ("stopping_condition.min_distance=-0.1", "min_distance must be a number in [0, 2]"),
        ("stopping_condition.min_distance=.nan", "min_distance must be a number in [0, 2]"),
        ("stopping_condition.min_distance=far", "min_distance must be a number in [0, 2]"),
        ("stopping_condition.n_samples=-1", "n_samples must be a whole number >= 0, got -1"),
        ("stopping_condition.n_samples=1.5", "n_samples must be a whole number >= 0, got 1.5"),
        ("stopping_condition.n_samples=true", "n_samples must be a whole number >= 0, got True"),
        ("datapool.keep_history=maybe", "keep_history must be true or false, got 'maybe'"),
        ("append_weak_labels=1", "append_weak_labels must be true or false, got 1"),
        ("embed.model=vgg16", "embed.model must be one of mobilenet_v3_small, resnet18"),
        ("embed.precision=fp16", "embed.precision must be one of fp32, bf16"),
        ("embed.device=gpu", "embed.device must be auto or a torch device (cpu, cuda"),
        ("embed.device=cuda:x", "embed.device must be auto or a torch device"),
        ("embed.weights=a..b", "embed.weights must be auto, none, a torchvision weights name"),
        ("embed.weights=x;rm", "embed.weights must be auto, none, a torchvision weights name"),
        ("embed.weights=/m/x'y.pth", "or the path of a weights file"),
        ("embed.image_size=auto32", "embed.image_size must be auto or a whole number >= 16"),
        ("embed.embedding_dim=0", "embed.embedding_dim must be a whole number >= 1, got 0"),
        ("embed.image_size=8", "embed.image_size must be auto or a whole number >= 16, got '8'"),
        ("embed.batch_size=0", "embed.batch_size must be a whole number >= 1"),
        ("embed.num_workers=-2", "embed.num_workers must be a whole number >= 0"),
        ("embed.train_batch_size=1", "embed.train_batch_size must be a whole number >= 2"),
        ("embed.learning_rate=0", "embed.learning_rate must be a number > 0, got 0"),
        ("embed.learning_rate=.inf", "embed.learning_rate must be a number > 0"),
        ("datapool.name=../elsewhere", "'../elsewhere' is not a usable pool name"),
        ("datapool.name=x$(touch PWNED)", "is not a usable pool name"),
        ("datapool.name=", "'' is not a usable pool name"),
        ("input_dir=/data/it's", "the pipeline's shell commands cannot carry"),
        ("input_dir=/data/a\\b", "the pipeline's shell commands cannot carry"),
        ("input_dir=/data/a\tb", "the pipeline's shell commands cannot carry"),
        ("input_dir=", "input_dir must not be empty"),
        ("stopping_condition.n_sample=3", "unknown setting 'stopping_condition.n_sample'; known:"),
        ("datapool=x", "unknown setting 'datapool'"),
        ("no_equals_sign", "expected KEY=VALUE, got 'no_equals_sign'"),
    ],
)
def test_bad_settings_are_refused_with_the_key_and_value(pair: str, message: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_settings([pair])
    assert message in str(caught.value)


def test_a_bad_params_file_is_refused_naming_it() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["stopping_condition"] = {"n_samples": 0, "min_distance": 0.0}
    with pytest.raises(InputError, match="with neither, selection would never stop"):
        check_params(params, source="ws/params.yaml")
    params["stopping_condition"] = {"n_samples": 3, "min_distance": 3}
    with pytest.raises(InputError, match=r"ws/params.yaml: stopping_condition.min_distance must"):
        check_params(params, source="ws/params.yaml")
    params["stopping_condition"]["min_distance"] = 0
    params["datapool"]["name"] = 7.5  # a number where the file must hold text
    with pytest.raises(InputError, match=r"datapool.name must be text, got 7.5"):
        check_params(params, source="ws/params.yaml")
    del params["datapool"]["name"]
    with pytest.raises(InputError, match=r"ws/params.yaml lacks datapool.name"):
        check_params(params, source="ws/params.yaml")


@pytest.mark.parametrize("name", ["my_datapool", "A", "cats-2024.v2", "0"])
def test_plain_pool_names_pass(name: str) -> None:
    assert check_pool_name(name) == name


@pytest.mark.parametrize(
    "name", ["", ".hidden", "..", "a/b", "a b", "-rf", "x'y", "é", "a.dvc", "x" * 101, "a\nb"]
)
def test_other_pool_names_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="is not a usable pool name"):
        check_pool_name(name)


@pytest.mark.parametrize(
    "pair",
    [
        "embed.device=mps",
        "embed.device=xpu",
        "embed.device=xpu:1",
        "embed.device=cuda:0",
        "embed.weights=ResNet18_Weights.IMAGENET1K_V1",
        "embed.weights=IMAGENET1K_V2",
        "embed.weights=auto",
        "embed.weights=/models/resnet18-f37072fd.pth",
        "embed.weights=~/resnet18.pth",
        "embed.weights=weights.pt",
        "embed.image_size=auto",
    ],
)
def test_devices_and_weights_torch_accepts_pass(pair: str) -> None:
    key, _, value = pair.partition("=")
    assert parse_settings([pair]) == {key: value}


def test_image_size_is_auto_or_pixels_whether_written_or_given() -> None:
    # A hand-written `image_size: 224` and `image_size=224` on the command line agree:
    # both are the number 224 in params.yaml.
    assert check_value("embed.image_size", 224) == 224
    assert parse_settings(["embed.image_size=224"]) == {"embed.image_size": 224}
    assert parse_settings(["embed.image_size=96"]) == {"embed.image_size": 96}
    assert check_value("embed.image_size", "auto") == "auto"
    with pytest.raises(InputError, match=r"embed\.image_size must be auto or a whole number"):
        check_value("embed.image_size", 8)


def test_a_weights_path_is_a_path_to_the_model_code_too() -> None:
    from datapool.embedding.model import is_weights_path

    for value in ("/models/resnet18-f37072fd.pth", "~/r.pth", "weights.pt", "a/b"):
        assert is_weights_path(value)
        assert check_value("embed.weights", value) == value
    for value in ("DEFAULT", "ResNet18_Weights.IMAGENET1K_V1", "auto", "none"):
        assert not is_weights_path(value)


def test_every_accepted_device_type_is_one_torch_knows() -> None:
    import torch

    for kind in DEVICE_TYPES:
        assert torch.device(f"{kind}:0").type == kind


def test_a_hand_written_numeric_pool_name_is_that_text() -> None:
    # `name: 2024` in params.yaml is a YAML int; the pool is the folder pools/2024.
    params = load_params((ROOT / "params.yaml").read_text().replace("my_datapool", "2024"))
    assert check_params(params, source="params.yaml").name == "2024"


def test_params_are_read_as_yaml_1_2_like_dvc_reads_them() -> None:
    # PyYAML (YAML 1.1) reads 1e-4 as the text '1e-4'; DVC and ruamel read a number.
    text = (ROOT / "params.yaml").read_text()
    text = re.sub(r"learning_rate: \S+", "learning_rate: 1e-4", text)
    params = load_params(text)
    assert params["embed"]["learning_rate"] == 1e-4
    check_params(params, source="params.yaml")
    assert load_params("a: on\nb: 1e-05\n") == {"a": "on", "b": 1e-05}


def test_a_params_text_that_is_not_yaml_is_refused() -> None:
    with pytest.raises(InputError, match=r"params\.yaml is not valid YAML"):
        load_params("a: [1\n")


def test_flatten_gives_dotted_keys() -> None:
    nested = {"a": {"b": 1, "c": {"d": None}}, "e": [1]}
    assert flatten(nested) == {"a.b": 1, "a.c.d": None, "e": [1]}


@pytest.mark.parametrize("name", ["my_datapool", "my pool", "données", "a+b", "a.dvc"])
def test_existing_pools_with_names_from_before_the_strict_rule_stay_usable(name: str) -> None:
    assert check_existing_pool_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../x", "a\0b"])
def test_existing_pool_names_that_leave_pools_are_refused(name: str) -> None:
    with pytest.raises(InputError, match="is not a usable pool name"):
        check_existing_pool_name(name)


def _with_selection(**selection: object) -> dict[str, object]:
    params: dict[str, Any] = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["selection"].update(selection)
    return params


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        ({"strategies": [{"strategy": "novelty"}]}, "strategy must be one of diversity"),
        (
            {
                "strategies": [
                    {"strategy": "threshold", "column": "s", "operation": "=", "value": 1}
                ],
                "scores_file": "s.csv",
            },
            "operation must be one of < <= > >=",
        ),
        ({"strategies": [{"strategy": "typicality", "k": 0}]}, "k must be an integer >= 1"),
        ({"strategies": [{"strategy": "diversity", "strength": "x"}]}, "strength must be a"),
        ({"strategies": "diversity"}, "selection.strategies must be a list"),
        ({"strategies": [{"strategy": "weights", "column": "u"}]}, "reads selection.scores_file"),
        ({"strategies": [{"strategy": "similarity"}]}, "reads selection.query_dir"),
        (
            {"strategies": [{"strategy": "balance", "target": {"a": 0.5, "b": 0.6}}]},
            "proportions must sum to 1",
        ),
        ({"seed": -1}, "selection.seed must be a whole number >= 0"),
        ({"scores_file": "it's.csv"}, "cannot carry"),
    ],
)
def test_bad_selection_settings_are_refused_before_any_stage(
    selection: dict[str, object], message: str
) -> None:
    params = _with_selection(**selection)
    with pytest.raises(InputError, match=re.escape(message)):
        check_params(params, source="ws/params.yaml")
    with pytest.raises(InputError, match=re.escape(message)):
        check_selection(params, source="ws/params.yaml")


def test_select_inputs_refuses_a_selection_key_it_does_not_know() -> None:
    # check_params leaves unknown keys to the workspace's own dvc.yaml; the stage
    # reading the block knows every key it takes.
    with pytest.raises(InputError, match=r"unknown setting 'selection\.colour'"):
        check_selection(_with_selection(colour="red"), source="ws/params.yaml")


def test_a_good_selection_passes_and_is_returned_checked() -> None:
    entries = [
        {"strategy": "diversity", "strength": 1},
        {"strategy": "typicality", "strength": 0.5, "k": 5},
        {"strategy": "threshold", "column": "sharp", "operation": ">=", "value": 0.3},
    ]
    params = _with_selection(strategies=entries, scores_file="scores.csv")
    check_params(params, source="params.yaml")
    checked = check_selection(params, source="params.yaml")
    assert checked["strategies"] == entries and checked["scores_file"] == "scores.csv"
    assert check_selection({}, source="p") == {}
    assert strategies_summary(entries) == (
        "diversity^1, typicality(k=5)^0.5, threshold(sharp >= 0.3)"
    )
    assert strategies_summary([]) == strategies_summary(None) == "diversity"
    herding = [{"strategy": "herding", "radius": 1.065, "bandwidth": 0.3}]
    assert strategies_summary(herding) == "herding(radius=1.065, bandwidth=0.3)"


def test_n_samples_and_proportion_samples_are_exclusive() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["stopping_condition"].update(n_samples=10, proportion_samples=0.2)
    with pytest.raises(InputError, match="not both"):
        check_params(params, source="ws/params.yaml")
    params["stopping_condition"].update(n_samples=0)
    check_params(params, source="ws/params.yaml")  # a proportion alone stops selection
    with pytest.raises(InputError, match="proportion_samples must be a number in"):
        parse_settings(["stopping_condition.proportion_samples=1.5"])
    parsed = parse_settings(["selection.strategies=[{strategy: typicality, k: 3}]"])
    assert parsed == {"selection.strategies": [{"strategy": "typicality", "k": 3}]}


def test_distributed_settings_are_checked_up_front() -> None:
    assert check_value("distributed.nproc", 4) == 4
    assert check_value("distributed.rdzv_endpoint", "node0.lan:29400") == "node0.lan:29400"
    assert check_value("distributed.rdzv_endpoint", "") == ""
    with pytest.raises(InputError, match=r"distributed\.nproc"):
        check_value("distributed.nproc", 0)
    with pytest.raises(InputError, match="host:port"):
        check_value("distributed.rdzv_endpoint", "node0 29400")
