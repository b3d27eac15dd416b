"""Text for the server: tokenizer and chat template from the model directory (spec SW-TEXT-*).

`Text.from_directory(model_dir)` reads what `transformers`' `save_pretrained` writes, offline,
without importing `transformers`: `tokenizer.json` (the Hugging Face `tokenizers` library),
`tokenizer_config.json` (BOS/EOS and the other special tokens, the chat template) and, when
present, `chat_template.jinja` / `chat_template.json` and `generation_config.json` (EOS ids).
Chat templates are rendered with `jinja2` in a sandbox the way `transformers` renders them
(`trim_blocks`, `lstrip_blocks`, `loopcontrols`, `raise_exception`, `strftime_now`, a `tojson`
that keeps non-ASCII), so a template gives the same prompt here and in `apply_chat_template`.

Three pieces of streaming text:

- `Detokenizer`: token ids in, text pieces out, never a piece that ends inside a multi-byte
  character, special tokens hidden; the pieces joined equal `Text.decode(ids)` (SW-TEXT-2).
- `StopStrings`: holds back text that may be the start of a stop string, so a stop string
  split over several tokens is found and never streamed (SW-TEXT-3).

Example:
    >>> m = StopStrings(("END",))
    >>> m.feed("abc E"), m.feed("N"), m.feed("D tail")
    (('abc ', False), ('', False), ('', True))
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError

__all__ = ["Detokenizer", "StopStrings", "Text"]

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); fix or remove it.") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object.")
    return data


def _token_str(value: Any) -> str | None:
    """A special token as `tokenizer_config.json` writes it: a string or `{"content": ...}`."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """The default chat template: `chat_template.jinja`, `chat_template.json`, or the config."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    value = _read_json(directory / "chat_template.json").get("chat_template")
    if value is None:
        value = config.get("chat_template")
    if isinstance(value, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        value = named.get("default")
    return value if isinstance(value, str) else None


def _environment():
    """A sandboxed jinja2 environment with the helpers `transformers` gives chat templates."""
    import jinja2
    import jinja2.nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # `{% generation %}...{% endgeneration %}`: render the body
        tags = {"generation"}  # noqa: RUF012 (jinja2's declared type)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


@dataclasses.dataclass(frozen=True, eq=False)
class Text:
    """A tokenizer, its special tokens and chat template (see the module docstring).

    Arguments:
        tokenizer: a `tokenizers.Tokenizer`.
        special: the special tokens by role (`bos_token`, `eos_token`, ...), as strings.
        eos_ids: the ids that end generation by default (EOS of the tokenizer and of
            `generation_config.json`).
        chat_template: the jinja2 chat template, or None (chat completions are then refused).
    """

    tokenizer: Any
    special: Mapping[str, str] = dataclasses.field(default_factory=dict)
    eos_ids: tuple[int, ...] = ()
    chat_template: str | None = None

    @classmethod
    def from_directory(cls, directory: str | Path) -> Text:
        """Read the tokenizer files of a model directory (offline); `ConfigError` if none."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(
                f"{directory} has no tokenizer.json; save the tokenizer with "
                "`tokenizer.save_pretrained(dir)` (a fast tokenizer) next to the model."
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises plain Exceptions
            raise ConfigError(f"{path} cannot be read by `tokenizers` ({err}).") from None
        config = _read_json(directory / "tokenizer_config.json")
        special = {k: s for k in _SPECIAL_KEYS if (s := _token_str(config.get(k))) is not None}
        eos: list[int] = []
        if (
            "eos_token" in special
            and (i := tokenizer.token_to_id(special["eos_token"])) is not None
        ):
            eos.append(i)
        gen = _read_json(directory / "generation_config.json").get("eos_token_id")
        for i in gen if isinstance(gen, list) else [gen]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in eos:
                eos.append(i)
        return cls(tokenizer, special, tuple(eos), _chat_template(directory, config))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (with the tokenizer's BOS/post-processing when asked)."""
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens left out."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """The text of one token alone (may hold U+FFFD for part of a character)."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The prompt text the chat template makes of `messages` (SW-TEXT-1)."""
        import jinja2

        if self.chat_template is None:
            raise ConfigError(
                "this model directory has no chat template (tokenizer_config.json "
                "`chat_template` or chat_template.jinja); use /v1/completions with a prompt."
            )
        try:
            template = _environment().from_string(self.chat_template)
            return template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                **self.special,
            )
        except jinja2.TemplateError as err:
            raise ConfigError(f"the chat template refused the messages: {err}") from None

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered chat (the template writes BOS itself, as in HF)."""
        return self.encode(self.render_chat(messages, add_generation_prompt), False)

    def detokenizer(self) -> Detokenizer:
        return Detokenizer(self)


class Detokenizer:
    """Incremental decoding of one output: `step(id)` returns the new text (maybe "").

    A piece never ends inside a multi-byte character (the bytes are held until the character
    is complete); `flush()` returns what is still held at the end (U+FFFD for bytes that never
    formed a character). All pieces joined equal `text.decode(ids)` (spec SW-TEXT-2).
    """

    def __init__(self, text: Text):
        from tokenizers.decoders import DecodeStream

        self._text = text
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0

    def step(self, token: int) -> str:
        self._ids.append(token)
        piece = self._stream.step(self._text.tokenizer, token) or ""
        self._emitted += len(piece)
        return piece

    def flush(self) -> str:
        full = self._text.decode(self._ids)
        rest = full[self._emitted :]
        self._emitted = len(full)
        return rest


class StopStrings:
    """Finds stop strings in streamed text, even when one spans several pieces (SW-TEXT-3).

    `feed(piece)` returns `(text safe to emit, stopped)`: text that might begin a stop string
    is held back until it is known not to; at the stop string that completes first (the
    earliest end; at equal ends the earliest start) the text before it is returned and
    `stopped` is True (the stop string itself is never returned). `flush()` returns what is
    held at the end of the output.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped is not None:
            return "", True
        buffer = self._held + piece
        hits = [(i + len(s), i, s) for s in self.stops if (i := buffer.find(s)) >= 0]
        if hits:  # the stop string completed first (generation would have stopped there)
            _, index, stop = min(hits)
            self._held, self.stopped = "", stop
            return buffer[:index], True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(buffer)), keep, -1):
                if buffer.endswith(stop[:n]):
                    keep = n
                    break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held
