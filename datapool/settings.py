"""The pipeline's settings (params.yaml): every key with its type and range, checked up front.

``datapool run`` and the container check each ``KEY=VALUE`` and then the whole
params file before any stage runs, so a typo or an out-of-range value is refused
with the key and value named instead of failing minutes later inside a stage (or
not at all). Text values also end up in the shell commands DVC runs: dvc.yaml
single-quotes every value, and these rules refuse the characters single quotes
cannot carry (``'``, ``\\`` for fish, control characters). Pool names become
folder names, so they are plain names: :func:`check_pool_name`.

Nothing here imports torch, typer or dvc; ``tests/test_settings.py`` keeps the
lists of models and precisions in step with :mod:`datapool.embedding.model`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datapool.errors import InputError
from datapool.launch import RENDEZVOUS
from datapool.strategy_config import parse_strategies

POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# A torchvision weights name, alone (DEFAULT) or with its enum (ResNet18_Weights.IMAGENET1K_V1).
WEIGHTS_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
# auto, or a torch device type with an optional index; tests/test_settings.py checks
# that torch knows each type. A typo (gpu) is refused here rather than inside embed.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "mtia")
DEVICE = re.compile(rf"auto|({'|'.join(DEVICE_TYPES)})(:[0-9]+)?")
# Characters a single-quoted shell word cannot carry verbatim: the quote itself,
# the backslash (an escape inside quotes in fish, a shell DVC supports), control codes.
UNQUOTABLE = re.compile(r"['\\\x00-\x1f\x7f]")


def check_pool_name(name: str) -> str:
    """Return ``name`` if it is a usable pool name: a plain folder name of letters,
    digits, ``.``, ``_`` and ``-`` starting with a letter or digit, at most 100
    characters, not ending in ``.dvc`` (that is where a parked pool's record lives).

    Raises :class:`InputError` otherwise.
    """
    if not POOL_NAME.fullmatch(name) or name.endswith(".dvc"):
        raise InputError(
            f"{name!r} is not a usable pool name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit (at most 100 characters, not ending in .dvc)"
        )
    return name


def check_existing_pool_name(name: str) -> str:
    """Return ``name`` if it can only name a folder inside ``pools/``: not empty, no
    ``/``, no NUL, not starting with ``.`` (so not ``..``).

    For commands that read or restore a pool that already exists: before
    :func:`check_pool_name`, import and combine accepted any such name
    (``my pool``, ``données``), and those pools stay usable. New names get the
    strict rule. Raises :class:`InputError` otherwise.
    """
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise InputError(
            f"{name!r} is not a usable pool name: a pool is a folder of pools/ "
            "(no '/', not starting with '.')"
        )
    return name


def load_params(text: str) -> Any:
    """A params.yaml text as plain Python data, read as YAML 1.2 like DVC and ruamel
    (which writes params.yaml) read it: ``1e-05`` is a number, not the text PyYAML's
    YAML 1.1 makes of it. Every reader of params.yaml goes through here.

    Raises :class:`InputError` naming the parser's complaint for text that is not YAML.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        return YAML(typ="safe").load(text)
    except YAMLError as err:
        raise InputError(f"params.yaml is not valid YAML: {err}") from None


def flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{dotted key: leaf value}``: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What one setting accepts.

    Attributes:
        kind: ``bool``, ``int``, ``float``, ``str`` or ``list`` (checked by ``check`` alone).
        low, high: inclusive bounds for numbers (None = unbounded).
        above: exclusive lower bound instead of ``low`` (``learning_rate > 0``).
        choices: the allowed texts, when there is a fixed list.
        check: for other texts (or a list), returns the problem or None.
        whole_numbers_as_text: a whole number is taken as its text (a hand-written
            ``name: 2024`` is the pool ``"2024"``, as datapool always read it).
        digits_as_number: once checked, a text of digits is stored as the number
            (``image_size=64`` is written to params.yaml as ``64``, as a hand-written
            value is, so ``dvc params diff`` never shows ``'64'`` against ``64``).
    """

    kind: type
    low: float | None = None
    high: float | None = None
    above: float | None = None
    choices: tuple[str, ...] = ()
    check: Callable[[Any], str | None] | None = None
    whole_numbers_as_text: bool = False
    digits_as_number: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable (the text after the key), or None."""
        if self.kind is bool:
            return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
        if self.kind is list:
            return None if self.check is None else self.check(value)
        if self.kind is str:
            return self._text_problem(value)
        return self._number_problem(value)

    def _number_problem(self, value: Any) -> str | None:
        whole = self.kind is int
        if whole:
            ok = _number(value) and float(value).is_integer()
            what = "a whole number"
        else:
            ok = _number(value) and math.isfinite(value)
            what = "a number"
        if ok and self.low is not None and value < self.low:
            ok = False
        if ok and self.high is not None and value > self.high:
            ok = False
        if ok and self.above is not None and value <= self.above:
            ok = False
        if ok:
            return None
        if self.above is not None:
            bounds = f"> {self.above:g}"
        elif self.high is not None:
            bounds = f"in [{self.low:g}, {self.high:g}]"
        else:
            bounds = f">= {self.low:g}"
        return f"must be {what} {bounds}, got {value!r}"

    def _text_problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return f"must be text, got {value!r}"
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(self.choices)}, got {value!r}"
        if self.check is not None:
            return self.check(value)
        return None


