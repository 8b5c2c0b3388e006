"""The ``selection.strategies`` settings: parsed and checked without torch.

:mod:`datapool.strategies` runs them (and documents the combination); this
module only turns ``params.yaml`` entries into :class:`StrategyConfig` values,
so checking settings (``datapool run``, the ``select_inputs`` stage) does not
import torch (seconds) just to read a list.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from datapool.errors import InputError

__all__ = [
    "KINDS",
    "OPERATIONS",
    "StrategyConfig",
    "describe",
    "is_plain_diversity",
    "parse_strategies",
]

KINDS = ("diversity", "typicality", "weights", "threshold", "balance", "similarity", "herding")
OPERATIONS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}
_SUM_TOLERANCE = 1e-6  # explicit balance proportions must sum to 1 within this


@dataclass(frozen=True)
class StrategyConfig:
    """One strategy as configured (``selection.strategies`` in params.yaml).

    Attributes:
        strategy: one of :data:`KINDS`.
        strength: exponent of the objective (not used by ``threshold``).
        column: score-file column (``weights``, ``threshold``; ``balance``:
            ``""`` means the weak labels).
        operation: ``threshold`` only, one of :data:`OPERATIONS`.
        value: ``threshold`` only.
        target: ``balance`` only: ``"uniform"``, ``"input"`` or label -> proportion.
        k: ``typicality`` only: neighbours per candidate.
        guard: ``diversity`` only, in [0, 1]: the *radius guard*. When > 0, a
            pick is chosen only among the candidates at least ``guard`` times as
            far from the pool and earlier picks as the farthest candidate that
            could be picked, so the coverage radius tracks greedy k-center's
            while the other objectives choose among the far candidates; 0 is off.
        radius: ``herding`` only, >= 1: the coverage radius allowed, as a
            multiple of plain k-center's for the same budget (:mod:`datapool.herding`).
        bandwidth: ``herding`` only, > 0: the kernel's sigma as a multiple of
            that radius.
    """

    strategy: str
    strength: float = 1.0
    column: str = ""
    operation: str = ""
    value: float = math.nan
    target: str | Mapping[str, float] = "uniform"
    k: int = 20
    guard: float = 0.0
    radius: float = 1.065
    bandwidth: float = 0.3

    @property
    def name(self) -> str:
        """Key of its objective in results: ``"weights:uncertainty"``, ``"typicality"``..."""
        if self.strategy in ("weights", "threshold"):
            return f"{self.strategy}:{self.column}"
        if self.strategy == "balance":
            return f"balance:{self.column or 'labels'}"
        return self.strategy


_KEYS = {
    "diversity": {"strength", "guard"},
    "typicality": {"strength", "k"},
    "weights": {"strength", "column"},
    "threshold": {"column", "operation", "value"},
    "balance": {"strength", "column", "target"},
    "similarity": {"strength"},
    "herding": {"radius", "bandwidth"},
}


def _number(raw: Any, what: str) -> float:
    """``raw`` as a finite float, else InputError naming ``what``."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise InputError(f"{what} must be a finite number, got {raw!r}")
    return float(raw)


def _target(raw: Any, where: str) -> str | dict[str, float]:
    """A balance target: ``uniform``, ``input`` or proportions summing to 1."""
    if raw in ("uniform", "input"):
        return str(raw)
    if not isinstance(raw, Mapping) or not raw:
        raise InputError(f"{where}.target must be uniform, input or label: proportion, got {raw!r}")
    out = {str(k): _number(v, f"{where}.target[{k!r}]") for k, v in raw.items()}
    if any(v < 0 for v in out.values()):
        raise InputError(f"{where}.target: proportions must be >= 0, got {out}")
    total = sum(out.values())
    if abs(total - 1) > _SUM_TOLERANCE:
        raise InputError(f"{where}.target: proportions must sum to 1, they sum to {total:g}")
    return out


