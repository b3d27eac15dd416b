"""Continuous batching: a row pool with its KV cache, per-row sampling, LRU device adapter slots.

One engine serves `jaxlora.generate`, `jaxlora generate`, `jaxlora demo` and the server
(spec `specs/engine.md`). `Engine.submit(Request(...))` returns a `Handle` (`result()`,
`future`, `stream()`, `add_listener`); `Engine.cancel(handle)` frees its row at the next
iteration; `start()` runs the engine on its own thread, `run_until_done()` inline.

Example:
    >>> from jaxlora.models import Llama, LlamaConfig
    >>> model = Llama.random(LlamaConfig(64, 16, 32, 1, 2, 1, 8))
    >>> engine = Engine(model, EngineConfig(rows=4, max_len=32, chunks=(8,), slots=1, rank=2))
    >>> [len(r.tokens) for r in engine.generate([Request((1, 2), 3), Request((4,), 5)])]
    [3, 5]
"""

from .adapters import AdapterStore as AdapterStore
from .adapters import SlotCache as SlotCache
from .config import EngineConfig as EngineConfig
from .core import Engine as Engine
from .errors import EngineStoppedError as EngineStoppedError
from .errors import QueueFullError as QueueFullError
from .errors import RequestTooLargeError as RequestTooLargeError
from .request import FINISH_REASONS as FINISH_REASONS
from .request import Handle as Handle
from .request import Request as Request
from .request import Result as Result
from .request import Token as Token
from .sampling import SamplingParams as SamplingParams
from .sampling import sample as sample
from .sampling import step_key as step_key
from .steps import compile_counts as compile_counts
