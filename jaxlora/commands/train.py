"""`jaxlora train`: fine-tune LoRA adapters on a JSONL dataset, one or several at once.

Each dataset line is a JSON object with `text` (every token is a target) or `prompt` and
`completion` (only the completion is a target; the prompt is masked out of the loss), and an
optional `adapter` name (default "default"): lines with different names train different
adapters in the same mixed batches (`jaxlora.train.make_slots_step`; each adapter learns from
its own rows only, SW-TRAIN-5). The tokenizer is the model directory's `tokenizer.json`
(`tokenizers` package); the checkpoint's `eos_token_id` ends every completion.

`--out` is one directory, replaced atomically at every checkpoint (`--save-every` steps and at
the end): the adapters in PEFT's layout (`default` in the root, others in `<out>/<name>/`, with
their own rank, alpha and targets: `PeftModel.from_pretrained` loads them), plus
`trainer_state.json` / `trainer_state.safetensors` (optimizer state, step). `--resume`
continues from it and ends exactly where an uninterrupted run would (SW-CLI-3). A fraction of
each adapter's lines (`--eval-fraction`) is held out: its loss is reported at every checkpoint.
The same seed gives the same adapters.

Example:
    $ jaxlora train --model llama/ --data train.jsonl --out run/ --rank 8 --alpha 16 \\
          --targets q_proj,v_proj --steps 200 --batch 16 --lr 1e-3 --save-every 50
    $ jaxlora train ... --out run/ --steps 400 --resume      # 200 more steps
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ..errors import ConfigError

__all__ = ["DataError", "Example", "add_arguments", "main", "read_dataset", "run"]

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
#: The options a resumed run must share with the checkpoint (`--steps` may grow).
FIXED = (
    "rank",
    "alpha",
    "targets",
    "dropout",
    "lr",
    "weight_decay",
    "batch",
    "accumulate",
    "max_len",
    "seed",
    "eval_fraction",
)


class DataError(ConfigError):
    """A dataset line or option is malformed (exit status 2)."""


class Example(NamedTuple):
    prompt: list[int]
    completion: list[int]
    adapter: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="Llama checkpoint directory")
    parser.add_argument("--data", type=Path, required=True, help="JSONL dataset")
    parser.add_argument("--out", type=Path, required=True, help="output / checkpoint directory")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    parser.add_argument("--alpha", type=float, default=16.0, help="lora_alpha")
    parser.add_argument(
        "--targets", default="q_proj,v_proj", help="comma-separated module names or all-linear"
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="lora_dropout in training")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps in total")
    parser.add_argument("--batch", type=int, default=8, help="rows per step")
    parser.add_argument("--accumulate", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--max-len", type=int, default=256, help="tokens per row (truncated)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation, order, dropout")
    parser.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)"
    )
    parser.add_argument(
        "--eval-fraction", type=float, default=0.1, help="held-out share of each adapter's lines"
    )
    parser.add_argument("--resume", action="store_true", help="continue from --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def read_dataset(path: Path, tokenizer: Any, eos: int | None) -> list[Example]:
    """Every line as an `Example`; raises `DataError` naming the line."""
    examples = []
    for number, data in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path} line {number}"
        if not data.strip():
            continue
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{where}: not a UTF-8 JSON line ({err}).") from None
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}.")
        unknown = sorted(set(raw) - {"text", "prompt", "completion", "adapter"})
        if unknown:
            raise DataError(
                f"{where}: unknown fields {unknown}; a line has `text`, or `prompt` and "
                "`completion`, and optionally `adapter`."
            )
        name = raw.get("adapter", "default")
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: `adapter` must be a non-empty string, got {name!r}.")
        end = [] if eos is None else [eos]
        if "text" in raw and not ({"prompt", "completion"} & set(raw)):
            if not isinstance(raw["text"], str):
                raise DataError(f"{where}: `text` must be a string.")
            examples.append(Example([], tokenizer.encode(raw["text"]).ids + end, name))
        elif {"prompt", "completion"} <= set(raw) and "text" not in raw:
            if not isinstance(raw["prompt"], str) or not isinstance(raw["completion"], str):
                raise DataError(f"{where}: `prompt` and `completion` must be strings.")
            prompt = tokenizer.encode(raw["prompt"]).ids
            completion = tokenizer.encode(raw["completion"], add_special_tokens=False).ids
            examples.append(Example(prompt, completion + end, name))
        else:
            raise DataError(
                f"{where}: give either `text` or both `prompt` and `completion` (got "
                f"{sorted(raw)})."
            )
    if not examples:
        raise DataError(f"{path}: no examples.")
    return examples


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """`(train, held_out)` example indices: each adapter's lines shuffled with the seed, the
    first `fraction` of them held out (at least one when `fraction > 0`, never all)."""
    import numpy as np

    train, held = [], []
    for slot, name in enumerate(dict.fromkeys(e.adapter for e in examples)):
        idx = [i for i, e in enumerate(examples) if e.adapter == name]
        idx = [int(i) for i in np.random.default_rng([seed, 0, slot]).permutation(idx)]
        n = 0
        if fraction > 0 and len(idx) > 1:
            n = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        held += idx[:n]
        train += idx[n:]
    return sorted(train), sorted(held)


def _rows_of_step(step: int, batch: int, train: list[int], seed: int) -> list[int]:
    """The example indices of step `step`: consecutive slices of seeded per-epoch shuffles, so
    a step's rows depend only on (seed, step) and a resumed run sees the same rows."""
    import numpy as np

    first, last = divmod(step * batch, len(train))[0], divmod((step + 1) * batch - 1, len(train))[0]
    order = np.concatenate(
        [np.random.default_rng([seed, 1, e]).permutation(train) for e in range(first, last + 1)]
    )
    offset = step * batch - first * len(train)
    return [int(i) for i in order[offset : offset + batch]]


