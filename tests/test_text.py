"""Tokenizer, chat template, streaming detokenization and stop strings (SW-TEXT-*), checked
against `transformers` (the peer) on a tokenizer saved the way real checkpoints are."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from openai_support import CHAT_TEMPLATE, build_tokenizer

from jaxlora.errors import ConfigError
from jaxlora.serve.text import StopStrings, Text

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "snow ☃ in 東京?"},
    {"role": "assistant", "content": "café"},
    {"role": "user", "content": "naïve ünï"},
]
TEXTS = ["hello world", "snow ☃ falls on 東京", "café naïve ünï", "日本語のテキスト。", "x"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    fast = build_tokenizer(directory)
    return directory, fast, Text.from_directory(directory)


@pytest.mark.clause("SW-TEXT-1")
def test_tokenizer_and_chat_template_match_transformers(saved):
    """SW-TEXT-1: encoding and the chat template equal `transformers` on the same directory."""
    _, fast, text = saved
    assert text.chat_template == CHAT_TEMPLATE
    assert text.special["bos_token"] == "<s>" and text.eos_ids == (fast.eos_token_id,)
    for s in TEXTS:
        assert text.encode(s) == fast(s)["input_ids"], s
        assert text.decode(text.encode(s)) == fast.decode(
            fast(s)["input_ids"], skip_special_tokens=True
        )
    for gen in (True, False):
        expected = fast.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
        assert text.render_chat(MESSAGES, gen) == expected
        ids = fast.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert text.encode_chat(MESSAGES, gen) == list(ids)


@pytest.mark.clause("SW-TEXT-1")
def test_chat_template_files_and_errors(saved, tmp_path):
    """SW-TEXT-1: chat_template.jinja wins over the config; no template or a template that
    raises gives a ConfigError naming the fix; no tokenizer.json is refused."""
    directory, _, _ = saved
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(ConfigError, match="the chat template refused the messages: no system"):
        Text.from_directory(tmp_path).render_chat(MESSAGES)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"has no chat template .* use /v1/completions"):
        Text.from_directory(tmp_path).render_chat(MESSAGES)
    with pytest.raises(ConfigError, match=r"has no tokenizer\.json; save the tokenizer"):
        Text.from_directory(tmp_path / "missing")


@pytest.mark.clause("SW-TEXT-2")
@settings(max_examples=15)
@given(st.lists(st.sampled_from(TEXTS), min_size=1, max_size=4), st.data())
def test_streamed_pieces_never_split_a_character_and_join_to_the_decoded_text(saved, parts, data):
    """SW-TEXT-2: per-token pieces never end inside a multi-byte character, special tokens are
    hidden, and the pieces joined equal the decoded text."""
    _, fast, text = saved
    ids = []
    for p in parts:
        ids += text.encode(p, add_special_tokens=False)
        ids.append(data.draw(st.sampled_from([1, 3, 4, fast.unk_token_id or 2])))  # specials
    detok = text.detokenizer()
    pieces = [detok.step(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text.decode(ids) == fast.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces)
    assert not any(s in "".join(pieces) for s in ("<s>", "</s>", "<|user|>", "<|assistant|>"))


@pytest.mark.clause("SW-TEXT-2")
def test_a_character_split_over_tokens_is_held_then_flushed(saved):
    """SW-TEXT-2: bytes of one character in separate tokens give "" until the last one; bytes
    that never complete a character come out (as U+FFFD) only at the end."""
    _, _, text = saved
    byte_ids = [text.tokenizer.token_to_id(t) for t in ("âĺ", "ĥ")]  # ☃ = e2 98 83
    if None in byte_ids:  # the trainer merged differently: use the single-byte tokens
        byte_ids = [text.tokenizer.token_to_id(t) for t in ("â", "ĺ", "ĥ")]
    detok = text.detokenizer()
    pieces = [detok.step(i) for i in byte_ids]
    assert pieces[:-1] == [""] * (len(byte_ids) - 1) and pieces[-1] == "☃"
    detok = text.detokenizer()
    assert detok.step(byte_ids[0]) == "" and detok.flush() == "\ufffd"


@pytest.mark.clause("SW-TEXT-3")
@settings(max_examples=20)
@given(
    st.text(alphabet="abXY☃", max_size=30),
    st.lists(st.text(alphabet="abXY☃", min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(st.integers(1, 5), min_size=1, max_size=30),
)
def test_stop_strings_spanning_pieces_are_found_and_never_streamed(text, stops, cuts):
    """SW-TEXT-3: however the text is cut into pieces, the emitted text is the text before the
    stop string that completes first (earliest end, then earliest start; none: all of it)."""
    pieces, at = [], 0
    for c in cuts:
        pieces.append(text[at : at + c])
        at += c
    pieces.append(text[at:])
    matcher, out, stopped = StopStrings(stops), "", False
    for p in pieces:
        emitted, stopped = matcher.feed(p)
        out += emitted
        if stopped:
            break
    out += matcher.flush()
    hits = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    expected = text[: min(hits)[1]] if hits else text
    assert out == expected and stopped == bool(hits)
    assert matcher.stopped in (None, *stops)
