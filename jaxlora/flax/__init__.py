"""Flax integration: apply jaxlora adapters to unmodified Linen and NNX models by layer path.

Import the submodule you use (`jaxlora.flax.linen` or `jaxlora.flax.nnx`); each offers
`layer_shapes` and `apply(..., lora=, routing=)` (spec SW-FLAX-1..5).

Example:
    >>> from jaxlora.flax import linen, nnx
    >>> callable(linen.apply) and callable(nnx.apply)
    True
"""

from . import linen as linen
from . import nnx as nnx
