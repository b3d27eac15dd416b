"""`jaxlora demo`: train a few small adapters on character tasks, then run them together.

What it shows, on a tiny random Llama and a character-level tokenizer built locally with the
`tokenizers` package (no download):

1. training: one adapter per task (`TASKS`: upper-casing, rot13, atbash), each with its own
   rank and targets, all trained *at once*, every row of each mixed batch on its own adapter
   (`jaxlora.train.make_slots_step`), then trimmed back to their own rank and targets and saved
   in PEFT's format (`jaxlora.io.save_peft`). The model, tokenizer and adapters are cached
   under `$JAXLORA_CACHE` (default `~/.cache/jaxlora/tasks`); later runs load them (`--retrain`
   trains again).
2. serving: the saved adapters are loaded back and one mixed batch runs every held-out prompt
   on every adapter and on the base model (one compilation), printing each row's prompt and
   the text the model wrote.

The tasks map each character on its own, so the model works as a character transducer: the
sequence is `<bos> x1 y1 x2 y2 ...`, the model reads a prompt character `x_i` and writes
`y_i`; training masks the prompt characters out of the loss. The run fails (exit 1) when an
adapter gets fewer than 90% of the held-out characters right, or the mixed batch compiled more
than once.

Example:
    $ jaxlora demo
    $ python -m jaxlora.commands.demo_tasks --retrain
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import string
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "MODEL",
    "TASKS",
    "add_arguments",
    "char_tokenizer",
    "demo_files",
    "main",
    "run",
    "transduce",
]

SPECIAL = ("<pad>", "<bos>", "<eos>", "<unk>")
CHARS = " " + string.ascii_lowercase + string.ascii_uppercase + ".,!?"


def _atbash(text: str) -> str:
    return "".join(chr(219 - ord(c)) if "a" <= c <= "z" else c for c in text)


#: task -> (the character map, the adapter's LoRA config fields).
TASKS: dict[str, tuple[Callable[[str], str], dict[str, Any]]] = {
    "upper": (
        str.upper,
        {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    ),
    "rot13": (
        lambda s: codecs.encode(s, "rot13"),
        {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
    ),
    "atbash": (
        _atbash,
        {"r": 6, "lora_alpha": 12, "target_modules": ["v_proj", "o_proj", "down_proj"]},
    ),
}

#: The tiny Llama (`jaxlora.models.LlamaConfig` fields).
MODEL: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}

#: Training settings (part of the cache key: changing them retrains).
TRAINING: dict[str, Any] = {"steps": 150, "rows_per_task": 16, "lr": 1e-2, "seed": 0}
#: Standard deviation of the random base weights.
INIT_STD = 0.1
MAX_CHARS = 12
HELD_OUT = ("hello world", "jax lora", "mixed batch", "one step")
PASS = 0.9


def cache_dir() -> Path:
    """`$JAXLORA_CACHE/tasks`, default `~/.cache/jaxlora/tasks`."""
    env = os.environ.get("JAXLORA_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "jaxlora") / "tasks"


def char_tokenizer():
    """A character-level `tokenizers.Tokenizer`: one token per character of `CHARS`.

    Example:
        >>> tok = char_tokenizer()
        >>> tok.encode("hi!").ids, tok.decode(tok.encode("hi!").ids)
        ([1, 12, 13, 59], 'hi!')
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate([*SPECIAL, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIAL))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return tok


def _chars(tok, text: str) -> list[int]:
    ids = tok.encode(text, add_special_tokens=False).ids
    if len(ids) != len(text):
        raise ValueError(f"{text!r} has characters outside the demo's alphabet {CHARS!r}.")
    return ids


def _rows(tok, prompts: Sequence[str], tasks: Sequence[str | None]):
    """Token rows `<bos> x1 y1 x2 y2 ...` (`y` the task's answer; 0 for the base model) and
    the loss mask (1 on the `y`s)."""
    import numpy as np

    length = 2 * MAX_CHARS + 1
    tokens = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for i, (text, task) in enumerate(zip(prompts, tasks, strict=True)):
        x = _chars(tok, text[:MAX_CHARS])
        y = _chars(tok, TASKS[task][0](text[:MAX_CHARS])) if task else [0] * len(x)
        tokens[i, 0] = 1
        tokens[i, 1 : 2 * len(x) + 1 : 2] = x
        tokens[i, 2 : 2 * len(x) + 2 : 2] = y
        mask[i, 2 : 2 * len(x) + 2 : 2] = 1
    return tokens, mask


