"""The OpenAI-compatible API with the real `openai` client on a real server (SW-OAI-*).

References are "offline generation": the same request alone on a separate engine with the same
model, adapters and sampling parameters (`Engine.generate`, the one generation core that
`jaxlora.generate` and the server share), never the server itself.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

import openai
from openai_support import NAMES, build_world, client, engine_for, http, service_for, start_server

from jaxlora.engine import Request, SamplingParams

PROMPT = "hello world, snow ☃"
CHAT = [{"role": "user", "content": "café naïve?"}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("openai"))


@pytest.fixture(scope="module")
def reference(world):
    """`(tokens, adapter, n, sampling) -> engine Result` of the request alone, offline."""
    engine = engine_for(world)
    for name, adapter in world.adapters.items():
        engine.add_adapter(name, adapter)
    memo = {}

    def run(tokens, adapter, n, sampling=None, stop=None):
        sampling = SamplingParams() if sampling is None else sampling
        stop = tuple(service_eos(world)) if stop is None else tuple(stop)
        key = (tuple(tokens), adapter, n, sampling, stop)
        if key not in memo:
            request = Request(
                tuple(tokens), n, adapter=adapter, sampling=sampling, stop_tokens=stop
            )
            memo[key] = engine.generate([request])[0]
        return memo[key]

    return run


def service_eos(world):
    from jaxlora.serve.text import Text

    return Text.from_directory(world.model_dir).eos_ids


@pytest.fixture(scope="module")
def served(world):
    engine = engine_for(world)
    engine.warmup()
    service = service_for(world, engine)
    server = start_server(service)
    yield server, service
    server.stop()


def _model(name):
    return "tiny" if name is None else name


@pytest.mark.clause("SW-OAI-1")
def test_models_lists_the_base_and_every_adapter_with_its_parent(served):
    """SW-OAI-1: /v1/models lists the base model and each adapter (`parent` = the base model, as
    vLLM), with its version; no file path for a caller who is not an admin."""
    server, service = served
    c = client(server.url)
    models = {m.id: m for m in c.models.list().data}
    assert list(models) == ["tiny", *sorted(NAMES)]
    assert models["tiny"].parent is None and models["tiny"].max_model_len == 96
    for name in NAMES:
        card = models[name]
        assert card.parent == "tiny" and card.object == "model" and card.root is None
        assert card.version == service.registry.get(name).version
    assert c.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError, match="the model `nope` does not exist"):
        c.models.retrieve("nope")


@pytest.mark.clause("SW-OAI-4")
@pytest.mark.parametrize("name", [None, "alpha", "gamma"])
def test_completion_and_chat_equal_offline_generation(served, reference, name):
    """SW-OAI-4: a greedy completion and a chat completion, on an adapter and on the base, give
    the tokens of offline generation; text = the tokens decoded (special tokens hidden);
    `max_tokens` and `usage` are exact."""
    server, service = served
    c, text = client(server.url), service.text
    out = c.completions.create(
        model=_model(name),
        prompt=PROMPT,
        max_tokens=7,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    choice = out.choices[0]
    expected = reference(text.encode(PROMPT), name, 7)
    assert choice.token_ids == expected.tokens and len(choice.token_ids) <= 7
    assert choice.text == text.decode(expected.tokens)
    assert choice.finish_reason == ("stop" if expected.finish_reason == "stop" else "length")
    assert out.usage.prompt_tokens == len(text.encode(PROMPT))
    assert (
        out.usage.completion_tokens
        == len(expected.tokens)
        == out.usage.total_tokens - (out.usage.prompt_tokens)
    )
    assert out.model == _model(name) and out.object == "text_completion"
    assert choice.adapter == (name or "base")

    chat = c.chat.completions.create(
        model=_model(name),
        messages=CHAT,
        max_tokens=5,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    expected = reference(text.encode_chat(CHAT), name, 5)
    assert chat.choices[0].token_ids == expected.tokens
    assert chat.choices[0].message.content == text.decode(expected.tokens)
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    assert chat.usage.prompt_tokens == len(text.encode_chat(CHAT))


@pytest.mark.clause("SW-OAI-5", "SW-OAI-3")
@pytest.mark.parametrize("chat", [False, True])
def test_streamed_chunks_join_to_the_non_streamed_text_and_tokens_equal_offline(
    served, reference, chat
):
    """SW-OAI-5, SW-OAI-3: streamed chunks joined equal the non-streamed answer of the same
    seeded request; the tokens equal offline generation with that seed; the last chunk carries
    `usage` (`stream_options.include_usage`)."""
    server, service = served
    c, text = client(server.url), service.text
    args = dict(
        model="beta",
        max_tokens=12,
        temperature=0.9,
        top_p=0.95,
        seed=11,
        extra_body={"top_k": 40, "return_token_ids": True},
    )
    if chat:
        create, prompt = c.chat.completions.create, text.encode_chat(CHAT)
        args["messages"] = CHAT
    else:
        create, prompt = c.completions.create, text.encode(PROMPT)
        args["prompt"] = PROMPT
    whole = create(**args)
    chunks = list(create(**args, stream=True, stream_options={"include_usage": True}))
    pieces = [ch.choices[0] for ch in chunks if ch.choices]
    joined = "".join((p.delta.content or "") if chat else p.text for p in pieces)
    streamed_ids = [t for p in pieces for t in (getattr(p, "token_ids", None) or [])]
    full = whole.choices[0]
    assert joined == (full.message.content if chat else full.text)
    expected = reference(prompt, "beta", 12, SamplingParams(0.9, 40, 0.95, 11))
    assert streamed_ids == full.token_ids == expected.tokens
    assert pieces[-1].finish_reason == full.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.tokens)
    if chat:
        assert pieces[0].delta.role == "assistant"


@pytest.mark.clause("SW-OAI-5")
def test_the_event_stream_is_openai_framed_and_ends_with_done(served):
    """SW-OAI-5: raw server-sent events: `data: {json}` frames in OpenAI's chunk format, the
    adapter version in a header, and a last `data: [DONE]`."""
    server, service = served
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    status, headers, raw = http(server.url + "/v1/completions", "POST", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert headers["x-adapter-version"] == service.registry.get("alpha").version
    frames = raw.decode().split("\n\n")
    assert frames[-2:] == ["data: [DONE]", ""]
    events = [json.loads(f.removeprefix("data: ")) for f in frames[:-2]]
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.clause("SW-OAI-3")
def test_n_choices_use_consecutive_seeds_and_top_k_1_is_greedy(served, reference):
    """SW-OAI-3: choice `i` of a request with seed `s` equals the single request with seed
    `s + i`; `top_k: 1` samples the greedy tokens."""
    server, service = served
    c, text = client(server.url), service.text
    out = c.completions.create(
        model="alpha",
        prompt=PROMPT,
        max_tokens=6,
        temperature=1.3,
        seed=5,
        n=3,
        extra_body={"return_token_ids": True},
    )
    prompt = text.encode(PROMPT)
    for i, choice in enumerate(out.choices):
        assert choice.index == i
        assert (
            choice.token_ids
            == reference(prompt, "alpha", 6, SamplingParams(1.3, 0, 1.0, 5 + i)).tokens
        )
    assert len({tuple(ch.token_ids) for ch in out.choices}) > 1
    top1 = c.completions.create(
        model="alpha",
        prompt=PROMPT,
        max_tokens=6,
        temperature=1.3,
        seed=5,
        extra_body={"top_k": 1, "return_token_ids": True},
    )
    assert top1.choices[0].token_ids == reference(prompt, "alpha", 6).tokens


@pytest.mark.clause("SW-OAI-4", "SW-TEXT-3")
def test_stop_strings_and_stop_token_ids(served, reference):
    """SW-OAI-4, SW-TEXT-3: a stop string ends the text before it (not shown, finish "stop"),
    even across tokens; a stop token id is kept and ends the output."""
    server, service = served
    c, text = client(server.url), service.text
    expected = reference(text.encode(PROMPT), "gamma", 12)
    full = text.decode(expected.tokens)
    cut = next(i for i in range(2, len(full)) if full[i - 2 : i].strip())  # a 2-char stop
    stop = full[cut - 2 : cut]
    out = c.completions.create(
        model="gamma", prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop, "never-seen"]
    )
    assert out.choices[0].text == full[: full.find(stop)] and out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text
    streamed = "".join(
        ch.choices[0].text
        for ch in c.completions.create(
            model="gamma", prompt=PROMPT, max_tokens=12, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == out.choices[0].text
    third = expected.tokens[2]
    out = c.completions.create(
        model="gamma",
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"stop_token_ids": [third], "return_token_ids": True},
    )
    ids = out.choices[0].token_ids
    assert ids == expected.tokens[: expected.tokens.index(third) + 1]
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.clause("SW-OAI-4")
def test_logprobs_are_the_chosen_tokens_log_probabilities(served, reference):
    """SW-OAI-4: `logprobs: 0` (completions) and `logprobs: true` (chat) give the chosen
    tokens' log-probabilities, equal to offline generation's."""
    server, service = served
    c, text = client(server.url), service.text
    out = c.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=5, temperature=0, logprobs=0
    )
    expected = reference(text.encode(PROMPT), "alpha", 5)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert lp.tokens == [text.token_text(t) for t in expected.tokens]
    assert lp.text_offset[0] == 0
    chat = c.chat.completions.create(
        model="alpha", messages=CHAT, max_tokens=4, temperature=0, logprobs=True
    )
    expected = reference(text.encode_chat(CHAT), "alpha", 4)
    got = [e.logprob for e in chat.choices[0].logprobs.content]
    assert got == pytest.approx(expected.logprobs, abs=1e-5)


@pytest.mark.clause("SW-OAI-2")
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"logit_bias": {"5": 3}}, "logit_bias"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"logprobs": 2}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"made_up_field": 1}, "made_up_field"),
        ({"n": 0}, "n"),
        ({"max_tokens": 500}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"temperature": -1}, "temperature"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unsupported_or_invalid_fields_are_400_naming_the_field(served, extra, named):
    """SW-OAI-2: a field the server does not implement (with a value other than its neutral
    one), an unknown field, or an invalid value is a 400 whose message and `param` name it."""
    server, _ = served
    c = client(server.url)
    with pytest.raises(openai.BadRequestError, match=f"`{named}") as err:
        c.completions.create(model="alpha", prompt=PROMPT, max_tokens=3, extra_body=extra)
    assert err.value.body["param"] == named and err.value.body["code"] == 400
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "echo": False}
    out = c.completions.create(
        model="alpha", prompt=PROMPT, max_tokens=3, temperature=0, extra_body=neutral
    )
    assert len(out.choices) == 1


@pytest.mark.clause("SW-OAI-2")
def test_chat_refuses_tools_and_non_text_parts(served):
    """SW-OAI-2: chat fields the server does not implement are 400s naming them."""
    server, _ = served
    c = client(server.url)
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    with pytest.raises(openai.BadRequestError, match="`tools`"):
        c.chat.completions.create(model="alpha", messages=CHAT, tools=[tool])
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        c.chat.completions.create(
            model="alpha",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ],
        )
    with pytest.raises(openai.BadRequestError, match="`top_logprobs` = 3"):
        c.chat.completions.create(model="alpha", messages=CHAT, logprobs=True, top_logprobs=3)
    with pytest.raises(openai.BadRequestError, match=r"`messages\[0\].role` = 'robot'"):
        c.chat.completions.create(model="alpha", messages=[{"role": "robot", "content": "x"}])


@pytest.mark.clause("SW-OAI-7")
def test_errors_map_to_the_client_exception_types(served):
    """SW-OAI-7: 404 unknown model -> NotFoundError; 400 -> BadRequestError; 413 body too large
    -> APIStatusError 413; every error body has OpenAI's shape."""
    server, service = served
    c = client(server.url)
    with pytest.raises(openai.NotFoundError) as err:
        c.completions.create(model="unknown-adapter", prompt=PROMPT)
    assert err.value.body == {
        "message": "the model `unknown-adapter` does not exist.",
        "type": "not_found_error",
        "param": "model",
        "code": 404,
    }
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="alpha", prompt=[[99999]])
    with pytest.raises(openai.APIStatusError) as err:
        c.completions.create(model="alpha", prompt="x" * (service.max_body_bytes + 1))
    assert err.value.status_code == 413
    status, _, raw = http(
        server.url + "/v1/completions",
        "POST",
        data=b'{"model": ',
        headers={"Content-Type": "application/json"},
    )
    assert status == 400 and "not valid JSON" in json.loads(raw)["error"]["message"]
