"""Tensor parallelism for the decoder families: the Megatron layout on a `"model"` mesh axis.

A sharded model is an ordinary `Llama` whose weights are sharded `jax.Array`s, so every
function that takes a `Llama` (`forward`, `forward_with_cache`, `generate`, the engine) runs on
it unchanged: `jax.jit` partitions the same program over the mesh (SPMD) and inserts the
collectives (spec SW-TP-1, SW-TP-2).

The layout (`tensor_specs`), on a mesh with axes `data` (rows), optionally `slot` (bank slots)
and `model` of size `m`:

- q/k/v/gate/up are column-parallel (kernel `[in, out]` split by `out`, bias too): each device
  computes its own heads / intermediate features, no collective. k/v are replicated instead when
  `num_key_value_heads` is not a multiple of `m` (every device computes every KV head, as
  Megatron and vLLM do when the tensor-parallel size exceeds the KV heads).
- o/down are row-parallel (kernel split by `in`, bias replicated): each device holds a partial
  sum of the output, reduced by one all-reduce per layer.
- the embedding is split by vocabulary rows (a masked lookup + all-reduce) and `lm_head` by
  vocabulary columns (each device computes its slice of the logits); both are replicated when
  the vocabulary is not a multiple of `m`. Norms are replicated.
- LoRA factors follow their layer (`jaxlora.sharding.lora_specs`): column layers `B` split by
  output, row layers `A` split by input; the other factor (column `A`, row `B`) replicated
  (`lora_layout="replicate-factors"`, the default: LoRA adds no collective, a device holds
  `(1 + 1/m) / 2` of the bank) or split by rank (`"split-factors"`: `1/m` of the bank, one
  all-gather of `x @ A` per column layer and one all-reduce of the delta per row layer;
  SW-TP-5).
- the KV cache (`cache_sharding`) is split by rows over `data` and by KV heads over `model`.

Checkpoints load straight into their shards: `load_llama(directory, mesh=mesh)` reads each
device's slice of each tensor with safetensors' `get_slice` (`read_sharded`), so no process
ever holds a whole projection, on the host or on a device.

Example (a model axis of size 1 splits nothing; the code is the same for any size):
    >>> from jaxlora.models import Llama, LlamaConfig, forward
    >>> from jaxlora.sharding import make_mesh
    >>> config = LlamaConfig(64, 16, 32, 1, 2, 2, 8)
    >>> tensor_specs(config, 2)["model.layers.0.self_attn.o_proj.kernel"]
    P('model',)
    >>> mesh = make_mesh(data=1, model=1)
    >>> sharded = shard_model(Llama.random(config), mesh)
    >>> forward(sharded, [[1, 2, 3]]).shape
    (1, 3, 64)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..errors import ConfigError
from ..sharding import (
    DATA,
    MODEL,
    SLOT,
    BankMode,
    LoraLayout,
    Split,
    model_axis_size,
    put,
    shard_selection,
    spec,
)
from ..types import Active, LoraSelection, Routed
from .config import LlamaConfig
from .llama import KVCache, Llama, expected_tensor_shapes

__all__ = [
    "COLUMN_PARALLEL",
    "ROW_PARALLEL",
    "cache_sharding",
    "layer_splits",
    "model_shardings",
    "read_sharded",
    "shard_cache",
    "shard_lora",
    "shard_model",
    "tensor_specs",
]

#: Projections split by output features (their outputs stay sharded into the next op).
COLUMN_PARALLEL = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
)
#: Projections split by input features (one all-reduce of their output).
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def _check_divisible(config: LlamaConfig, m: int) -> None:
    for field, n in (
        ("num_attention_heads", config.num_attention_heads),
        ("intermediate_size", config.intermediate_size),
    ):
        if n % m:
            raise ConfigError(
                f"{field}={n} is not a multiple of the model axis size {m}: tensor parallelism "
                f"splits it over the axis. Use a model axis that divides {n} (and put the other "
                "devices on the data axis)."
            )


def _kv_split(config: LlamaConfig, m: int) -> bool:
    return config.num_key_value_heads % m == 0


def layer_splits(config: LlamaConfig, model_size: int) -> dict[str, Split | None]:
    """`path -> "column" | "row" | None` of every projection (HF module paths, SW-TP-1).

    Example:
        >>> splits = layer_splits(LlamaConfig(64, 16, 32, 1, 4, 1, 4), 2)
        >>> [splits[f"model.layers.0.{n}"] for n in ("self_attn.k_proj", "mlp.down_proj")]
        [None, 'row']
    """
    if model_size == 1:
        return dict.fromkeys(config.linear_shapes())
    _check_divisible(config, model_size)
    kv = _kv_split(config, model_size)
    out: dict[str, Split | None] = {}
    for path in config.linear_shapes():
        name = path.split(".", 3)[3]
        if name in ROW_PARALLEL:
            out[path] = "row"
        elif name in ("self_attn.k_proj", "self_attn.v_proj") and not kv:
            out[path] = None
        else:
            out[path] = "column"
    return out


def tensor_specs(
    config: LlamaConfig, model_size: int, *, axis: str = MODEL
) -> dict[str, PartitionSpec]:
    """`internal tensor name -> PartitionSpec` of every weight (the layout above, SW-TP-1).

    Example:
        >>> specs = tensor_specs(LlamaConfig(64, 16, 32, 1, 2, 2, 8), 2)
        >>> specs["model.layers.0.mlp.up_proj.kernel"], specs["model.embed_tokens.weight"]
        (P(None, 'model'), P('model',))
    """
    splits = layer_splits(config, model_size)
    vocab = model_size > 1 and config.vocab_size % model_size == 0
    specs: dict[str, PartitionSpec] = {}
    for name in expected_tensor_shapes(config):
        path, _, leaf = name.rpartition(".")
        split = splits.get(path)
        axes: tuple[str | None, ...] = ()
        if name == "model.embed_tokens.weight" and vocab:
            axes = (axis,)
        elif name == "lm_head.kernel" and vocab:
            axes = (None, axis)
        elif leaf == "kernel" and split is not None:
            axes = (None, axis) if split == "column" else (axis,)
        elif leaf == "bias" and split == "column":
            axes = (axis,)
        specs[name] = spec(*axes)
    return specs


def model_shardings(config: LlamaConfig, mesh: Mesh, *, axis: str = MODEL) -> dict[str, Any]:
    """`internal tensor name -> NamedSharding` on `mesh` (replicated over its other axes)."""
    specs = tensor_specs(config, model_axis_size(mesh, axis), axis=axis)
    return {name: NamedSharding(mesh, spec) for name, spec in specs.items()}


def shard_model(model: Llama, mesh: Mesh, *, axis: str = MODEL) -> Llama:
    """`model` with every weight placed in its shards on `mesh` (SW-TP-1).

    For a model already in memory (`Llama.random`, a fine-tuned model); a checkpoint loads
    straight into its shards with `load_llama(directory, mesh=mesh)` instead.
    """
    shardings = model_shardings(model.config, mesh, axis=axis)
    tensors = {name: put(value, shardings[name]) for name, value in model.tensors().items()}
    return Llama(model.config, tensors)


def read_sharded(tensor_slice: Any, transpose: bool, sharding: Any, dtype: Any = None) -> jax.Array:
    """The global array of one safetensors tensor, each device reading only its slice (SW-TP-3).

    Arguments:
        tensor_slice: `safe_open(...).get_slice(name)` of a file opened with framework "numpy".
        transpose: the stored tensor is `[out, in]` and the array `[in, out]`.
        sharding: the array's sharding; only this process's devices' slices are read.
        dtype: cast each slice to it (default: the stored dtype).
    """
    shape = tuple(tensor_slice.get_shape())
    shape = shape[::-1] if transpose else shape

    def read(index: Any) -> np.ndarray:  # a tuple of slices, one per dimension
        stored = index[::-1] if transpose else index
        part = np.asarray(tensor_slice[stored] if stored else tensor_slice[:])
        part = part.T if transpose else part
        return part if dtype is None else part.astype(jnp.dtype(dtype))

    return jax.make_array_from_callback(shape, sharding, read)


def cache_sharding(
    cache: KVCache, config: LlamaConfig, mesh: Mesh, *, data_axis: str = DATA, axis: str = MODEL
) -> KVCache:
    """`NamedSharding`s for `cache` (same pytree; arrays or `jax.ShapeDtypeStruct`s): rows over
    `data_axis`; the `[rows, kv_heads, max_len, head_dim]` keys and values also by KV heads over
    `axis` when the k/v projections are split (replicated otherwise, as those are)."""
    m = model_axis_size(mesh, axis)
    rows = data_axis if data_axis in mesh.shape else None
    heads = axis if m > 1 and _kv_split(config, m) else None

    def sharding(x: Any) -> NamedSharding:
        return NamedSharding(mesh, spec(rows, heads) if x.ndim == 4 else spec(rows))

    return jax.tree.map(sharding, cache)


def shard_cache(
    cache: KVCache, config: LlamaConfig, mesh: Mesh, *, data_axis: str = DATA, axis: str = MODEL
) -> KVCache:
    """`cache` (`init_cache(...)`) placed as `cache_sharding` says."""
    return jax.tree.map(
        put, cache, cache_sharding(cache, config, mesh, data_axis=data_axis, axis=axis)
    )


def shard_lora(
    lora: LoraSelection,
    config: LlamaConfig,
    mesh: Mesh,
    *,
    mode: BankMode = "replicated",
    lora_layout: LoraLayout = "replicate-factors",
    splits: Mapping[str, Split | None] | None = None,
    data_axis: str = DATA,
    slot_axis: str = SLOT,
    axis: str = MODEL,
) -> Active | Routed | None:
    """A `lora=` value placed to match the model's layout on `mesh` (SW-TP-1, SW-TP-5).

    `jaxlora.sharding.shard_selection` with the family's `layer_splits`: adapters follow their
    layers over the model axis; a routed bank is replicated or split over `slot_axis` (`mode`)
    and its ids over `data_axis`. `lora_layout="replicate-factors"` (default) adds no
    collective to the forward and holds `(1 + 1/m) / 2` of the factors per device;
    `"split-factors"` holds `1/m` (ranks must be multiples of the model axis) and adds one
    all-gather of `x @ A` per adapted column layer and one all-reduce of the delta per adapted
    row layer (`docs/scaling.md`).

    Example:
        >>> from jaxlora.sharding import make_mesh
        >>> shard_lora(None, LlamaConfig(64, 16, 32, 1, 2, 2, 8), make_mesh(data=1, model=1))
    """
    if splits is None:
        splits = layer_splits(config, model_axis_size(mesh, axis))
    return shard_selection(
        lora,
        mesh,
        splits,
        mode=mode,
        data_axis=data_axis,
        slot_axis=slot_axis,
        model_axis=axis,
        lora_layout=lora_layout,
    )
