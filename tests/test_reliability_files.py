"""Hostile adapter files (specs/reliability.md SW-SAFE-1..3).

Hypothesis builds adapter directories from random bytes and from mutations of a valid one
(truncation, flipped bytes, rewritten safetensors headers with huge shapes, wrong dtypes, bad
offsets and duplicate keys, JSON garbage in `adapter_config.json`) and feeds them to every
loader. Only `jaxlora.errors` exceptions may come out, within a time bound. Broken loaders
(one that trusts the files, one that unpickles) run through the same checks to show they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import struct
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

import jaxlora
from jaxlora.errors import AdapterFormatError, JaxLoraError, NonFiniteError
from jaxlora.io import load_peft, load_peft_adapter, save_peft
from jaxlora.numerics import check_finite

CONFIG, WEIGHTS, PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
#: per-example bound: far above a normal load (milliseconds); only a hang reaches it
HANG_SECONDS = 20


def _valid_adapter() -> dict[str, jaxlora.LoraWeights]:
    rng = np.random.default_rng(0)
    out = {}
    for path, (d_in, d_out, r) in {"model.q_proj": (6, 6, 2), "model.v_proj": (6, 4, 3)}.items():
        a = jnp.asarray(rng.normal(size=(d_in, r)), jnp.float32)
        b = jnp.asarray(rng.normal(size=(r, d_out)), jnp.float32)
        out[path] = jaxlora.LoraWeights(a, b, jnp.asarray(r / 2.0, jnp.float32))
    return out


def _valid_files() -> tuple[bytes, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        save_peft(Path(tmp) / "ad", _valid_adapter())
        return (Path(tmp) / "ad" / WEIGHTS).read_bytes(), (Path(tmp) / "ad" / CONFIG).read_bytes()


VALID_WEIGHTS, VALID_CONFIG = _valid_files()


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header_text: str, body: bytes, declared: int | None = None) -> bytes:
    raw = header_text.encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + body


# -- strategies ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["(", "[a-", "*", "all-linear", "q_proj", "LORA", ".*", "none"]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
CONFIG_FIELDS = [
    "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "peft_type", "use_dora", "bias", "modules_to_save", "init_lora_weights",
    "lora_dropout", "layers_to_transform", "unknown_field",
]  # fmt: skip


@st.composite
def config_bytes(draw) -> bytes:
    """adapter_config.json: valid, field-mutated, wholly random JSON, or not JSON at all."""
    kind = draw(st.sampled_from(["valid", "field", "pattern", "json", "bytes", "deep", "bigint"]))
    config = json.loads(VALID_CONFIG)
    if kind == "valid":
        return VALID_CONFIG
    if kind == "field":
        for _ in range(draw(st.integers(1, 3))):
            config[draw(st.sampled_from(CONFIG_FIELDS))] = draw(json_values)
        return json.dumps(config).encode()  # NaN / Infinity are written as JS literals
    if kind == "pattern":  # regex keys and values PEFT would feed to `re`
        field = draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))
        key = draw(st.sampled_from(["(", "q_proj", "model\\.v_proj", "[", ".*", "a{99999999}"]))
        config[field] = {key: draw(json_values)}
        return json.dumps(config).encode()
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.sampled_from([10, 200, 5000]))
        return b'{"r": ' + b"[" * depth + b"]" * depth + b"}"
    digits = draw(st.sampled_from([20, 5000, 50_000]))
    return b'{"r": 1' + b"0" * digits + b', "lora_alpha": 1}'


@st.composite
def header_mutation(draw) -> bytes:
    """A safetensors file whose JSON header was rewritten (the body kept as it was)."""
    header, body = split_safetensors(VALID_WEIGHTS)
    keys = [k for k in header if k != "__metadata__"]
    key = draw(st.sampled_from(keys))
    what = draw(
        st.sampled_from(["shape", "dtype", "offsets", "duplicate", "rename", "metadata", "length"])
    )
    declared = None
    if what == "shape":
        header[key]["shape"] = draw(
            st.sampled_from(
                [[2**31, 2**31], [2**62, 2], [2**64 - 1], [-1, 4], [0, 6], [], ["x", 2], [3, 2, 1]]
            )
        )
    elif what == "dtype":
        header[key]["dtype"] = draw(
            st.sampled_from(["F64", "F16", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "ZZ", 3, None])
        )
    elif what == "offsets":
        n = len(body)
        header[key]["data_offsets"] = draw(
            st.sampled_from([[0, 2**60], [10, 5], [0, n + 1], [n, n], ["a", 1], [0], None])
        )
    elif what == "metadata":
        header["__metadata__"] = draw(json_values)
    elif what == "rename":
        header[draw(st.text(max_size=40))] = header.pop(key)
    elif what == "length":
        declared = draw(st.sampled_from([0, 1, 7, 2**20, 2**40, 2**64 - 1]))
    text = json.dumps(header)
    if what == "duplicate":  # the same tensor name twice, with different offsets
        other = draw(st.sampled_from(keys))
        text = text[:-1] + f", {json.dumps(key)}: {json.dumps(header[other])}}}"
    return join_safetensors(text, body, declared)


@st.composite
def weights_bytes(draw) -> bytes:
    """adapter_model.safetensors: valid, random, truncated, bit-flipped or header-rewritten."""
    kind = draw(st.sampled_from(["valid", "random", "truncate", "flip", "header"]))
    if kind == "valid":
        return VALID_WEIGHTS
    if kind == "random":
        return draw(st.binary(max_size=256))
    if kind == "truncate":
        return VALID_WEIGHTS[: draw(st.integers(0, len(VALID_WEIGHTS) - 1))]
    if kind == "flip":
        data = bytearray(VALID_WEIGHTS)
        (n,) = struct.unpack("<Q", VALID_WEIGHTS[:8])
        for _ in range(draw(st.integers(1, 4))):
            # mostly the length field and the JSON header, sometimes the tensor bytes
            i = draw(st.integers(0, 8 + n - 1) | st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
        return bytes(data)
    return draw(header_mutation())


# -- the check ----------------------------------------------------------------------------------


class Hang(Exception):
    """A loader ran past HANG_SECONDS."""


@contextlib.contextmanager
def time_bound(seconds: int):
    def alarm(signum, frame):
        raise Hang(f"a loader ran for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_adapter_dir(root: Path, weights: bytes | None, config: bytes | None) -> Path:
    directory = root / "adapter"
    directory.mkdir()
    if weights is not None:
        (directory / WEIGHTS).write_bytes(weights)
    if config is not None:
        (directory / CONFIG).write_bytes(config)
    return directory


def assert_only_jaxlora_errors(
    loaders, directory: Path, *, seconds: int = HANG_SECONDS
) -> list[str]:
    """Run every loader on `directory`: a load either succeeds (giving well-formed adapters that
    `check_finite` accepts or refuses with NonFiniteError) or raises a JaxLoraError naming the
    directory. Returns the outcome of each loader (`"ok"` or the error class name)."""
    outcomes = []
    for loader in loaders:
        with warnings.catch_warnings(), time_bound(seconds):
            warnings.simplefilter("ignore")
            try:
                loaded = loader(directory)
            except JaxLoraError as e:
                assert str(directory) in str(e), f"{type(e).__name__} without the path: {e}"
                outcomes.append(type(e).__name__)
                continue
            except Hang:
                raise
            except BaseException as e:
                raise AssertionError(
                    f"{loader.__name__} raised {type(e).__name__} (not a JaxLoraError): {e!r}"
                ) from e
        adapters = loaded.values() if isinstance(loaded, jaxlora.AdapterBank) else [loaded[0]]
        for adapter in adapters:
            for w in adapter.values():
                assert w.a.ndim == 2 and w.b.ndim == 2 and w.a.shape[1] == w.b.shape[0]
                assert w.scale.shape == () and w.scale.dtype == jnp.float32
            with contextlib.suppress(NonFiniteError):
                check_finite(adapter)
        outcomes.append("ok")
    return outcomes


def load_adapter_only(directory):
    return load_peft_adapter(directory)


LOADERS = (load_peft, load_adapter_only)


def check_files(weights: bytes | None, config: bytes | None, **kwargs) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_adapter_dir(Path(tmp), weights, config)
        return assert_only_jaxlora_errors(LOADERS, directory, **kwargs)


@pytest.mark.clause("SW-SAFE-1")
@pytest.mark.clause("SW-SAFE-2")
@pytest.mark.timeout(900)
@given(weights=weights_bytes(), config=st.sampled_from([VALID_CONFIG]) | config_bytes())
def test_fuzzed_weights_files_raise_only_jaxlora_errors(weights, config):
    """SW-SAFE-1, SW-SAFE-2: random, truncated, bit-flipped and header-rewritten
    adapter_model.safetensors files (huge shapes, offsets past the end, unknown dtypes,
    duplicate names, wrong header lengths), next to a valid or fuzzed config: both loaders
    return well-formed adapters or raise a JaxLoraError naming the directory, in bounded time."""
    check_files(weights, config)


@pytest.mark.clause("SW-SAFE-1")
@pytest.mark.timeout(900)
@given(weights=st.sampled_from([VALID_WEIGHTS]) | weights_bytes(), config=config_bytes())
def test_fuzzed_config_files_raise_only_jaxlora_errors(weights, config):
    """SW-SAFE-1: fuzzed adapter_config.json (fields set to random JSON, regex patterns,
    wholly random JSON, random bytes, deep nesting, huge integers) next to a valid or fuzzed
    weights file: both loaders return well-formed adapters or raise a JaxLoraError naming the
    directory, in bounded time."""
    check_files(weights, config)


@pytest.mark.clause("SW-SAFE-1")
@pytest.mark.parametrize(
    "config",
    [
        pytest.param(b'{"r": 2, "lora_alpha": ' + b"[" * 5000 + b"]" * 5000 + b"}", id="deep"),
        pytest.param(b'{"r": 2, "lora_alpha": 1' + b"0" * 5000 + b"}", id="5000-digits"),
        pytest.param(b'{"r": 2, "target_modules": [1, 2]}', id="int-targets"),
        pytest.param(b'{"r": 2, "target_modules": 7}', id="int-target"),
    ],
)
def test_config_bugs_found_by_the_fuzzer(config):
    """SW-SAFE-1: the config inputs the fuzzer found that make a loader raise RecursionError,
    ValueError or TypeError instead of a JaxLoraError (fixed; kept as regressions)."""
    check_files(VALID_WEIGHTS, config)


def _redos_weights(module: str) -> bytes:
    rng = np.random.default_rng(1)
    tensors = {
        f"base_model.model.{module}.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
        f"base_model.model.{module}.lora_B.weight": rng.normal(size=(4, 2)).astype(np.float32),
    }
    return safetensors.numpy.save(tensors, {"format": "pt"})


@pytest.mark.clause("SW-SAFE-1")
@pytest.mark.parametrize("field", ["target_modules", "rank_pattern"])
def test_regex_from_a_file_cannot_hang_the_loader(field):
    """SW-SAFE-1: a config regex with catastrophic backtracking against a module name chosen
    by the same file must not hang the loader (bound: 2 s; a normal load takes milliseconds)."""
    pattern = "(a|aa)*c"
    value = pattern if field == "target_modules" else {pattern: 2}
    config = json.dumps({"r": 2, "lora_alpha": 2, field: value}).encode()
    check_files(_redos_weights("a" * 60), config, seconds=2)


@pytest.mark.clause("SW-SAFE-1")
@pytest.mark.parametrize("weights", [None, b"", VALID_WEIGHTS])
@pytest.mark.parametrize("config", [None, b"", VALID_CONFIG])
def test_missing_and_empty_files_raise_only_jaxlora_errors(weights, config):
    """SW-SAFE-1: missing or empty files give a JaxLoraError naming the directory; the valid
    pair loads."""
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = assert_only_jaxlora_errors(
            LOADERS, write_adapter_dir(Path(tmp), weights, config)
        )
    assert (outcomes == ["ok", "ok"]) == (weights == VALID_WEIGHTS and config == VALID_CONFIG)


def trusting_loader(directory):
    """BROKEN on purpose: trusts the files (no size checks, no error wrapping)."""
    config = json.loads((Path(directory) / CONFIG).read_text())
    tensors = safetensors.numpy.load_file(str(Path(directory) / WEIGHTS))
    return {k: v.reshape(config["r"], -1) for k, v in tensors.items()}, config


@pytest.mark.clause("SW-SAFE-1")
@pytest.mark.parametrize(
    "weights, config",
    [(VALID_WEIGHTS[:40], VALID_CONFIG), (VALID_WEIGHTS, b'{"r": "x"}'), (VALID_WEIGHTS, b"{}")],
    ids=["truncated", "string-rank", "empty-config"],
)
def test_the_check_catches_a_trusting_loader(weights, config):
    """SW-SAFE-1: the same check fails a loader that lets library errors escape."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_adapter_dir(Path(tmp), weights, config)
        assert_only_jaxlora_errors(LOADERS, directory)
        with pytest.raises(AssertionError, match="not a JaxLoraError"):
            assert_only_jaxlora_errors([trusting_loader], directory)


