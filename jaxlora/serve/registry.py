"""The server's adapters by public name, each version pinned by the requests using it.

Spec SW-ADAPT-*. A name maps to one *version*: the sha256 of the adapter's contents
(`content_hash`), which every response names. The engine holds each version under its own key
`name@<hash prefix>`; a request *acquires* the version its name has when it is admitted and
*releases* it when it ends. Replacing or removing a name changes what new requests get at
once, while requests admitted before keep the version they were admitted with: an old
version leaves the engine only when its last request releases it.

Loading checks, before anything reaches the engine: the name (SW-ADAPT-1), the file location
(`resolve_under_root`, SW-SEC-5), and a bound on the adapter's magnitude (SW-ADAPT-3): the
largest entry the update `scale * A @ B` of any layer can have, `|scale| * max_i sum_k
|A[i, k]| * max |B|`, must not exceed `max_delta` (weights x1e30 or `lora_alpha` 1e38 are
refused, where they would make every logit of the adapter's rows NaN or Inf).

Example:
    >>> import jax.numpy as jnp
    >>> from jaxlora.types import LoraWeights
    >>> w = {"q": LoraWeights(jnp.ones((4, 2)), jnp.full((2, 3), 0.5), jnp.asarray(2.0))}
    >>> delta_bound(w)
    2.0
    >>> content_hash(w)[:7]
    'sha256:'
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import AdapterExistsError, AdapterNotFoundError, ConfigError, format_names
from ..types import Adapter
from .errors import BadRequestError
from .security import resolve_under_root

__all__ = [
    "BASE",
    "MAX_NAME_CHARS",
    "AdapterInfo",
    "Registry",
    "check_name",
    "content_hash",
    "delta_bound",
]

#: The name that means "no adapter" (the base model) in native requests and chains.
BASE = "base"
#: The longest adapter name (characters).
MAX_NAME_CHARS = 128


class AdapterEngine(Protocol):
    """What the registry needs of an engine (`jaxlora.engine.Engine` has it)."""

    def add_adapter(self, name: str, adapter: Adapter, source: str | None = None) -> int: ...

    def remove_adapter(self, name: str) -> Any: ...


def check_name(name: Any) -> str:
    """`name` if it is a valid adapter name (SW-ADAPT-1), else `BadRequestError`.

    Valid: a string of 1 to `MAX_NAME_CHARS` Unicode characters, no control, format,
    surrogate or unassigned characters, no leading or trailing whitespace, not `base`.
    """
    ok = isinstance(name, str) and 0 < len(name) <= MAX_NAME_CHARS and name == name.strip()
    if ok:
        ok = not any(unicodedata.category(c).startswith("C") for c in name)
    if not ok or name == BASE:
        raise BadRequestError(
            f"adapter name {name!r} is invalid: use 1 to {MAX_NAME_CHARS} printable Unicode "
            f"characters without surrounding spaces, other than {BASE!r}.",
            param="lora_name",
        )
    return name


def _host(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x))


def content_hash(adapter: Adapter) -> str:
    """`sha256:<hex>` of the adapter's paths, dtypes, shapes, factor bytes and scales."""
    digest = hashlib.sha256()
    for path in sorted(adapter):
        w = adapter[path]
        digest.update(path.encode() + b"\0")
        for x in (w.a, w.b, w.scale):
            x = _host(x)
            digest.update(f"{x.dtype.str}{x.shape}".encode())
            digest.update(x.tobytes())
    return "sha256:" + digest.hexdigest()


def delta_bound(adapter: Adapter) -> float:
    """The largest entry `scale * A @ B` can have over the adapter's layers (upper bound)."""
    bound = 0.0
    for w in adapter.values():
        a = np.abs(_host(w.a).astype(np.float64))
        b = np.abs(_host(w.b).astype(np.float64))
        scale = float(np.abs(_host(w.scale)).max(initial=0))
        with np.errstate(over="ignore", invalid="ignore"):
            value = scale * float(a.sum(axis=-1).max(initial=0)) * float(b.max(initial=0))
        bound = max(bound, value if math.isfinite(value) else math.inf)
    return bound


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """One version of a named adapter: its engine key, content hash, source and rank."""

    name: str
    version: str
    key: str
    source: str | None
    rank: int


