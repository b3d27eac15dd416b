"""The file names of the on-disk formats jaxlora reads and writes: defined here only.

PEFT adapter directories (`adapter_config.json` + `adapter_model.safetensors`, spec SW-IO-1)
and Hugging Face model checkpoints (`config.json` + `model.safetensors`, or a sharded index;
spec SW-IO-12). Pickle names are listed only to refuse them with a clear message.

Example:
    >>> ADAPTER_CONFIG_NAME, MODEL_WEIGHTS_NAME, dict(SAFETENSORS_METADATA)
    ('adapter_config.json', 'model.safetensors', {'format': 'pt'})
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_PICKLE_NAMES",
    "ADAPTER_WEIGHTS_NAME",
    "MODEL_CONFIG_NAME",
    "MODEL_INDEX_NAME",
    "MODEL_PICKLE_NAME",
    "MODEL_WEIGHTS_NAME",
    "SAFETENSORS_METADATA",
]

#: a PEFT adapter's config (PEFT's `CONFIG_NAME`)
ADAPTER_CONFIG_NAME = "adapter_config.json"
#: a PEFT adapter's factors (PEFT's `SAFETENSORS_WEIGHTS_NAME`)
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: pickled adapter weights: never opened, only named in the refusal
ADAPTER_PICKLE_NAMES = ("adapter_model.bin", "pytorch_model.bin")

#: a transformers model's config (transformers' `CONFIG_NAME`)
MODEL_CONFIG_NAME = "config.json"
#: a single-file checkpoint (transformers' `SAFE_WEIGHTS_NAME`)
MODEL_WEIGHTS_NAME = "model.safetensors"
#: a sharded checkpoint's index (transformers' `SAFE_WEIGHTS_INDEX_NAME`)
MODEL_INDEX_NAME = "model.safetensors.index.json"
#: a pickled checkpoint: never opened, only named in the refusal
MODEL_PICKLE_NAME = "pytorch_model.bin"

#: the safetensors metadata PEFT and transformers write (transformers refuses files without it)
SAFETENSORS_METADATA = MappingProxyType({"format": "pt"})