# -- SW-SAFE-2 ----------------------------------------------------------------------------------


@pytest.mark.clause("SW-SAFE-2")
@pytest.mark.parametrize(
    "shape, offsets, declared",
    [
        ([2**16, 2**16], [0, 2**34], None),  # 16 GiB of float32 declared in a tiny file
        ([2**40, 4], [0, 2**44], None),
        ([3, 2**50], [0, 24], None),  # shape and offsets disagree
        (None, None, 2**40),  # a 1 TiB JSON header declared
    ],
    ids=["16GiB-tensor", "16TiB-tensor", "shape-vs-offsets", "1TiB-header"],
)
def test_declared_sizes_beyond_the_file_are_refused_before_allocating(shape, offsets, declared):
    """SW-SAFE-2: a header declaring far more bytes than the file holds raises
    AdapterFormatError naming the file, and the load allocates less than 10 MB of Python/NumPy
    memory (tracemalloc), not the declared size."""
    header, body = split_safetensors(VALID_WEIGHTS)
    key = next(k for k in header if k != "__metadata__")
    if shape is not None:
        header[key] = {"dtype": "F32", "shape": shape, "data_offsets": offsets}
    data = join_safetensors(json.dumps(header), body, declared)
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_adapter_dir(Path(tmp), data, VALID_CONFIG)
        for loader in LOADERS:
            tracemalloc.start()
            try:
                with pytest.raises(AdapterFormatError) as info, time_bound(HANG_SECONDS):
                    loader(directory)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert WEIGHTS in str(info.value)
            assert peak < 10 * 2**20, f"{loader.__name__} allocated {peak} bytes"


