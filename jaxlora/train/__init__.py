"""Training LoRA adapters with optax: one adapter, or many at once in one mixed batch.

- `split(adapter)` -> `(trainable, frozen)`: the factors `a`, `b` (what an optax optimizer
  sees) and the scales (never trained); `join` reverses it (spec SW-TRAIN-1).
- `jaxlora.init_adapter` initialises as PEFT does (SW-TRAIN-2); `dropout(lora, key, rate)`
  is PEFT's `lora_dropout` on the LoRA input of a training forward (SW-TRAIN-3).
- `make_batch`, `lm_loss`: causal-LM batches and loss with prompt tokens masked (SW-TRAIN-4).
- `init` / `make_step`: one adapter; gradient accumulation, dropout, donated state.
- `init_slots` / `make_slots_step`: every slot of a `StackedBank` trained on its own rows in
  one step, per-slot optimizer state and learning rate; `set_slot` / `set_training` change
  the training set without recompiling (SW-TRAIN-5).
- `from_llama`, `from_linen`, `from_nnx`: the `logits_fn` of each model family.
- Back to files: `jaxlora.bank.unstack` and `jaxlora.bank.trim`, then `jaxlora.io.save_peft`
  (SW-TRAIN-6).

Example:
    >>> import jax, optax, jaxlora
    >>> from jaxlora import train
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> lm = train.from_llama(Llama.random(LlamaConfig(32, 16, 32, 1, 2, 1, 8)))
    >>> cfg = jaxlora.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    >>> opt = optax.adamw(1e-2)
    >>> state = train.init(opt, jaxlora.init_adapter(jax.random.key(0), cfg, lm.shapes))
    >>> step = train.make_step(opt, lm.logits, dropout=0.1)
    >>> batch = train.make_batch([([1, 2], [3, 4]), ([5], [6, 7])], length=4)
    >>> for i in range(3):
    ...     state, metrics = step(state, lm.base, batch, jax.random.key(i))
    >>> adapter = train.adapter_of(state)
    >>> float(adapter["model.layers.0.self_attn.q_proj"].scale)  # alpha / r, never trained
    2.0
"""

from ._loss import Batch as Batch
from ._loss import group_sums as group_sums
from ._loss import lm_loss as lm_loss
from ._loss import make_batch as make_batch
from ._loss import token_nll as token_nll
from ._models import LM as LM
from ._models import from_linen as from_linen
from ._models import from_llama as from_llama
from ._models import from_nnx as from_nnx
from ._slots import SlotsState as SlotsState
from ._slots import init_slots as init_slots
from ._slots import make_slots_step as make_slots_step
from ._slots import set_slot as set_slot
from ._slots import set_training as set_training
from ._slots import stacked_of as stacked_of
from ._split import dropout as dropout
from ._split import join as join
from ._split import split as split
from ._step import LogitsFn as LogitsFn
from ._step import TrainState as TrainState
from ._step import adapter_of as adapter_of
from ._step import init as init
from ._step import make_step as make_step