def _parse_one(raw: Mapping[str, Any], where: str) -> StrategyConfig:
    """One entry of ``selection.strategies``; InputError naming ``where`` and the key at fault."""
    kind = raw.get("strategy")
    if kind not in _KEYS:
        raise InputError(f"{where}.strategy must be one of {', '.join(KINDS)}, got {kind!r}")
    extra = set(raw) - _KEYS[kind] - {"strategy"}
    if extra:
        raise InputError(f"{where}: {kind} takes no {', '.join(sorted(extra))}")
    strength = _number(raw.get("strength", 1.0), f"{where}.strength")
    column = raw.get("column", "")
    if kind in ("weights", "threshold") and (not isinstance(column, str) or not column):
        raise InputError(f"{where}: {kind} needs column (a column of the score file)")
    if not isinstance(column, str):
        raise InputError(f"{where}.column must be a column name, got {column!r}")
    cfg = StrategyConfig(str(kind), strength, column)
    if kind == "threshold":
        op = raw.get("operation")
        if op not in OPERATIONS:
            raise InputError(f"{where}.operation must be one of < <= > >=, got {op!r}")
        cfg = StrategyConfig(
            kind, 1.0, column, str(op), _number(raw.get("value"), f"{where}.value")
        )
    if kind == "balance":
        cfg = StrategyConfig(
            kind, strength, column, target=_target(raw.get("target", "uniform"), where)
        )
    if kind == "diversity":
        guard = _number(raw.get("guard", 0.0), f"{where}.guard")
        if not 0 <= guard <= 1:
            raise InputError(
                f"{where}.guard must be in [0, 1] (a share of the farthest distance; 0 = off), "
                f"got {guard:g}"
            )
        cfg = StrategyConfig(kind, strength, guard=guard)
    if kind == "typicality":
        k = raw.get("k", 20)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"{where}.k must be an integer >= 1, got {k!r}")
        cfg = StrategyConfig(kind, strength, k=k)
    if kind == "herding":
        cfg = _herding(raw, where)
    return cfg


def _herding(raw: Mapping[str, Any], where: str) -> StrategyConfig:
    """A HERDING entry: ``radius >= 1`` and ``bandwidth > 0`` (defaults 1.065, 0.3)."""
    radius = _number(raw.get("radius", 1.065), f"{where}.radius")
    if radius < 1:
        raise InputError(
            f"{where}.radius must be >= 1 (a multiple of plain k-center's coverage radius), "
            f"got {radius:g}"
        )
    bandwidth = _number(raw.get("bandwidth", 0.3), f"{where}.bandwidth")
    if bandwidth <= 0:
        raise InputError(
            f"{where}.bandwidth must be > 0 (the kernel's width as a multiple of the "
            f"coverage radius), got {bandwidth:g}"
        )
    return StrategyConfig("herding", radius=radius, bandwidth=bandwidth)


def parse_strategies(raw: Sequence[Mapping[str, Any]] | None) -> tuple[StrategyConfig, ...]:
    """Validate ``selection.strategies`` (a list of mappings; None or [] = plain diversity).

    Raises InputError for an unknown strategy or key, a non-finite strength,
    a threshold without column/operation/value, a bad balance target, a herding
    radius < 1 or bandwidth <= 0, herding beside anything but thresholds, or two
    entries with the same :attr:`StrategyConfig.name`.
    """
    if raw is None:
        return ()
    if isinstance(raw, str | bytes | Mapping) or not isinstance(raw, Sequence):
        raise InputError(f"selection.strategies must be a list, got {raw!r}")
    out = []
    for i, entry in enumerate(raw):
        where = f"selection.strategies[{i}]"
        if not isinstance(entry, Mapping):
            raise InputError(f"{where} must be a mapping with a strategy key, got {entry!r}")
        out.append(_parse_one(entry, where))
    names = [c.name for c in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(f"selection.strategies: {twice[0]} is configured twice")
    others = [c.strategy for c in out if c.strategy not in ("herding", "threshold")]
    if others and any(c.strategy == "herding" for c in out):
        # herding is its own selection rule, not a factor of the combination loop's product
        raise InputError(
            f"selection.strategies: herding combines only with threshold, not with {others[0]}"
        )
    return tuple(out)


def is_plain_diversity(configs: Sequence[StrategyConfig]) -> bool:
    """True when the picks are greedy k-center's: no strategy, or one positive
    DIVERSITY, beside any THRESHOLDs (these only narrow the candidates).

    A guard changes nothing then: the farthest candidate, which plain diversity
    picks, always passes it."""
    rest = [c for c in configs if c.strategy != "threshold"]
    return not rest or (len(rest) == 1 and rest[0].strategy == "diversity" and rest[0].strength > 0)


def describe(configs: Sequence[StrategyConfig]) -> dict[str, dict[str, Any]]:
    """The strategies as a plain dict for a version's metadata: name -> settings.

    An empty configuration is plain diversity, strength 1.
    """
    if not configs:
        return {"diversity": {"strategy": "diversity", "strength": 1.0}}
    out: dict[str, dict[str, Any]] = {}
    for c in configs:
        entry: dict[str, Any] = {"strategy": c.strategy}
        if c.strategy == "threshold":
            entry |= {"column": c.column, "operation": c.operation, "value": c.value}
        else:
            entry["strength"] = c.strength
        if c.strategy in ("weights", "balance"):
            entry["column"] = c.column
        if c.strategy == "balance":
            entry["target"] = c.target if isinstance(c.target, str) else dict(c.target)
        if c.strategy == "typicality":
            entry["k"] = c.k
        if c.strategy == "herding":
            entry = {"strategy": c.strategy, "radius": c.radius, "bandwidth": c.bandwidth}
        if c.guard:  # absent when off: versions recorded before the guard read the same
            entry["guard"] = c.guard
        out[c.name] = entry
    return out