# -- SW-SAFE-3 ----------------------------------------------------------------------------------


class MarkerPayload:
    """Unpickling this creates `path`: proof that code from a file ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_malicious_pickle(directory: Path, marker: Path, name: str = PICKLE) -> None:
    (directory / name).write_bytes(pickle.dumps(MarkerPayload(str(marker))))


def unpickling_loader(directory):
    """BROKEN on purpose: loads the PyTorch pickle like `torch.load(weights_only=False)`."""
    with open(Path(directory) / PICKLE, "rb") as f:
        return pickle.load(f)


@pytest.mark.clause("SW-SAFE-3")
@pytest.mark.parametrize("with_safetensors", [False, True])
def test_pickles_are_never_loaded(with_safetensors, monkeypatch):
    """SW-SAFE-3: a malicious adapter_model.bin (and pytorch_model.bin, and a pickle under the
    safetensors name) never runs: the marker file its unpickling would create never appears, no
    pickle entry point is called, a pickle-only directory raises AdapterFormatError saying how to
    convert, and with both files the safetensors weights load. An unpickling loader creates the
    marker."""
    called = []
    for name in ("load", "loads", "Unpickler"):
        real = getattr(pickle, name)
        monkeypatch.setattr(
            pickle, name, lambda *a, _r=real, _n=name, **k: called.append(_n) or _r(*a, **k)
        )
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "PWNED"
        directory = write_adapter_dir(
            Path(tmp), VALID_WEIGHTS if with_safetensors else None, VALID_CONFIG
        )
        write_malicious_pickle(directory, marker)
        write_malicious_pickle(directory, marker, "pytorch_model.bin")
        for loader in LOADERS:
            if with_safetensors:
                bank = load_peft(directory)
                for path, w in _valid_adapter().items():
                    np.testing.assert_array_equal(
                        np.asarray(bank["default"][path].a), np.asarray(w.a)
                    )
                loader(directory)
            else:
                with pytest.raises(AdapterFormatError, match="never unpickles") as info:
                    loader(directory)
                assert "safetensors" in str(info.value) and str(directory) in str(info.value)
        # a pickle disguised as safetensors is a format error, not code
        (directory / WEIGHTS).write_bytes(pickle.dumps(MarkerPayload(str(marker))))
        for loader in LOADERS:
            with pytest.raises(AdapterFormatError):
                loader(directory)
        assert not marker.exists() and called == []

        unpickling_loader(directory)  # the broken variant: proves the marker works
        assert marker.exists()


@pytest.mark.clause("SW-SAFE-1")
@pytest.mark.clause("SW-NUM-2")
def test_non_finite_weights_load_and_are_refused_by_check_finite():
    """SW-SAFE-1, SW-NUM-2: a well-formed file holding NaN loads (it is a valid file), and
    check_finite refuses it naming the adapter and the layer before any use."""
    tensors = safetensors.numpy.load(VALID_WEIGHTS)
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = tensors[key].copy()
    tensors[key][0, 0] = np.nan
    with tempfile.TemporaryDirectory() as tmp:
        directory = write_adapter_dir(
            Path(tmp), safetensors.numpy.save(tensors, {"format": "pt"}), VALID_CONFIG
        )
        bank = load_peft(directory)
    module = key.removeprefix("base_model.model.").removesuffix(".lora_B.weight")
    with pytest.raises(NonFiniteError, match=f"adapter 'default', layer '{module}'"):
        check_finite(bank)
    assert os.path.basename(str(directory)) == "adapter"