def _check_args(args: argparse.Namespace) -> None:
    for name in ("rank", "steps", "batch", "accumulate", "max_len"):
        value = getattr(args, name)
        if value < 1:
            raise DataError(f"--{name.replace('_', '-')} must be positive, got {value}.")
    if args.batch % args.accumulate:
        raise DataError(
            f"--batch {args.batch} must be a multiple of --accumulate {args.accumulate}."
        )
    if not 0 <= args.dropout < 1:
        raise DataError(f"--dropout must be in [0, 1), got {args.dropout}.")
    if not 0 <= args.eval_fraction < 1:
        raise DataError(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}.")
    if args.save_every < 0:
        raise DataError(f"--save-every must be >= 0, got {args.save_every}.")


def _tokenizer(model_dir: Path) -> Any:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise DataError(
            f"{model_dir} has no tokenizer.json; jaxlora train reads the tokenizer from the "
            "model directory (a `tokenizers` file, as Hugging Face checkpoints ship it)."
        )
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def _special_ids(model_dir: Path) -> tuple[int | None, int]:
    """`(eos, pad)` from the checkpoint's config.json (pad defaults to 0: it is masked)."""
    from ..io import MODEL_CONFIG_NAME

    config = json.loads((model_dir / MODEL_CONFIG_NAME).read_text())
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    pad = config.get("pad_token_id")
    return (eos if isinstance(eos, int) else None), (pad if isinstance(pad, int) else 0)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in FIXED}


class _Trainer(NamedTuple):
    """What one run holds fixed: the model, the adapters' names and initial bank, the step."""

    lm: Any
    names: tuple[str, ...]
    initial: Any
    step: Any
    evaluate: Any
    fresh: Any  # the initial SlotsState