class Registry:
    """Names -> pinned versions over an engine (module docstring). Thread-safe.

    Arguments:
        engine: where versions are held (`add_adapter` / `remove_adapter`).
        root: the adapter root runtime loads must lie under.
        max_delta: the magnitude bound (`math.inf`: none).
        layer_shapes: the model's `lora_shapes()`, to check adapters against.
    """

    def __init__(
        self,
        engine: AdapterEngine,
        *,
        root: str | Path,
        max_delta: float = 1e4,
        layer_shapes: Mapping[str, tuple[int, int]] | None = None,
    ):
        if not max_delta > 0:
            raise ConfigError(f"max_delta must be > 0 (inf: no bound), got {max_delta!r}.")
        self.engine, self.root, self.max_delta = engine, Path(root), max_delta
        self.layer_shapes = layer_shapes
        self._lock = threading.Lock()
        self._current: dict[str, AdapterInfo] = {}
        self._users: dict[str, int] = {}  # engine key -> requests using it
        self._retired: set[str] = set()  # keys no name points to (removed when unused)

    # -- loading ----------------------------------------------------------------------------
    def add(
        self, name: str, adapter: Adapter, source: str | None = None, *, replace: bool = False
    ) -> AdapterInfo:
        """Make `adapter` the version of `name`; `AdapterExistsError` if taken (unless
        `replace`). Replacing with identical contents changes nothing."""
        check_name(name)
        bound = delta_bound(adapter)
        if not bound <= self.max_delta:
            raise BadRequestError(
                f"adapter {name!r} is refused: its update scale*A@B can reach {bound:.3g} per "
                f"entry, above this server's bound of {self.max_delta:g} (--max-adapter-delta); "
                "its rows would produce non-finite logits. Check lora_alpha and the weights.",
                param="lora_path",
            )
        version = content_hash(adapter)
        ranks = [int(np.shape(w.a)[-1]) for w in adapter.values()]
        info = AdapterInfo(name, version, f"{name}@{version[7:23]}", source, max(ranks, default=0))
        with self._lock:
            old = self._current.get(name)
            if old is not None and not replace:
                raise AdapterExistsError(
                    f"adapter {name!r} is already loaded (version {old.version[:19]}); unload it "
                    "first, or replace it (`load_inplace: true`)."
                )
            if old is not None and old.key == info.key:
                self._current[name] = dataclasses.replace(old, source=source)
                return self._current[name]
            if info.key not in self._users:
                self.engine.add_adapter(info.key, adapter, source)  # raises, adding nothing
                self._users[info.key] = 0
            self._retired.discard(info.key)
            self._current[name] = info
            if old is not None:
                self._retire(old.key)
        return info

    def load_dir(self, name: str, path: Any, *, replace: bool = False) -> AdapterInfo:
        """Load the PEFT directory `path` (relative to the root) as `name` (SW-SEC-5)."""
        from ..io import load_peft_adapter

        check_name(name)
        directory = resolve_under_root(self.root, path)
        adapter, _ = load_peft_adapter(directory, layer_shapes=self.layer_shapes, name=name)
        return self.add(name, adapter, str(directory), replace=replace)

    def remove(self, name: str) -> AdapterInfo:
        """Stop serving `name`; requests already admitted finish with their version."""
        with self._lock:
            info = self._current.pop(name, None)
            if info is None:
                raise AdapterNotFoundError(
                    f"no adapter named {name!r} is loaded. Loaded: "
                    f"{format_names(sorted(self._current))}."
                )
            self._retire(info.key)
        return info

    def _retire(self, key: str) -> None:  # under the lock
        if any(i.key == key for i in self._current.values()):
            return
        self._retired.add(key)
        self._collect(key)

    def _collect(self, key: str) -> None:  # under the lock
        if key in self._retired and self._users.get(key, 0) == 0:
            self._retired.discard(key)
            self._users.pop(key, None)
            self.engine.remove_adapter(key)

    # -- requests ---------------------------------------------------------------------------
    def acquire(self, name: str) -> AdapterInfo:
        """Pin the current version of `name` for one request (`AdapterNotFoundError` if none)."""
        with self._lock:
            info = self._current.get(name)
            if info is None:
                raise AdapterNotFoundError(f"the model `{name}` does not exist.")
            self._users[info.key] += 1
            return info

    def release(self, info: AdapterInfo) -> None:
        """The request that acquired `info` has ended."""
        with self._lock:
            self._users[info.key] -= 1
            self._collect(info.key)

    # -- views ------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterInfo | None:
        with self._lock:
            return self._current.get(name)

    def infos(self) -> list[AdapterInfo]:
        """The current version of every name, sorted by name."""
        with self._lock:
            return [self._current[n] for n in sorted(self._current)]

    def in_use(self) -> dict[str, int]:
        """`engine key -> requests using it` for versions in use (retired ones included)."""
        with self._lock:
            return {k: n for k, n in self._users.items() if n}
