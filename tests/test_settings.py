"""Settings are checked before any stage runs: known keys, types, ranges, safe text."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datapool.errors import InputError
from datapool.settings import SETTINGS, check_params, check_pool_name, parse_settings

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
        ("embed.device=gpu", "embed.device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("embed.weights=x;rm", "embed.weights must be a torchvision weights name"),
        ("embed.embedding_dim=0", "embed.embedding_dim must be a whole number >= 1, got 0"),
        ("embed.image_size=8", "embed.image_size must be a whole number >= 16, got 8"),
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
    params["datapool"]["name"] = 7  # a number where the file must hold text
    with pytest.raises(InputError, match=r"datapool.name must be text, got 7"):
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
