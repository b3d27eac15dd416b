"""Shared pieces of the engine tests: a tiny Llama, adapters that visibly change its tokens,
and a greedy reference that runs the full forward once per generated token."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np

import jaxlora
from jaxlora.engine import Engine, EngineConfig, Request
from jaxlora.models import Llama, LlamaConfig, forward

#: vocab 64, hidden 32, intermediate 64, 2 layers, 4 heads, 2 kv heads, head_dim 8
MODEL = LlamaConfig(64, 32, 64, 2, 4, 2, 8)
#: the engine configuration most tests share (so they share compiled executables)
CONFIG = EngineConfig(rows=4, max_len=48, chunks=(4, 16), prefill_tokens=16, slots=2, rank=4)
TARGETS = [["q_proj", "v_proj"], "all-linear", ["up_proj"], ["o_proj", "down_proj"], ["k_proj"]]


def make_model(seed: int = 5) -> Llama:
    return Llama.random(MODEL, seed=seed)


def make_bank(model: Llama, n: int = 5) -> jaxlora.AdapterBank:
    """`n` adapters `a0..` of ranks 2..4 on different targets; B scaled up so that each one
    changes the greedy tokens of the random model."""
    bank = jaxlora.AdapterBank()
    for i in range(n):
        cfg = jaxlora.LoraConfig(
            r=2 + i % 3, lora_alpha=8, target_modules=TARGETS[i % 5], init_lora_weights=False
        )
        adapter = jaxlora.init_adapter(jax.random.key(i), cfg, model.lora_shapes())
        bank = bank.add(
            f"a{i}", {p: dataclasses.replace(w, b=w.b * 30) for p, w in adapter.items()}
        )
    return bank


def store_engine(model, bank, config: EngineConfig = CONFIG, **kwargs) -> Engine:
    """An engine whose host store holds every adapter of `bank`."""
    return Engine(model, config, adapters={n: bank[n] for n in bank}, **kwargs)


def alone(model, bank, request: Request, config: EngineConfig = CONFIG):
    """`request` run by a fresh engine of the same configuration, with nothing else."""
    return store_engine(model, bank, config).generate([request])[0]


def greedy_reference(model, bank, request: Request) -> list[int]:
    """Greedy tokens from the full forward over prompt + tokens so far (no cache, no engine)."""
    lora = (
        None if request.adapter is None else jaxlora.select(jaxlora.conform(bank), request.adapter)
    )
    tokens, out = list(request.tokens), []
    for _ in range(request.max_new_tokens):
        logits = np.asarray(forward(model, np.asarray([tokens]), lora=lora))[0, -1]
        out.append(int(np.argmax(logits)))
        tokens.append(out[-1])
        if out[-1] in request.stop_tokens:
            break
    return out


def run_schedule(engine: Engine, arrivals: list[tuple[int, Request]]):
    """Submit each request at its iteration (`arrivals` sorted by iteration), step until all end;
    returns the handles in the order of `arrivals`."""
    handles, pending, it = [], list(arrivals), 0
    while pending or engine.busy():
        while pending and pending[0][0] <= it:
            handles.append(engine.submit(pending.pop(0)[1]))
        engine.step()
        it += 1
    return handles


@contextlib.contextmanager
def count_compiles():
    """Count every XLA compilation inside the block (`jax.monitoring`): `n[0]` after it."""
    counter = [0]

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            counter[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counter
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
