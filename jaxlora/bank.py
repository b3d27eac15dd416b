"""`AdapterBank` and the pure functions on it: `select`, `conform`, `stack`, `unstack`, `trim`.

A bank is an immutable mapping `name -> adapter` (adapter = `path -> LoraWeights`) and a pytree.
Every operation returns a new bank; there is no "active adapter" stored anywhere: the active set
is whatever the caller passes to `select` (spec SW-BANK-3, SW-ACTIVE-1).

Example:
    >>> import jax, jaxlora
    >>> shapes = {"l0": (8, 8), "l1": (8, 4)}
    >>> cfg = lambda r: jaxlora.LoraConfig(r=r, target_modules=["l0", "l1"])
    >>> bank = jaxlora.AdapterBank()
    >>> bank = bank.add("a", jaxlora.init_adapter(jax.random.key(0), cfg(2), shapes))
    >>> bank = bank.add("b", jaxlora.init_adapter(jax.random.key(1), cfg(4), shapes))
    >>> conformed = jaxlora.conform(bank)
    >>> [w.rank for w in jaxlora.select(conformed, "a").adapters[0].values()]
    [4, 4]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from .errors import (
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    ShapeMismatchError,
    TargetNotFoundError,
    format_names,
)
from .lora import check_weights
from .numerics import check_finite
from .types import Active, Adapter, LoraWeights, StackedBank

__all__ = [
    "AdapterBank",
    "check_adapter",
    "conform",
    "pad_to_rank",
    "select",
    "stack",
    "trim",
    "unstack",
]


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"adapter names must be non-empty strings, got {name!r}.")


def check_adapter(
    name: str, adapter: Adapter, *, label: str | None = None
) -> dict[str, LoraWeights]:
    """Validate one adapter (shapes, dtypes, 0-d scale); returns a plain dict copy.

    `label` names the adapter in messages (default `adapter 'name'`)."""
    _check_name(name)
    label = label or f"adapter {name!r}"
    if not isinstance(adapter, Mapping):
        raise ConfigError(
            f"{label}: expected a mapping `layer path -> LoraWeights`, got "
            f"{type(adapter).__name__}. Build one with jaxlora.make_adapter or init_adapter."
        )
    checked = {}
    for path, w in adapter.items():
        if not isinstance(path, str) or not path:
            raise ConfigError(f"{label}: layer paths must be non-empty strings: {path!r}")
        check_weights(w, where=f"{label}, layer {path!r}")
        if not hasattr(w.scale, "dtype"):  # a Python float: make it an array leaf
            w = LoraWeights(w.a, w.b, jnp.asarray(w.scale, jnp.float32))
        checked[path] = w
    return checked


@jax.tree_util.register_pytree_with_keys_class
class AdapterBank(Mapping[str, dict[str, LoraWeights]]):
    """An immutable mapping `name -> adapter`; a pytree whose leaves are the adapter arrays.

    Arguments:
        adapters: optional initial `name -> adapter` mapping (insertion order is kept).

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((2, 1)), jnp.ones((1, 2)), jnp.asarray(1.0))
        >>> bank = AdapterBank().add("x", {"l0": w})
        >>> bank.names, "x" in bank, len(bank.remove("x"))
        (('x',), True, 0)
    """

    __slots__ = ("_adapters",)

    def __init__(self, adapters: Mapping[str, Adapter] | None = None):
        checked = {}
        for name, adapter in (adapters or {}).items():
            checked[name] = check_adapter(name, adapter)
        self._adapters: dict[str, dict[str, LoraWeights]] = checked

    @classmethod
    def _trusted(cls, adapters: dict[str, dict[str, LoraWeights]]) -> AdapterBank:
        bank = object.__new__(cls)
        bank._adapters = adapters
        return bank

    # -- Mapping -----------------------------------------------------------------------------
    def __getitem__(self, name: str) -> dict[str, LoraWeights]:
        try:
            return dict(self._adapters[name])
        except KeyError:
            raise AdapterNotFoundError(
                f"no adapter named {name!r}. The bank holds: {format_names(self._adapters)}."
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def __repr__(self) -> str:
        parts = []
        for name, adapter in self._adapters.items():
            ranks = sorted({w.rank for w in adapter.values()})
            parts.append(f"{name!r}: {len(adapter)} layers, rank {ranks}")
        return "AdapterBank({" + ", ".join(parts) + "})"

    @property
    def names(self) -> tuple[str, ...]:
        """The adapter names, in insertion order."""
        return tuple(self._adapters)

    # -- pure updates ------------------------------------------------------------------------
    def add(self, name: str, adapter: Adapter) -> AdapterBank:
        """A new bank with `adapter` under `name` (spec SW-BANK-1); `name` must be new."""
        _check_name(name)
        if name in self._adapters:
            raise AdapterExistsError(
                f"an adapter named {name!r} already exists. Use bank.replace({name!r}, adapter) "
                f"to overwrite it, or bank.remove({name!r}) first. Names: "
                f"{format_names(self._adapters)}."
            )
        return AdapterBank._trusted({**self._adapters, name: check_adapter(name, adapter)})

    def replace(self, name: str, adapter: Adapter) -> AdapterBank:
        """A new bank where the existing adapter `name` is replaced by `adapter`."""
        self[name]  # raises AdapterNotFoundError with the list of names
        return AdapterBank._trusted({**self._adapters, name: check_adapter(name, adapter)})

    def remove(self, name: str) -> AdapterBank:
        """A new bank without `name` (spec SW-BANK-2); unknown names raise."""
        self[name]
        return AdapterBank._trusted({k: v for k, v in self._adapters.items() if k != name})

    # -- pytree ------------------------------------------------------------------------------
    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.DictKey(n), a) for n, a in self._adapters.items()]
        return children, tuple(self._adapters)

    @classmethod
    def tree_unflatten(cls, names, children):
        return cls._trusted(dict(zip(names, children, strict=True)))


def select(bank: AdapterBank, active: str | Sequence[str] | None) -> Active:
    """The active adapters for a forward: a pure lookup, no state (spec SW-ACTIVE-1..4).

    Arguments:
        bank: the adapters.
        active: a name, an ordered sequence of names (their deltas are summed in that order),
            or `None` / `()` for the base model.

    Returns:
        An `Active` selection, the `lora=` argument of every forward. The base model
        (`None` / `()`) on a non-empty bank is the bank's first adapter gated off: it has the
        structure of `select(bank, name)`, so on a conformed bank one compilation serves every
        adapter and the base, and the output is bit-identical to the base model (SW-ACTIVE-2).

    Example:
        >>> select(AdapterBank(), None)
        Active(adapters=0, layers=[], gate=[])
    """
    if active is None or (
        isinstance(active, Sequence) and not isinstance(active, str) and not len(active)
    ):
        if not bank._adapters:
            return Active.of()
        return Active.of(next(iter(bank._adapters.values())), gate=[False])
    if isinstance(active, str):
        return Active.of(bank[active])
    if not isinstance(active, Sequence):
        raise ConfigError(
            f"`active` must be a name, a sequence of names or None, got {type(active).__name__}."
        )
    names = list(active)
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"`active` must contain adapter names (str), got {name!r}.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(
            f"`active` lists {format_names(duplicates)} more than once; each adapter may be "
            "active once. To weight an adapter, build one with jaxlora.combine."
        )
    return Active.of(*(bank[name] for name in names))


def _layer_shapes(bank: AdapterBank) -> dict[str, tuple[int, int, str]]:
    """`path -> (in, out, first adapter name)`, checking that all adapters agree."""
    shapes: dict[str, tuple[int, int, str]] = {}
    for name, adapter in bank._adapters.items():
        for path, w in adapter.items():
            io = (w.in_features, w.out_features)
            if path in shapes and shapes[path][:2] != io:
                other = shapes[path][2]
                raise ShapeMismatchError(
                    f"layer {path!r}: adapter {other!r} maps {shapes[path][:2]} (in, out) but "
                    f"adapter {name!r} maps {io}; adapters of one bank must target the same "
                    "model."
                )
            shapes.setdefault(path, (*io, name))
    return shapes


def conform(bank: AdapterBank, max_rank: int | None = None) -> AdapterBank:
    """Give every adapter the union of targets and one rank, by zero padding (SW-CONFORM-1..3).

    Zero columns of `a`, zero rows of `b` and zero adapters for missing targets change no
    output, and make every `select(bank, name)` result share one treedef, shape and dtype set,
    so one compiled forward serves every adapter.

    Arguments:
        bank: the adapters.
        max_rank: the common rank; default the largest rank in the bank. A rank above it raises.

    Example:
        >>> conform(AdapterBank()).names
        ()
    """
    if max_rank is not None and (
        not isinstance(max_rank, int | np.integer) or isinstance(max_rank, bool) or max_rank < 1
    ):
        raise ConfigError(f"`max_rank` must be a positive integer or None, got {max_rank!r}.")
    shapes = _layer_shapes(bank)
    largest = max((w.rank for ad in bank._adapters.values() for w in ad.values()), default=0)
    rank = largest if max_rank is None else int(max_rank)
    if rank < largest:
        culprit = next(
            (n, p, w.rank)
            for n, ad in bank._adapters.items()
            for p, w in ad.items()
            if w.rank > rank
        )
        raise ConfigError(
            f"max_rank={max_rank} is below the rank {culprit[2]} of adapter {culprit[0]!r} at "
            f"layer {culprit[1]!r}; use max_rank >= {largest} (or None)."
        )
    dtypes = {
        path: jnp.result_type(
            *(x for ad in bank._adapters.values() if path in ad for x in (ad[path].a, ad[path].b))
        )
        for path in shapes
    }
    out = {
        name: {
            path: pad_to_rank(adapter.get(path), d_in, d_out, rank, dtypes[path])
            for path, (d_in, d_out, _) in shapes.items()
        }
        for name, adapter in bank._adapters.items()
    }
    return AdapterBank._trusted(out)


def pad_to_rank(w: LoraWeights | None, d_in: int, d_out: int, rank: int, dtype: Any) -> LoraWeights:
    """`w` with `a`/`b` zero-padded to `rank` and cast to `dtype` (scale float32); all zeros when
    `w` is None. Changes no output (SW-CONFORM-1, SW-CONFORM-2)."""
    if w is None:
        return LoraWeights(
            jnp.zeros((d_in, rank), dtype),
            jnp.zeros((rank, d_out), dtype),
            jnp.zeros((), jnp.float32),
        )
    extra = rank - w.rank
    return LoraWeights(
        jnp.pad(jnp.asarray(w.a, dtype), ((0, 0), (0, extra))),
        jnp.pad(jnp.asarray(w.b, dtype), ((0, extra), (0, 0))),
        jnp.asarray(w.scale, jnp.float32),
    )


def stack(bank: AdapterBank, names: Sequence[str] | None = None) -> StackedBank:
    """Stack a conformed bank's adapters along a leading slot axis, for mixed batches.

    Arguments:
        bank: a bank whose adapters share targets, ranks and dtypes (see `conform`).
        names: the adapters to stack, in slot order; default all, in bank order.

    Example:
        >>> stack(AdapterBank()).names
        ()
    """
    names = bank.names if names is None else tuple(names)
    adapters = [bank[n] for n in names]
    if not adapters:
        return StackedBank({}, ())
    ref_name, ref = names[0], adapters[0]
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        if set(adapter) != set(ref):
            diff = sorted(set(adapter) ^ set(ref))
            raise ShapeMismatchError(
                f"adapters {ref_name!r} and {name!r} target different layers (differ at "
                f"{format_names(diff)}); call jaxlora.conform(bank) before stack."
            )
        for path, w in adapter.items():
            r = ref[path]
            if (w.a.shape, w.b.shape, w.a.dtype, w.b.dtype) != (
                r.a.shape,
                r.b.shape,
                r.a.dtype,
                r.b.dtype,
            ):
                raise ShapeMismatchError(
                    f"layer {path!r}: adapter {ref_name!r} has a{tuple(r.a.shape)} "
                    f"b{tuple(r.b.shape)} {r.a.dtype} but {name!r} has a{tuple(w.a.shape)} "
                    f"b{tuple(w.b.shape)} {w.a.dtype}; call jaxlora.conform(bank) before stack."
                )
    weights = {
        path: LoraWeights(
            jnp.stack([ad[path].a for ad in adapters]),
            jnp.stack([ad[path].b for ad in adapters]),
            jnp.stack([jnp.asarray(ad[path].scale, jnp.float32) for ad in adapters]),
        )
        for path in ref
    }
    _refuse_non_finite(weights, names, adapters)
    return StackedBank(weights, names)


def _refuse_non_finite(
    weights: dict[str, LoraWeights], names: tuple[str, ...], adapters: list[dict]
) -> None:
    """SW-NUM-3: a NaN/Inf slot would reach other rows through kernels that contract over all
    slots (`onehot`, `ragged`: 0 * NaN = NaN), so stacking refuses it. One reduction per
    stacked array and one host transfer; the slow, naming check runs only on failure."""
    flags = [jnp.all(jnp.isfinite(x)) for w in weights.values() for x in (w.a, w.b, w.scale)]
    if not flags or bool(np.all(np.asarray(jnp.stack(flags)))):
        return
    for name, adapter in zip(names, adapters, strict=True):
        check_finite(adapter, name=name)


def unstack(stacked: StackedBank) -> AdapterBank:
    """The inverse of `stack`: slot `i` becomes the adapter `stacked.names[i]` (SW-TRAIN-6).

    Every adapter keeps the stacked (conformed) rank and targets; `trim` removes the padding.
    `stack(unstack(s))` equals `s` exactly.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((2, 3, 1)), jnp.ones((2, 1, 3)), jnp.asarray([1.0, 2.0]))
        >>> bank = unstack(StackedBank({"l0": w}, ("a", "b")))
        >>> bank.names, float(bank["b"]["l0"].scale)
        (('a', 'b'), 2.0)
    """
    if not isinstance(stacked, StackedBank):
        raise ConfigError(
            f"unstack expects a StackedBank (from jaxlora.stack), got {type(stacked).__name__}."
        )
    for path, w in stacked.weights.items():
        check_weights(w, where=f"stacked bank, layer {path!r}", stacked=True)
        if w.a.shape[0] != len(stacked.names):
            raise ShapeMismatchError(
                f"stacked bank, layer {path!r}: {w.a.shape[0]} slots of weights but "
                f"{len(stacked.names)} names {stacked.names}."
            )
    return AdapterBank._trusted(
        {
            name: {
                path: LoraWeights(w.a[i], w.b[i], w.scale[i]) for path, w in stacked.weights.items()
            }
            for i, name in enumerate(stacked.names)
        }
    )


def _trim_adapter(
    name: str, adapter: Mapping[str, LoraWeights], like: Mapping[str, LoraWeights] | None
) -> dict[str, LoraWeights]:
    out = {}
    for path, w in adapter.items():
        a, b = np.asarray(w.a), np.asarray(w.b)
        used = np.any(a != 0, axis=0) | np.any(b != 0, axis=1)
        if like is None:
            if not used.any() and float(np.asarray(w.scale)) == 0.0:
                continue  # a target added by conform (zero factors, zero scale)
            rank = int(np.nonzero(used)[0][-1]) + 1 if used.any() else w.rank
            out[path] = LoraWeights(w.a[:, :rank], w.b[:rank], w.scale)
            continue
        rank = like[path].rank if path in like else 0
        if rank > w.rank:
            raise ShapeMismatchError(
                f"adapter {name!r}, layer {path!r}: the original has rank {rank} but the "
                f"adapter to trim has rank {w.rank}; `like` must be the adapter before conform."
            )
        if used[rank:].any():
            lost = float(max(np.abs(a[:, rank:]).max(initial=0), np.abs(b[rank:]).max(initial=0)))
            where = f"rank columns {rank}..{w.rank - 1}" if rank else "the whole layer"
            raise ConfigError(
                f"adapter {name!r}, layer {path!r}: trim would drop non-zero factors "
                f"({where}, max |value| {lost:.3g}) that the original adapter does not have. "
                "Training moved the zero padding (an optimizer that updates parameters whose "
                "gradient is zero, e.g. one adding noise); trim without `like` to keep them."
            )
        if rank:
            o = like[path]
            out[path] = LoraWeights(
                jnp.asarray(w.a[:, :rank], o.a.dtype), jnp.asarray(w.b[:rank], o.b.dtype), w.scale
            )
    if like is not None:
        missing = sorted(set(like) - set(adapter))
        if missing:
            raise TargetNotFoundError(
                f"adapter {name!r}: the original targets {format_names(missing)}, which the "
                "adapter to trim does not have; `like` must be the adapter before conform."
            )
    return out


def trim(
    adapters: AdapterBank | Adapter, like: AdapterBank | Adapter | None = None
) -> AdapterBank | dict[str, LoraWeights]:
    """Drop the zero padding `conform` added: trailing zero rank columns and zero targets.

    With `like` (the adapter or bank before `conform`), each layer gets exactly the original
    targets, ranks and dtypes; dropping anything that is not zero raises `ConfigError`. Without
    it, trailing rank columns whose `a` column and `b` row are all zero are dropped, and so are
    layers whose factors and scale are all zero (what `conform` adds for a missing target). The
    scale is never changed, so `jaxlora.io.save_peft` writes the original `r` and `lora_alpha`
    (SW-TRAIN-6). A host operation (shapes change): call it outside `jit`.

    Arguments:
        adapters: an `AdapterBank` (every adapter trimmed) or one adapter.
        like: the same kind, before `conform` (a bank may hold more adapters); its paths and
            ranks are the ones kept.

    Example:
        >>> import jax.numpy as jnp
        >>> w = LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.asarray(2.0))
        >>> bank = AdapterBank({"a": {"l0": w}, "b": {"l1": w}})
        >>> back = trim(unstack(stack(conform(bank, max_rank=4))))
        >>> {n: {p: x.rank for p, x in ad.items()} for n, ad in back.items()}
        {'a': {'l0': 2}, 'b': {'l1': 2}}
    """
    if isinstance(adapters, AdapterBank):
        if like is not None and not isinstance(like, AdapterBank):
            raise ConfigError("trim(bank, like=...) takes the bank before conform as `like`.")
        missing = [] if like is None else [n for n in adapters.names if n not in like]
        if like is not None and missing:
            raise AdapterNotFoundError(
                f"trim: `like` has no adapter {format_names(missing)} (it holds "
                f"{format_names(like.names)}); give the bank before conform."
            )
        return AdapterBank._trusted(
            {
                n: _trim_adapter(n, ad, None if like is None else like[n])
                for n, ad in adapters.items()
            }
        )
    adapter = check_adapter("adapter", adapters, label="the adapter to trim")
    ref = None if like is None else check_adapter("like", cast(Adapter, like), label="`like`")
    return _trim_adapter("adapter", adapter, ref)
