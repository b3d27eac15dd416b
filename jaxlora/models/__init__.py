"""Reference models whose projections take a LoRA selection as an ordinary argument.

Example:
    >>> from jaxlora.models import LlamaConfig, Llama, forward
    >>> model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8))
    >>> sorted(model.lora_shapes())[:2]
    ['model.layers.0.mlp.down_proj', 'model.layers.0.mlp.gate_proj']
"""

from .checkpoint import load_llama as load_llama
from .checkpoint import read_config as read_config
from .checkpoint import save_llama as save_llama
from .config import LlamaConfig as LlamaConfig
from .llama import KVCache as KVCache
from .llama import Llama as Llama
from .llama import forward as forward
from .llama import forward_with_cache as forward_with_cache
from .llama import init_cache as init_cache
