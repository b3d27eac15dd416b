"""Shared pieces of the Flax tests (no tests here): a tiny transformer written in NumPy float64
that calls `jaxlora.reference.layer_forward` for every dense layer, and a 16-adapter bank.

The Linen and NNX test models have the same math (two blocks of attention with DenseGeneral
query/key, a Dense value, a DenseGeneral out-projection contracting (heads, head_dim), a ReLU
MLP, residuals, a Dense head), so this one oracle serves both: only the layer paths differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

import jaxlora
from jaxlora import reference

DIM, HEADS, HEAD_DIM, HIDDEN, OUT = 16, 2, 4, 32, 8
LAYER_NAMES = ("attn.query", "attn.key", "attn.value", "attn.out", "up", "down")

Dense = Callable[[str, np.ndarray], np.ndarray]


def oracle_forward(x: np.ndarray, dense: Dense, blocks: Sequence[str]) -> np.ndarray:
    """The tiny transformer in float64; `dense(path, x_flat)` applies one (adapted) layer."""
    h = np.asarray(x, np.float64)
    batch, tokens = h.shape[:2]
    for blk in blocks:
        q = dense(f"{blk}.attn.query", h).reshape(batch, tokens, HEADS, HEAD_DIM)
        k = dense(f"{blk}.attn.key", h).reshape(batch, tokens, HEADS, HEAD_DIM)
        v = dense(f"{blk}.attn.value", h).reshape(batch, tokens, HEADS, HEAD_DIM)
        logits = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(HEAD_DIM)
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights = weights / weights.sum(-1, keepdims=True)
        o = np.einsum("bhts,bshd->bthd", weights, v).reshape(batch, tokens, HEADS * HEAD_DIM)
        h = h + dense(f"{blk}.attn.out", o)
        h = h + dense(f"{blk}.down", np.maximum(dense(f"{blk}.up", h), 0.0))
    return dense("head", h)


def oracle_dense(
    layers: Mapping[str, tuple[np.ndarray, np.ndarray]], adapters: Sequence[Mapping]
) -> Dense:
    """`dense(path, x)` = SW-FORWARD-1 with the adapters' terms, via `reference.layer_forward`."""

    def dense(path: str, x: np.ndarray) -> np.ndarray:
        w, c = layers[path]
        terms = [
            (
                np.asarray(ad[path].a, np.float64),
                np.asarray(ad[path].b, np.float64),
                float(ad[path].scale),
            )
            for ad in adapters
            if path in ad
        ]
        return reference.layer_forward(x, w, c, terms)

    return dense


def oracle_mixed(layers, x, rows: Sequence[Mapping | None], blocks) -> np.ndarray:
    """SW-MIXED-1 row by row: each row through the oracle with its own adapter (None: base)."""
    out = [
        oracle_forward(x[i : i + 1], oracle_dense(layers, [] if ad is None else [ad]), blocks)
        for i, ad in enumerate(rows)
    ]
    return np.concatenate(out)


def sixteen_adapter_bank(shapes: Mapping[str, tuple[int, int]]) -> jaxlora.AdapterBank:
    """16 adapters with ranks 1/2/4, different alphas and target sets (names and regexes)."""
    targets = [
        ["query", "value"],
        ["key", "out"],
        ["up", "down"],
        r".*attn\.(query|key|value|out)",
        "all-linear",
        ["head"],
        r"block.?[_.]?0\..*",
        ["out", "down", "head"],
    ]
    bank = jaxlora.AdapterBank()
    for i in range(16):
        cfg = jaxlora.LoraConfig(
            r=(1, 2, 4)[i % 3],
            lora_alpha=float(2 + i),
            target_modules=targets[i % len(targets)],
            use_rslora=i % 5 == 0,
            init_lora_weights=False,
        )
        bank = bank.add(f"ad{i}", jaxlora.init_adapter(jax.random.key(100 + i), cfg, shapes))
    return bank