def _trainer(args: argparse.Namespace, model: Any, names: tuple[str, ...]) -> _Trainer:
    import jax
    import optax

    import jaxlora
    from jaxlora import train
    from jaxlora.types import Routed, StackedBank

    lm = train.from_llama(model)
    targets = "all-linear" if args.targets == "all-linear" else args.targets.split(",")
    config = jaxlora.LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules=targets, lora_dropout=args.dropout
    )
    key = jax.random.key(args.seed)
    initial = jaxlora.AdapterBank(
        {
            name: jaxlora.init_adapter(jax.random.fold_in(key, i), config, lm.shapes)
            for i, name in enumerate(names)
        }
    )
    optimizer = optax.adamw(args.lr, weight_decay=args.weight_decay)
    step = train.make_slots_step(
        optimizer, lm.logits, dropout=args.dropout, accumulate=args.accumulate
    )

    @jax.jit
    def evaluate(trainable, frozen, base, batch):
        lora = Routed(StackedBank(train.join(trainable, frozen), names), batch.ids)
        logits = lm.logits(base, batch.tokens, lora)
        return train.group_sums(logits, batch.tokens, batch.loss_mask, batch.ids, len(names))

    fresh = train.init_slots(optimizer, jaxlora.stack(jaxlora.conform(initial)))
    return _Trainer(lm, names, initial, step, evaluate, fresh)


def _batch(examples: list[Example], rows: Sequence[int | None], length: int, pad: int, slot: dict):
    """Rows `rows` (None: an ignored padding row) as a `Batch` with slot ids and row seeds."""
    from jaxlora import train

    return train.make_batch(
        [([], []) if i is None else examples[i][:2] for i in rows],
        length,
        pad_id=pad,
        ids=[-1 if i is None else slot[examples[i].adapter] for i in rows],
        row_seeds=[0 if i is None else i for i in rows],
    )


def _eval_loss(t: _Trainer, state, examples, held, length, pad, batch_rows) -> dict[str, float]:
    import numpy as np

    if not held:
        return {}
    slot = {n: i for i, n in enumerate(t.names)}
    sums, counts = np.zeros(len(t.names)), np.zeros(len(t.names))
    for start in range(0, len(held), batch_rows):
        rows: list[int | None] = list(held[start : start + batch_rows])
        rows += [None] * (batch_rows - len(rows))
        s, c = t.evaluate(
            state.trainable, state.frozen, t.lm.base, _batch(examples, rows, length, pad, slot)
        )
        sums, counts = sums + np.asarray(s), counts + np.asarray(c)
    return {n: float(sums[i] / counts[i]) for i, n in enumerate(t.names) if counts[i] > 0}