def _input_dir(value: str) -> str | None:
    if not value:
        return "must not be empty"
    if UNQUOTABLE.search(value):
        return (
            f"{value!r} holds a character the pipeline's shell commands cannot carry "
            "(', \\ or a control character); rename the folder or link to it from a "
            "path without one"
        )
    return None


def _optional_path(value: str) -> str | None:
    """A selection input (file or folder): empty = off, else a path a shell word can carry."""
    if UNQUOTABLE.search(value):
        return (
            f"{value!r} holds a character the pipeline cannot carry "
            "(', \\ or a control character); rename it or link to it from a path without one"
        )
    return None


def _strategies(value: Any) -> str | None:
    """``selection.strategies``, checked by :func:`datapool.strategy_config.parse_strategies`
    (torch-free, so checking settings stays fast)."""
    if value is None or (isinstance(value, list) and not value):
        return None
    try:
        parse_strategies(value)
    except InputError as err:
        return f"is not usable: {err}"
    return None


def _pool_name(value: str) -> str | None:
    try:
        check_pool_name(value)
    except InputError as err:
        return str(err)
    return None


def _weights(value: str) -> str | None:
    """auto, none, a torchvision weights name, or a weights file's path (a ``/``, a
    leading ``~`` or a .pth/.pt ending: the rule of ``embedding.model.is_weights_path``)."""
    is_path = "/" in value or value.startswith("~") or value.lower().endswith((".pth", ".pt"))
    if is_path and not UNQUOTABLE.search(value):
        return None
    if not is_path and WEIGHTS_NAME.fullmatch(value):
        return None
    return (
        "must be auto, none, a torchvision weights name (e.g. DEFAULT) or the path of a "
        f"weights file (.pth, without ', \\ or control characters), got {value!r}"
    )


def _image_size(value: str) -> str | None:
    """auto (follows the images), or a whole number of pixels >= 16."""
    if value == "auto" or (value.isdigit() and int(value) >= 16):
        return None
    return f"must be auto or a whole number >= 16, got {value!r}"


def _device(value: str) -> str | None:
    if DEVICE.fullmatch(value):
        return None
    kinds = ", ".join(DEVICE_TYPES)
    return f"must be auto or a torch device ({kinds}, optionally :N), got {value!r}"


def _endpoint(value: str) -> str | None:
    if not value or RENDEZVOUS.fullmatch(value):
        return None
    return f"must be empty or host:port (the first machine's address), got {value!r}"


