"""Checks of the ``method`` and ``problem.overrides`` params before any model loads.

Every value must fit its hyperparameter field (:func:`locedit.editing.hparams.field_problems`),
and a ``--set`` override that a more specific key shadows for the run's methods and problems
(``method.<m>`` < ``method.per_model.<model>.<m>`` < ``problem.overrides.<problem>.<m>``,
:meth:`~locedit.editing.methods.EditMethod.hparams_from`) is refused when it takes effect
nowhere and reported with the winning key when it takes effect for some problems only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from locedit.editing.hparams import plain
from locedit.editing.methods import REGISTRY, get_method

log = logging.getLogger(__name__)


def method_problems(config: Mapping[str, Any]) -> list[str]:
    """Why the hyperparameters of any known method cannot be built from ``config`` (the whole
    composed params), for no problem and for every problem with overrides; one entry per reason."""
    config = plain(config)
    if not isinstance(config, Mapping):
        return []
    problems = [None, *((config.get("problem") or {}).get("overrides") or {})]
    out: list[str] = []
    for method in REGISTRY:
        for problem in problems:
            try:
                get_method(method).hparams_from(config, problem)
            except ValueError as err:
                reason = str(err).removeprefix("invalid hyperparameters: ")
                if reason not in out:
                    out.append(reason)
    return out


def leaf_keys(key: str, value: Any) -> list[str]:
    """The dotted keys an override ``key=value`` sets: ``method.memit={v_lr: 0.3}`` sets
    ``method.memit.v_lr`` (the rest of the section is untouched)."""
    if isinstance(value, Mapping) and value:
        return [leaf for name, v in value.items() for leaf in leaf_keys(f"{key}.{name}", v)]
    return [key]


def _winner(sources: list[tuple[str, dict]], prefix: str, field: str) -> str | None:
    """The key that sets ``field`` last among ``sources``, or None when ``prefix`` is not one
    of them (the key does not feed this method)."""
    prefixes = [p for p, _ in sources]
    if prefix not in prefixes:
        return None
    winner = None
    for p, values in sources:
        if field in values:
            winner = f"{p}.{field}" if p else field
    return winner


def _shadowed(
    config: Mapping[str, Any], leaf: str, methods: Sequence[str], problems: Sequence[str | None]
) -> tuple[int, dict[str, list[str]]]:
    """How many (method, problem) pairs ``leaf`` feeds, and per winning key the pairs where a
    more specific key sets the same field."""
    prefix, _, field = leaf.rpartition(".")
    fed, shadowed = 0, {}
    for method in methods:
        for problem in problems:
            winner = _winner(get_method(method).config_sources(config, problem), prefix, field)
            if winner is None:
                continue
            fed += 1
            if winner != leaf:
                shadowed.setdefault(winner, []).append(f"{method}/{problem or 'no problem'}")
    return fed, shadowed


def check_shadowing(
    config: Mapping[str, Any],
    keys: Iterable[str],
    methods: Sequence[str],
    problems: Sequence[str | None],
) -> None:
    """Refuse overridden leaf ``keys`` (:func:`leaf_keys`) that a more specific key shadows for
    every (method, problem) of the run they feed, in one line naming the winning keys; log the
    partly shadowed ones."""
    config = plain(config)
    refused, partial = [], []
    for leaf in keys:
        if not leaf.startswith(("method.", "problem.overrides.")):
            continue
        if leaf.startswith("problem.overrides.") and list(problems) == [None]:
            refused.append(f"{leaf} has no effect: this command edits without a problem")
            continue
        fed, shadowed = _shadowed(config, leaf, methods, problems)
        if not shadowed:
            continue
        wins = "; ".join(f"{w} wins for {', '.join(where)}" for w, where in shadowed.items())
        if sum(len(where) for where in shadowed.values()) == fed:
            refused.append(f"{leaf} has no effect: {wins} (set that key instead)")
        else:
            partial.append(f"{leaf} is shadowed where {wins}")
    for line in partial:
        log.warning("override %s", line)
    if refused:
        raise ValueError("override refused: " + "; ".join(refused))
