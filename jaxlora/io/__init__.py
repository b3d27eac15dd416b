"""On-disk formats: PEFT adapters, Hugging Face checkpoints, and the one atomic-write helper.

- `load_peft(dir)` -> `AdapterBank` ("default" from the root, others from `<dir>/<name>/`);
- `load_peft_adapter(dir)` -> `(adapter, LoraConfig)` for one adapter directory;
- `save_peft(dir, bank_or_adapter)` writes the same layout atomically (spec `specs/io.md`);
- `validate_against(adapter, model)` checks paths and shapes against a model's layers;
- `prefix_key_map({"old.": "new."})` renames path prefixes (a `key_map` for load/save);
- `save_hf_checkpoint(dir, tensors, config)` writes `config.json` + `model.safetensors`
  (`jaxlora.models.save_llama` builds them from a Llama);
- `atomic_write(path, data)` / `atomic_directory(path)`: every writer's atomic, fsynced write;
- the file names of both formats (`ADAPTER_CONFIG_NAME`, `MODEL_WEIGHTS_NAME`, ...).

Example:
    >>> import jax.numpy as jnp, tempfile, jaxlora
    >>> w = jaxlora.LoraWeights(jnp.ones((4, 2)), jnp.ones((2, 3)), jnp.asarray(0.5))
    >>> d = tempfile.mkdtemp() + "/ad"
    >>> jaxlora.io.save_peft(d, {"l0": w})
    >>> adapter, cfg = jaxlora.io.load_peft_adapter(d)
    >>> float(adapter["l0"].scale), cfg.r
    (0.5, 2)
"""

from ._atomic import atomic_directory as atomic_directory
from ._atomic import atomic_write as atomic_write
from ._checkpoint import save_hf_checkpoint as save_hf_checkpoint
from ._keys import PEFT_PREFIX as PEFT_PREFIX
from ._keys import prefix_key_map as prefix_key_map
from ._load import find_adapters as find_adapters
from ._load import load_peft as load_peft
from ._load import load_peft_adapter as load_peft_adapter
from ._load import validate_against as validate_against
from ._names import ADAPTER_CONFIG_NAME as ADAPTER_CONFIG_NAME
from ._names import ADAPTER_WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from ._names import MODEL_CONFIG_NAME as MODEL_CONFIG_NAME
from ._names import MODEL_INDEX_NAME as MODEL_INDEX_NAME
from ._names import MODEL_PICKLE_NAME as MODEL_PICKLE_NAME
from ._names import MODEL_WEIGHTS_NAME as MODEL_WEIGHTS_NAME
from ._safetensors import read_tensors as read_tensors
from ._save import save_peft as save_peft