SETTINGS: dict[str, Rule] = {
    "input_dir": Rule(str, check=_input_dir),
    "datapool.name": Rule(str, check=_pool_name, whole_numbers_as_text=True),
    "datapool.keep_history": Rule(bool),
    "datapool.csv_max_rows": Rule(int, low=0),
    "stopping_condition.n_samples": Rule(int, low=0),
    # A share of the new candidates instead of a count (Lightly's proportion_samples).
    "stopping_condition.proportion_samples": Rule(float, low=0, high=1),
    # Embeddings are unit vectors: no two are farther apart than 2.
    "stopping_condition.min_distance": Rule(float, low=0, high=2),
    # Selection strategies and their inputs (issue 11, datapool.strategies).
    "selection.strategies": Rule(list, check=_strategies),
    "selection.scores_file": Rule(str, check=_optional_path),
    "selection.relevant_filenames_file": Rule(str, check=_optional_path),
    "selection.masked_file": Rule(str, check=_optional_path),
    "selection.selected_file": Rule(str, check=_optional_path),
    "selection.query_dir": Rule(str, check=_optional_path),
    "selection.seed": Rule(int, low=0),
    "append_weak_labels": Rule(bool),
    # Processes and machines sharing a stage's work (issue 14, datapool.launch).
    "distributed.nproc": Rule(int, low=1),
    "distributed.nnodes": Rule(int, low=1),
    "distributed.rdzv_endpoint": Rule(str, check=_endpoint),
    "embed.model": Rule(str, choices=("mobilenet_v3_small", "resnet18", "resnet34", "resnet50")),
    "embed.weights": Rule(str, check=_weights),
    "embed.embedding_dim": Rule(int, low=1),
    # auto, or pixels: stored as text so a hand-written 224 and `image_size=224` agree.
    "embed.image_size": Rule(
        str, check=_image_size, whole_numbers_as_text=True, digits_as_number=True
    ),
    "embed.batch_size": Rule(int, low=1),
    "embed.num_workers": Rule(int, low=0),
    "embed.device": Rule(str, check=_device),
    "embed.precision": Rule(str, choices=("fp32", "bf16")),
    "embed.seed": Rule(int, low=0),
    "embed.bootstrap_epochs": Rule(int, low=0),
    "embed.train_epochs": Rule(int, low=0),
    # Contrastive training needs another image in the batch as a negative.
    "embed.train_batch_size": Rule(int, low=2),
    "embed.learning_rate": Rule(float, above=0),
}
REQUIRED = ("input_dir", "datapool.name")


def check_value(key: str, value: Any) -> Any:
    """``value`` for setting ``key``, checked (whole floats become ints, a whole number
    becomes text, or digits a number, where the setting says so).

    Raises :class:`InputError` naming the key and value, or listing the known keys.
    """
    rule = SETTINGS.get(key)
    if rule is None:
        raise InputError(f"unknown setting {key!r}; known: {', '.join(SETTINGS)}")
    if rule.whole_numbers_as_text and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    problem = rule.problem(value)
    if problem is not None:
        raise InputError(f"{key} {problem}")
    if rule.kind is int:
        return int(value)
    if rule.kind is float:
        return float(value)
    if rule.digits_as_number and isinstance(value, str) and value.isdigit():
        return int(value)
    return value


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """``["a.b=0.1", ...]`` -> ``{"a.b": 0.1, ...}``, each value read as its setting's type.

    Text settings take the text verbatim (``datapool.name=2024`` is the name
    ``"2024"``); the others are read as YAML scalars (``true``, ``1e3``, ``.nan``).
    Raises :class:`InputError` for an item without ``=``, an unknown key, or a bad value.
    """
    from ruamel.yaml import YAML

    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InputError(f"expected KEY=VALUE, got {pair!r}")
        rule = SETTINGS.get(key)
        if rule is None or rule.kind is str:
            value: Any = text
        else:
            value = YAML(typ="safe").load(text) if text.strip() else ""
        parsed[key] = check_value(key, value)
    return parsed


@dataclass(frozen=True)
class RunSettings:
    """What a run needs to know of the checked params: pool, input folder, history."""

    name: str
    input_dir: str
    keep_history: bool


def _check_stop(flat: Mapping[str, Any], source: str) -> None:
    """At most one of n_samples / proportion_samples, and some rule that stops selection."""
    n_samples = flat.get("stopping_condition.n_samples", 0)
    proportion = flat.get("stopping_condition.proportion_samples", 0.0)
    min_distance = flat.get("stopping_condition.min_distance", 0.0)
    if n_samples and proportion:
        raise InputError(
            f"{source}: set stopping_condition.n_samples or stopping_condition.proportion_samples, "
            f"not both (got {n_samples} and {proportion}); set the other to 0"
        )
    if n_samples == 0 and proportion == 0 and min_distance == 0:
        raise InputError(
            f"{source}: set stopping_condition.n_samples > 0 (or proportion_samples > 0) or "
            "stopping_condition.min_distance > 0; with neither, selection would never stop"
        )