def _save(out: Path, t: _Trainer, state, meta: dict[str, Any]) -> None:
    """The checkpoint, atomically: PEFT adapters (trimmed to their own rank) + trainer state."""
    import jax
    import numpy as np
    from safetensors.numpy import save_file

    import jaxlora
    from jaxlora import train
    from jaxlora.errors import CheckpointError
    from jaxlora.io._atomic import check_replaceable

    check_replaceable(
        out,
        lambda p: (p / STATE_JSON).is_file(),
        error=CheckpointError,
        what="a jaxlora train checkpoint",
        writer="jaxlora train",
    )
    trained = jaxlora.bank.unstack(train.stacked_of(state, t.names))
    bank = jaxlora.bank.trim(trained, like=t.initial)
    leaves = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(state))}
    with jaxlora.io.atomic_directory(out) as tmp:
        jaxlora.io.save_peft(tmp, bank)
        save_file(leaves, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _load(out: Path, fresh, meta: dict[str, Any]):
    """The checkpointed state (its tree structure from `fresh`) and metadata."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    saved = json.loads((out / STATE_JSON).read_text())
    diff = [
        f"{k}: checkpoint {saved['options'].get(k)!r}, now {meta['options'][k]!r}"
        for k in FIXED
        if saved["options"].get(k) != meta["options"][k]
    ]
    if saved.get("data_sha256") != meta["data_sha256"]:
        diff.append("the dataset file changed")
    if saved.get("names") != meta["names"]:
        diff.append(f"adapters: checkpoint {saved.get('names')}, now {meta['names']}")
    if diff:
        raise DataError(
            f"--resume: {out} was trained with other settings ({'; '.join(diff)}). Use the "
            "same options, or a new --out."
        )
    leaves, treedef = jax.tree.flatten(fresh)
    tensors = load_file(str(out / STATE_TENSORS))
    if len(tensors) != len(leaves):
        raise DataError(f"--resume: {out / STATE_TENSORS} does not match this run's state.")
    restored = []
    for i, ref in enumerate(leaves):
        value = tensors[f"leaf_{i:05d}"]
        if value.shape != ref.shape or value.dtype != ref.dtype:
            raise DataError(f"--resume: {out / STATE_TENSORS} does not match this run's state.")
        restored.append(jnp.asarray(value))
    return jax.tree.unflatten(treedef, restored), saved


def _fmt(losses: dict[str, float]) -> str:
    return ", ".join(f"{n} {v:.4f}" for n, v in losses.items()) or "-"


def _train(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from jaxlora.models import load_llama

    _check_args(args)
    model = load_llama(args.model)
    tokenizer = _tokenizer(args.model)
    eos, pad = _special_ids(args.model)
    examples = read_dataset(args.data, tokenizer, eos)
    vocab = model.config.vocab_size
    for i, e in enumerate(examples):
        bad = [t for t in (*e.prompt, *e.completion) if not 0 <= t < vocab]
        if bad:
            raise DataError(
                f"example {i}: token id {bad[0]} is outside the model's vocabulary [0, {vocab})."
            )
    names = tuple(dict.fromkeys(e.adapter for e in examples))
    train_rows, held = _split(examples, args.eval_fraction, args.seed)
    length = min(args.max_len, max(len(e.prompt) + len(e.completion) for e in examples))
    if length < 2:
        raise DataError("every example has fewer than 2 tokens: nothing to predict.")
    t = _trainer(args, model, names)
    meta: dict[str, Any] = {
        "format": 1,
        "step": 0,
        "names": list(names),
        "options": _options(args),
        "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
        "history": [],
    }
    state = t.fresh
    if args.resume and (args.out / STATE_JSON).is_file():
        state, meta = _load(args.out, t.fresh, meta)
    elif args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise DataError(
            f"{args.out} exists and is not empty; pass --resume to continue the run saved there, "
            "or choose a new --out."
        )
    slot = {n: i for i, n in enumerate(names)}
    key = jax.random.key(args.seed)
    bar = tqdm(
        total=args.steps, initial=min(meta["step"], args.steps), unit="step", desc="train",
        disable=args.quiet, file=sys.stderr,
    )  # fmt: skip
    last: dict[str, float] = {}

    def checkpoint(step: int) -> None:
        evaluated = _eval_loss(t, state, examples, held, length, pad, args.batch)
        meta["step"] = step
        meta["history"].append({"step": step, "train_loss": last, "eval_loss": evaluated})
        _save(args.out, t, state, meta)
        bar.write(f"step {step}: train loss {_fmt(last)}; eval loss {_fmt(evaluated)}")

    for k in range(meta["step"], args.steps):
        rows = _rows_of_step(k, args.batch, train_rows, args.seed)
        batch = _batch(examples, rows, length, pad, slot)
        state, metrics = t.step(state, t.lm.base, batch, jax.random.fold_in(key, k))
        loss, tokens = np.asarray(metrics["loss"]), np.asarray(metrics["tokens"])
        last = {n: float(loss[i]) for i, n in enumerate(names) if tokens[i] > 0}
        bar.set_postfix_str(_fmt(last))
        bar.update(1)
        if args.save_every and (k + 1) % args.save_every == 0 and k + 1 < args.steps:
            checkpoint(k + 1)
    if meta["step"] < args.steps or not (args.out / STATE_JSON).is_file():
        checkpoint(args.steps)
    bar.close()
    print(f"trained {', '.join(names)} for {args.steps} steps; wrote {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    from jaxlora.errors import JaxLoraError

    try:
        return _train(args)
    except (JaxLoraError, OSError) as err:
        print(f"jaxlora train: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxlora.commands.train ...` (the same as `jaxlora train ...`)."""
    parser = argparse.ArgumentParser(prog="jaxlora train", description=(__doc__ or "").strip())
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
