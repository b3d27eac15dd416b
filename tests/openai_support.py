"""A tiny model directory with a real tokenizer and chat template, adapters, and a live server.

Shared by tests/test_openai*.py, tests/test_serve_*.py and benchmarks/openai_load.py:
a byte-level BPE tokenizer trained here (multi-byte characters split across tokens), saved by
`transformers` the way real checkpoints are (`tokenizer.json`, `tokenizer_config.json` with a
chat template), a random Llama whose vocabulary is the tokenizer's, PEFT adapter directories
under an adapter root, and a server bound to 127.0.0.1 on a free port.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax

import jaxlora
from jaxlora.engine import Engine, EngineConfig
from jaxlora.models import Llama, LlamaConfig
from jaxlora.models.checkpoint import save_llama

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "hello world, the cat sat on the mat. snow ☃ falls on 東京 and café naïve ünï",
    "def f(x): return x + 1  # code ☃☃ <|user|> <|assistant|> <|system|>",
    "Bonjour à tous, ça va? Grüße aus München. 日本語のテキスト。",
]
SPECIAL = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
VOCAB = 320
NAMES = ("alpha", "beta", "gamma")


def build_tokenizer(directory: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """Train a byte-level BPE tokenizer and save it with transformers into `directory`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(directory)
    return fast


def tiny_adapter(model: Llama, i: int, rank: int = 4, boost: float = 30.0):
    """A random adapter that visibly changes greedy tokens of the random tiny model."""
    targets = [["q_proj", "v_proj"], "all-linear", ["gate_proj", "down_proj"]][i % 3]
    cfg = jaxlora.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
    )
    adapter = jaxlora.init_adapter(jax.random.key(100 + i), cfg, model.lora_shapes())
    return {p: dataclasses.replace(w, b=w.b * boost) for p, w in adapter.items()}


@dataclasses.dataclass
class World:
    """The model, its directory, the adapters and the adapter root of the tests."""

    model: Llama
    model_dir: Path
    root: Path
    adapters: dict[str, Any]


def build_world(tmp: Path) -> World:
    model_dir, root = tmp / "model", tmp / "adapters"
    root.mkdir(parents=True)
    model = Llama.random(LlamaConfig(VOCAB, 32, 64, 2, 4, 2, 8), seed=3)
    save_llama(model_dir, model)
    build_tokenizer(model_dir)
    adapters = {name: tiny_adapter(model, i) for i, name in enumerate(NAMES)}
    for name, adapter in adapters.items():
        jaxlora.io.save_peft(root / name, adapter)
    return World(model, model_dir, root, adapters)


def engine_for(world: World, **overrides: Any) -> Engine:
    """An engine with the world's adapters in its store (not started)."""
    cfg = EngineConfig(
        **{"rows": 8, "max_len": 96, "chunks": (16, 64), "slots": 4, "rank": 8, "stop_width": 8}
        | overrides
    )
    return Engine(world.model, cfg)


def service_for(world: World, engine: Engine, **kwargs: Any):
    """An `OpenAIService` over `engine` with the world's adapters registered."""
    from jaxlora.serve.openai import OpenAIService
    from jaxlora.serve.text import Text

    kwargs = {
        "model_name": "tiny",
        "adapter_root": world.root,
        "text": Text.from_directory(world.model_dir),
        "model_source": str(world.model_dir),
    } | kwargs
    service = OpenAIService(engine, **kwargs)
    for name, adapter in world.adapters.items():
        service.registry.add(name, adapter, str(world.root / name))
    return service


def start_server(service: Any):
    """The app on 127.0.0.1 (a free port), started: use as a context manager or `.stop()`."""
    from jaxlora.serve.openai import create_app
    from jaxlora.serve.runner import ServerThread

    return ServerThread(create_app(service)).start()


def http(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict | None = None,
    data: bytes | None = None,
    timeout: float = 120,
) -> tuple[int, dict, bytes]:
    """A raw request: `(status, headers, body bytes)`; JSON `body` unless `data` is given."""
    import json
    import urllib.error
    import urllib.request

    if data is None and body is not None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} | (headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def client(url: str, api_key: str = "none"):
    """The real `openai` client on the server, no retries (errors surface at once)."""
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
