"""PEFT interop: read and write LoRA adapters in PEFT's on-disk format (spec `specs/io.md`).

- `load_peft(dir)` -> `AdapterBank` ("default" from the root, others from `<dir>/<name>/`);
- `load_peft_adapter(dir)` -> `(adapter, LoraConfig)` for one adapter directory;
- `save_peft(dir, bank_or_adapter)` writes the same layout atomically;
- `validate_against(adapter, model)` checks paths and shapes against a model's layers.

Example:
    >>> import jax.numpy as jnp, tempfile, jaxlora
    >>> w = jaxlora.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.asarray(0.5))
    >>> d = tempfile.mkdtemp() + "/ad"
    >>> jaxlora.io.save_peft(d, {"l0": w})
    >>> adapter, cfg = jaxlora.io.load_peft_adapter(d)
    >>> float(adapter["l0"].scale), cfg.r
    (0.5, 2)
"""

from ._keys import PEFT_PREFIX as PEFT_PREFIX
from ._load import find_adapters as find_adapters
from ._load import load_peft as load_peft
from ._load import load_peft_adapter as load_peft_adapter
from ._load import validate_against as validate_against
from ._safetensors import read_tensors as read_tensors
from ._save import save_peft as save_peft
