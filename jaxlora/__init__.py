"""jaxlora: many LoRA adapters over one base model, switched by pure functions under `jax.jit`.

Example:
    >>> import jax, jax.numpy as jnp, jaxlora
    >>> model = jaxlora.DenseChain.init(jax.random.key(0), ["l0", "l1"], [8, 8, 4])
    >>> cfg = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["l0"], init_lora_weights=False)
    >>> bank = jaxlora.AdapterBank().add(
    ...     "a", jaxlora.init_adapter(jax.random.key(1), cfg, model.layer_shapes()))
    >>> fwd = jax.jit(jaxlora.forward)
    >>> y = fwd(model, jnp.ones((2, 8)), lora=jaxlora.select(bank, "a"))
    >>> y.shape
    (2, 4)
"""

from . import errors as errors
from . import io as io
from . import numerics as numerics
from .bank import AdapterBank as AdapterBank
from .bank import conform as conform
from .bank import select as select
from .bank import stack as stack
from .chain import DenseChain as DenseChain
from .chain import forward as forward
from .lora import add_lora as add_lora
from .lora import lora_delta as lora_delta
from .lora import lora_dense as lora_dense
from .merge import combine as combine
from .merge import merge as merge
from .merge import unmerge as unmerge
from .numerics import check_finite as check_finite
from .params import get_kernel as get_kernel
from .params import kernel_paths as kernel_paths
from .params import with_kernels as with_kernels
from .slots import replace_slot as replace_slot
from .types import NO_ADAPTER as NO_ADAPTER
from .types import Active as Active
from .types import Adapter as Adapter
from .types import LoraSelection as LoraSelection
from .types import LoraWeights as LoraWeights
from .types import Routed as Routed
from .types import Routing as Routing
from .types import StackedBank as StackedBank
from .weights import LoraConfig as LoraConfig
from .weights import init_adapter as init_adapter
from .weights import make_adapter as make_adapter
from .weights import match_targets as match_targets
from .weights import resolve_pattern as resolve_pattern
from .weights import scaling as scaling

__version__ = "0.1.0"
