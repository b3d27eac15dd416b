"""Routing hooks: which adapter(s) answer a request (spec SW-SERVE-8..10).

A request names a task or adapter in its JSON `adapter` field, else in the `X-Task-Type` header,
else a user **classifier** `body -> name | None` picks one, else the base model answers. The
name is then looked up:

- an **A/B split** (`summarize=summ_v1:0.9,summ_v2:0.1`) picks one arm from a hash of the
  request id: the same id always gets the same arm, and the choice is recorded in the response;
- a **fallback chain** (`code=code_v2,code_v1,base`) tries adapters in order until a
  **confidence** function `(body, result) -> float` reaches `min_confidence` (default:
  the mean log-probability of the generated tokens);
- otherwise the name is the adapter itself (`base` or null: the base model).

Example:
    >>> hooks = RoutingHooks(splits=[parse_split("t=a:0.5,b:0.5")])
    >>> plan = hooks.plan({"adapter": "t"}, header=None, request_id="r1")
    >>> plan.chain in (("a",), ("b",)), plan.route["split"]["task"]
    (True, 't')
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

from ..errors import ConfigError
from .registry import BASE
from .security import decode_header_name

__all__ = [
    "Plan",
    "RoutingHooks",
    "Split",
    "mean_logprob",
    "parse_fallback",
    "parse_split",
    "split_point",
]

Classifier = Callable[[Mapping[str, Any]], "str | None"]
#: `(body, result) -> float`; `result` has `.logprobs` (an engine `Result`, an `Attempt`).
Confidence = Callable[[Mapping[str, Any], Any], float]


def split_point(request_id: str, task: str) -> float:
    """A number in [0, 1) fixed by `(task, request_id)`: sha256, first 8 bytes."""
    digest = hashlib.sha256(f"{task}\0{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


@dataclasses.dataclass(frozen=True)
class Split:
    """An A/B split of `task` over `arms` (`(adapter, weight)`, weights summing to 1)."""

    task: str
    arms: tuple[tuple[str, float], ...]

    def choose(self, request_id: str) -> tuple[str, float]:
        """`(adapter, point)`: the arm whose cumulative weight interval holds the point."""
        point = split_point(request_id, self.task)
        edge = 0.0
        for adapter, weight in self.arms:
            edge += weight
            if point < edge:
                return adapter, point
        return self.arms[-1][0], point


def _task_and_items(text: str, flag: str, example: str) -> tuple[str, list[str]]:
    task, sep, rest = text.partition("=")
    items = [s.strip() for s in rest.split(",")]
    if not sep or not task.strip() or not all(items):
        raise ConfigError(f"{flag} {text!r} is malformed; expected e.g. {example!r}.")
    return task.strip(), items


def parse_split(text: str) -> Split:
    """`"task=a:0.9,b:0.1"` -> `Split`; weights must be positive and sum to 1."""
    example = "summarize=summ_v1:0.9,summ_v2:0.1"
    task, items = _task_and_items(text, "--split", example)
    arms = []
    for item in items:
        name, _, weight = item.rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = math.nan
        if not name or not value > 0 or math.isinf(value):
            raise ConfigError(
                f"--split {text!r}: arm {item!r} needs NAME:WEIGHT with a positive weight, "
                f"e.g. {example!r}."
            )
        arms.append((name, value))
    total = sum(w for _, w in arms)
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"--split {text!r}: weights sum to {total}, not 1.")
    return Split(task, tuple(arms))


def parse_fallback(text: str) -> tuple[str, tuple[str, ...]]:
    """`"task=a,b,base"` -> `(task, ("a", "b", "base"))`."""
    task, items = _task_and_items(text, "--fallback", "code=code_v2,code_v1,base")
    return task, tuple(items)


def mean_logprob(body: Mapping[str, Any], result: Any) -> float:
    """The default confidence: mean log-probability of the generated tokens."""
    return sum(result.logprobs) / max(len(result.logprobs), 1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The adapters to try in order (`None` = base) and how they were chosen."""

    chain: tuple[str | None, ...]
    route: dict[str, Any]


def _adapter(name: str | None) -> str | None:
    return None if name is None or name == BASE else name


@dataclasses.dataclass(frozen=True)
class RoutingHooks:
    """Classifier, A/B splits and fallback chains of a server.

    Arguments:
        classifier: `body -> adapter/task name` (or None: base) for requests that name none.
        splits: A/B splits, by task.
        fallbacks: `(task, chain)` pairs; a chain lists adapter names (`base`: the base model).
        confidence: `(body, result) -> float`; the fallback stops at the first result whose
            confidence is >= `min_confidence`.
        min_confidence: the acceptance threshold.
    """

    classifier: Classifier | None = None
    splits: Iterable[Split] = ()
    fallbacks: Iterable[tuple[str, tuple[str, ...]]] = ()
    confidence: Confidence = mean_logprob
    min_confidence: float = -math.inf

    def __post_init__(self) -> None:
        splits = {s.task: s for s in self.splits}
        fallbacks = {t: tuple(c) for t, c in self.fallbacks}
        both = sorted(set(splits) & set(fallbacks))
        if both:
            raise ConfigError(f"task(s) {both} have both a --split and a --fallback; keep one.")
        object.__setattr__(self, "splits", splits)
        object.__setattr__(self, "fallbacks", fallbacks)

    def names(self) -> set[str]:
        """Every adapter name the splits and chains refer to."""
        arms = {a for s in self.split_map().values() for a, _ in s.arms}
        return (arms | {a for c in self.fallback_map().values() for a in c}) - {BASE}

    def split_map(self) -> Mapping[str, Split]:
        """The splits by task (`splits` after construction)."""
        return cast(Mapping[str, Split], self.splits)

    def fallback_map(self) -> Mapping[str, tuple[str, ...]]:
        """The fallback chains by task (`fallbacks` after construction)."""
        return cast(Mapping[str, tuple[str, ...]], self.fallbacks)

    def plan(self, body: Mapping[str, Any], header: str | None, request_id: str) -> Plan:
        """The chain of adapters for one request (names are checked by the caller)."""
        route: dict[str, Any] = {}
        if "adapter" in body:
            name, route["source"] = body["adapter"], "body"
        elif header:  # UTF-8, raw or RFC 8187 `UTF-8''%..` (SW-SEC-6)
            name, route["source"] = decode_header_name(header), "header"
        elif self.classifier is not None:
            name, route["source"] = self.classifier(body), "classifier"
        else:
            name, route["source"] = None, "default"
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"`adapter` must be a string or null, got {name!r}.")
        route["requested"] = name
        explicit = body.get("fallback")
        if explicit is not None:
            if not isinstance(explicit, list) or not explicit:
                raise ConfigError("`fallback` must be a non-empty list of adapter names.")
            if not all(isinstance(n, str | type(None)) for n in explicit):
                raise ConfigError("`fallback` must be a list of adapter names (or null).")
            return Plan(tuple(_adapter(n) for n in explicit), route | {"fallback": True})
        splits, fallbacks = self.split_map(), self.fallback_map()
        if name is not None and name in splits:
            arm, point = splits[name].choose(request_id)
            route["split"] = {"task": name, "adapter": arm, "point": point}
            return Plan((_adapter(arm),), route)
        if name is not None and name in fallbacks:
            return Plan(tuple(_adapter(n) for n in fallbacks[name]), route | {"fallback": True})
        return Plan((_adapter(name),), route)