# Which selection input each strategy reads: it must be configured (settings names it).
_NEEDS = {
    "weights": "selection.scores_file",
    "threshold": "selection.scores_file",
    "similarity": "selection.query_dir",
}


def _check_selection(flat: Mapping[str, Any], source: str) -> None:
    """Each configured strategy's input file is set (a score column needs a score file,
    similarity a query folder); the values themselves were checked by their rules."""
    for i, entry in enumerate(flat.get("selection.strategies") or []):
        kind = entry.get("strategy")
        need = _NEEDS.get(kind)
        if kind == "balance" and entry.get("column"):
            need = "selection.scores_file"
        if need and not flat.get(need):
            raise InputError(
                f"{source}: selection.strategies[{i}] ({kind}) reads {need}, which is empty; "
                f"set {need}"
            )


def strategies_summary(entries: Any) -> str:
    """``selection.strategies`` (params entries, or the values of
    :func:`datapool.strategies.describe`) in a few words, for history and the report:
    ``"diversity^1, typicality(k=20)^0.5, threshold(score >= 0.3)"`` or
    ``"herding(radius=1.065, bandwidth=0.3)"``; ``[]`` or None is
    ``"diversity"`` (plain). Unreadable entries are shown as they are, never refused:
    this only displays what a version recorded.
    """
    if isinstance(entries, Mapping):
        entries = list(entries.values())
    if not entries:
        return "diversity"
    if not isinstance(entries, list):
        return repr(entries)
    words = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            words.append(repr(entry))
            continue
        kind = str(entry.get("strategy", "?"))
        if kind == "threshold":
            op, value = entry.get("operation", "?"), entry.get("value", "?")
            words.append(f"threshold({entry.get('column', '?')} {op} {value})")
            continue
        if kind == "herding":  # a rule of its own, no strength (datapool.herding)
            shown = [f"{key}={entry[key]}" for key in ("radius", "bandwidth") if key in entry]
            words.append(f"herding({', '.join(shown)})" if shown else "herding")
            continue
        detail = [f"k={entry['k']}"] if "k" in entry else []
        if entry.get("guard"):
            detail.append(f"guard={entry['guard']:g}")
        if kind in ("weights", "balance"):
            detail.append(str(entry.get("column") or "labels"))
        if kind == "balance":
            detail.append(str(entry.get("target", "uniform")))
        inner = f"({', '.join(detail)})" if detail else ""
        words.append(f"{kind}{inner}^{entry.get('strength', 1.0):g}")
    return ", ".join(words)


def check_selection(params: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """The ``selection`` block of a params mapping, checked: ``{key: value}`` without the
    ``selection.`` prefix (absent keys left out; an absent block is plain diversity).

    What the pipeline's ``select_inputs`` stage runs on the block it declares, so a
    params file edited by hand or by ``dvc exp run -S`` is checked as ``datapool run``
    checks it. Raises :class:`InputError` prefixed by ``source``.
    """
    block = params.get("selection") or {}
    if not isinstance(block, Mapping):
        raise InputError(f"{source}: selection must map settings to values, got {block!r}")
    flat = flatten(block, "selection.")
    try:
        for key, value in flat.items():
            flat[key] = check_value(key, value)
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    _check_selection(flat, source)
    return {key.removeprefix("selection."): value for key, value in flat.items()}


def check_params(params: Mapping[str, Any], *, source: str) -> RunSettings:
    """Check every known setting present in a params mapping, and the pair of stopping conditions.

    Keys this version does not know are left alone (the workspace's own dvc.yaml
    decides what it reads). Raises :class:`InputError` prefixed by ``source``
    (the file), naming the key and value.
    """
    flat = flatten(params)
    for key in REQUIRED:
        if key not in flat:
            raise InputError(f"{source} lacks {key}")
    try:
        for key, value in flat.items():
            if key in SETTINGS:
                flat[key] = check_value(key, value)
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    _check_stop(flat, source)
    _check_selection(flat, source)
    return RunSettings(
        name=flat["datapool.name"],
        input_dir=flat["input_dir"],
        keep_history=bool(flat.get("datapool.keep_history", True)),
    )