def _random_text(rng, count: int) -> list[str]:
    letters = list(string.ascii_lowercase + " ")
    return ["".join(rng.choice(letters, int(rng.integers(3, MAX_CHARS + 1)))) for _ in range(count)]


def _train(model, tok, log: Callable[[str], None]):
    """The trained adapters (an `AdapterBank`, each with its own rank and targets)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jaxlora
    from jaxlora import train

    lm = train.from_llama(model)
    bank = jaxlora.AdapterBank()
    for i, (name, (_, fields)) in enumerate(TASKS.items()):
        key = jax.random.fold_in(jax.random.key(TRAINING["seed"]), i)
        bank = bank.add(name, jaxlora.init_adapter(key, jaxlora.LoraConfig(**fields), lm.shapes))
    stacked = jaxlora.stack(jaxlora.conform(bank))
    opt = optax.adam(TRAINING["lr"])
    state = train.init_slots(opt, stacked)
    step = train.make_slots_step(opt, lm.logits)
    rng = np.random.default_rng(TRAINING["seed"])
    per, names = TRAINING["rows_per_task"], list(TASKS)
    start = time.perf_counter()
    for k in range(TRAINING["steps"]):
        prompts = _random_text(rng, per * len(names))
        tasks = [names[i // per] for i in range(len(prompts))]
        tokens, mask = _rows(tok, prompts, tasks)
        ids = np.repeat(np.arange(len(names), dtype=np.int32), per)
        batch = train.Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ids))
        state, metrics = step(state, lm.base, batch, jax.random.key(k))
        if (k + 1) % 50 == 0 or k == 0:
            losses = ", ".join(
                f"{n} {v:.3f}" for n, v in zip(names, np.asarray(metrics["loss"]), strict=True)
            )
            log(f"  step {k + 1:>4}  loss {losses}  ({time.perf_counter() - start:.1f} s)")
    trained = jaxlora.bank.unstack(train.stacked_of(state, stacked.names))
    return jaxlora.bank.trim(trained, like=bank)


def demo_files(root: Path, retrain: bool = False, log: Callable[[str], None] = print):
    """The cached (or newly trained) demo files under `root`: `(model_dir, adapter_dir)`.

    `model_dir` holds the Llama checkpoint and `tokenizer.json`; `adapter_dir` one PEFT adapter
    per task. Everything is written atomically; a settings change retrains.
    """
    import jax.numpy as jnp
    import numpy as np

    import jaxlora
    from jaxlora.models import Llama, LlamaConfig
    from jaxlora.models.checkpoint import save_llama
    from jaxlora.models.llama import expected_tensor_shapes

    model_dir, adapter_dir, stamp = root / "llama", root / "adapters", root / "demo.json"
    settings = json.dumps({"model": MODEL, "training": TRAINING, "tasks": list(TASKS)})
    if not retrain and stamp.is_file() and stamp.read_text() == settings:
        return model_dir, adapter_dir
    config = LlamaConfig(**MODEL)
    rng = np.random.default_rng(0)
    tensors = {
        name: jnp.asarray(
            INIT_STD * rng.standard_normal(shape) + float(name.endswith("norm.weight")),
            jnp.float32,
        )
        for name, shape in expected_tensor_shapes(config).items()
    }
    model = Llama(config, tensors)
    tok = char_tokenizer()
    log(f"training {len(TASKS)} adapters in one mixed batch ({TRAINING['steps']} steps) ...")
    bank = _train(model, tok, log)
    save_llama(model_dir, model, config_fields={"bos_token_id": 1, "eos_token_id": 2})
    jaxlora.io.atomic_write(model_dir / "tokenizer.json", tok.to_str())
    jaxlora.io.save_peft(adapter_dir, bank)
    jaxlora.io.atomic_write(stamp, settings)
    return model_dir, adapter_dir


def transduce(model, lora, tokens):
    """Greedy character transduction of a whole batch in one jitted call: for each `x_i`, the
    model writes `y_i` (its argmax), which the next position then reads.

    Returns `(tokens with the y positions filled, the jitted function)` (its `_cache_size()`
    counts compilations).
    """
    import jax
    import jax.numpy as jnp

    from jaxlora import train

    lm = train.from_llama(model)

    @jax.jit
    def run(base, tokens, lora):
        def write(i, toks):
            logits = lm.logits(base, toks, lora)
            y = jnp.argmax(logits[:, 2 * i + 1], axis=-1).astype(toks.dtype)
            return toks.at[:, 2 * i + 2].set(y)

        return jax.lax.fori_loop(0, (tokens.shape[1] - 1) // 2, write, tokens)

    return run(lm.base, jnp.asarray(tokens), lora), run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retrain", action="store_true", help="train again, ignoring the cache")
    parser.add_argument("--cache-dir", type=Path, default=None, help="default $JAXLORA_CACHE/tasks")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    import jaxlora
    from jaxlora.models import load_llama

    root = args.cache_dir or cache_dir()
    model_dir, adapter_dir = demo_files(root, retrain=args.retrain)
    model = load_llama(model_dir)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    bank = jaxlora.io.load_peft(adapter_dir, layer_shapes=model.lora_shapes())
    stacked = jaxlora.stack(jaxlora.conform(bank))
    rng = np.random.default_rng(12345)
    prompts = [*HELD_OUT, *_random_text(rng, 4)]
    names: list[str | None] = [*(n for n in TASKS if n in bank), None]
    rows = [(p, n) for p in prompts for n in names]
    tokens, _ = _rows(tok, [p for p, _ in rows], [None] * len(rows))
    start = time.perf_counter()
    out, fn = transduce(model, stacked.route([n for _, n in rows]), tokens)
    out = np.asarray(out)
    seconds = time.perf_counter() - start
    print(f"model {model_dir}  adapters {adapter_dir}")
    for name in bank.names:
        cfg = json.loads((adapter_dir / name / jaxlora.io.ADAPTER_CONFIG_NAME).read_text())
        print(
            f"  {name:<7} r={cfg['r']} lora_alpha={cfg['lora_alpha']} "
            f"targets={len(cfg['target_modules'])} layers"
        )
    print(f"{'row':>3}  {'adapter':<8} {'prompt':<14} {'model wrote':<14} {'expected':<14} ok")
    right = {n: [0, 0] for n in bank.names}
    for i, (prompt, name) in enumerate(rows):
        text = prompt[:MAX_CHARS]
        wrote = "".join(
            tok.id_to_token(int(t)) or "·" if int(t) >= len(SPECIAL) else "·"
            for t in out[i, 2 : 2 * len(text) + 2 : 2]
        )
        want = TASKS[name][0](text) if name else ""
        mark = ""
        if name:
            hits = sum(a == b for a, b in zip(wrote, want, strict=True))
            right[name][0] += hits
            right[name][1] += len(want)
            mark = f"{hits}/{len(want)}"
        print(f"{i:>3}  {name or '(base)':<8} {text!r:<14} {wrote!r:<14} {want!r:<14} {mark}")
    compiles = fn._cache_size()  # pyright: ignore[reportAttributeAccessIssue]
    print(
        f"one mixed batch: {len(rows)} rows on {len(names)} adapters (base included), "
        f"{seconds:.2f} s, compiled {compiles} time(s)"
    )
    failed = [n for n, (hit, total) in right.items() if hit < PASS * total]
    for name, (hit, total) in right.items():
        print(f"  {name:<7} {hit}/{total} characters right ({hit / total:.0%})")
    if failed or compiles != 1:
        print(
            f"FAILED: {', '.join(failed) or 'compilation count'} below {PASS:.0%} of the held-out "
            "characters (or the mixed batch compiled more than once).",
            file=sys.stderr,
        )
        return 1
    print(f"every adapter got at least {PASS:.0%} of the held-out characters right")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxlora.commands.demo_tasks [--retrain] [--cache-dir DIR]`."""
    parser = argparse.ArgumentParser(
        prog="jaxlora demo", description=(__doc__ or "").split("\n")[0]
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
