"""Every request through the engine equals its single-request generation, bitwise (SW-ENGINE-2).

Hypothesis draws the decode steps per call (1 or 4), arrival iterations, prompt and generation
lengths, adapters (5 adapters through 2 device slots: resident or swapped in) and sampling
settings (greedy and seeded top-k / top-p sampling); the engine serves them together, and
each result must equal the same request run alone by a fresh engine of the same configuration,
tokens and log-probs, and, for greedy requests, the tokens of the full-forward reference.
"""

from __future__ import annotations

import dataclasses

import pytest
from engine_fixtures import (
    CONFIG,
    alone,
    greedy_reference,
    make_bank,
    make_model,
    run_schedule,
    store_engine,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxlora.engine import Request, SamplingParams

MODEL = make_model()
BANK = make_bank(MODEL)
ADAPTERS = [None, *BANK.names]

sampling = st.one_of(
    st.just(SamplingParams()),
    st.builds(
        SamplingParams,
        temperature=st.sampled_from([0.5, 1.0, 1.7]),
        top_k=st.sampled_from([0, 1, 5]),
        top_p=st.sampled_from([1.0, 0.8, 0.3]),
        seed=st.integers(0, 2**32 - 1),
    ),
)


@st.composite
def workload(draw):
    n = draw(st.integers(1, 7))
    arrivals = sorted(draw(st.lists(st.integers(0, 12), min_size=n, max_size=n)))
    out = []
    for arrival in arrivals:
        length = draw(st.integers(1, 30))
        tokens = tuple(draw(st.lists(st.integers(0, 63), min_size=length, max_size=length)))
        new = draw(st.integers(1, min(12, CONFIG.max_len - length)))
        stop = tuple(draw(st.lists(st.integers(0, 63), max_size=2)))
        out.append(
            (arrival, Request(tokens, new, draw(st.sampled_from(ADAPTERS)), draw(sampling), stop))
        )
    return out


@pytest.mark.clause("SW-ENGINE-1", "SW-ENGINE-2", "SW-ENGINE-4", "SW-ENGINE-7")
@settings(max_examples=10)
@given(workload(), st.sampled_from([1, 4]))
def test_every_request_equals_its_single_request_generation(arrivals, decode_steps):
    """SW-ENGINE-1, SW-ENGINE-2, SW-ENGINE-4, SW-ENGINE-7: decode steps per call, arrivals,
    lengths, adapters (resident or not) and sampling drawn; every result equals the request
    alone, bitwise."""
    config = dataclasses.replace(CONFIG, decode_steps=decode_steps)
    engine = store_engine(MODEL, BANK, config)
    handles = run_schedule(engine, arrivals)
    for (_, request), handle in zip(arrivals, handles, strict=True):
        result, single = handle.result(), alone(MODEL, BANK, request, config)
        assert (result.tokens, result.logprobs) == (single.tokens, single.logprobs), request
        assert result.finish_reason == single.finish_reason
        if request.sampling.temperature == 0:
            assert result.tokens == greedy_reference(MODEL, BANK, request)
