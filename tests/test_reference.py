"""The oracle itself (`jaxlora.reference`), checked against direct definitions, brute force,
PEFT's own matching functions and the spec text; and it must not import JAX."""

from __future__ import annotations

import ast
import itertools
import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jaxlora import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE_FILE = ROOT / "jaxlora" / "reference.py"
SPEC = ROOT / "specs" / "switching.md"


@pytest.mark.clause("SW-TOL-1")
def test_reference_imports_no_jax():
    """SW-TOL-1 (the oracle is independent of the implementation): reference.py imports only
    the standard library and NumPy, by its syntax tree and when loaded alone."""
    tree = ast.parse(REFERENCE_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "reference.py must not import from jaxlora (relative import)"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "math", "re", "collections", "dataclasses", "numpy", "typing"}
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ref', {str(REFERENCE_FILE)!r})\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['ref'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.clause("SW-TOL-1")
def test_tolerances_are_the_spec_text():
    """SW-TOL-1: the oracle's tolerance table is the one written in the spec."""
    text = SPEC.read_text()
    clause = text[text.index("### SW-TOL-1") :]
    found = dict(
        (dtype, float(value)) for value, dtype in re.findall(r"([0-9.]+e-\d+) \((\w+)\)", clause)
    )
    assert found == reference.TOLERANCE


@pytest.mark.clause("SW-TOL-1")
def test_allclose_is_the_spec_formula():
    """SW-TOL-1: `max|y - y*| <= tol(d) * (1 + max|y*|)`; NaN/Inf and shape mismatches fail."""
    y_ref = np.array([[2.0, -4.0]])
    allowed = 1e-4 * (1 + 4.0)
    assert reference.allclose(y_ref + np.array([[allowed * 0.999, 0.0]]), y_ref, "float32")[0]
    ok, err, got_allowed = reference.allclose(
        y_ref + np.array([[0.0, allowed * 1.01]]), y_ref, "float32"
    )
    assert not ok and err == pytest.approx(allowed * 1.01) and got_allowed == allowed
    assert not reference.allclose(np.array([[np.nan, -4.0]]), y_ref, "float32")[0]
    assert not reference.allclose(np.array([2.0, -4.0]), y_ref, "float32")[0]
    assert reference.allclose(y_ref + 0.2, y_ref, "bfloat16")[0]


@pytest.mark.clause("SW-SCALE-1", "SW-SCALE-2")
@given(r=st.integers(1, 64), alpha=st.floats(-64, 64, allow_nan=False))
def test_scale_is_the_definition(r, alpha):
    """SW-SCALE-1, SW-SCALE-2: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    assert reference.scale(alpha, r) == alpha / r
    assert reference.scale(alpha, r, use_rslora=True) == alpha / math.sqrt(r)
    ad = reference.RefAdapter(r=r, lora_alpha=alpha, weights={}, use_rslora=True)
    assert ad.scale_at("any.path") == alpha / math.sqrt(r)


PEFT_PATHS = [
    "model.decoder.layers.0.encoder_attn.k_proj",
    "model.decoder.layers.1.encoder_attn.k_proj",
    "model.layers.10.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "blocks.0.q",
    "q",
    "xq",
]
PEFT_KEYS = [
    "^model.decoder.layers.0.encoder_attn.k_proj",  # the example in PEFT's LoraConfig docs
    "model.decoder.layers.0.encoder_attn.k_proj",
    "k_proj",
    "q_proj",
    r"layers\.1\..*",
    "1.self_attn.q_proj",
    "q",
    r"self_attn\.(q|v)_proj",
]


@pytest.mark.clause("SW-SCALE-3")
@given(keys=st.lists(st.sampled_from(PEFT_KEYS), max_size=4, unique=True))
def test_pattern_resolution_is_peft_get_pattern_key(keys):
    """SW-SCALE-3: for every path, the oracle picks the value of the same key as PEFT's own
    `get_pattern_key` (first key in order whose `(.*\\.)?(key)$` re.match-es), or the default."""
    from peft.utils.other import get_pattern_key

    pattern = {k: i for i, k in enumerate(keys)}
    for path in PEFT_PATHS:
        peft_key = get_pattern_key(keys, path)
        want = pattern.get(peft_key, "default")
        assert reference.resolve(pattern, path, "default") == want, (keys, path)


@pytest.mark.clause("SW-TARGET-1")
@given(
    targets=st.one_of(
        st.lists(
            st.sampled_from(["q_proj", "k_proj", "q", "self_attn.q_proj", "layers"]),
            min_size=1,
            max_size=3,
        ),
        st.sampled_from([r".*\.q_proj", r"model\.layers\.1\..*", r"q", r".*(k|q)_proj"]),
    ),
    exclude=st.sampled_from([None, ["k_proj"], r".*layers\.1\..*", ["layers.10.self_attn.q_proj"]]),
)
def test_target_selection_is_peft_check_target_module_exists(targets, exclude):
    """SW-TARGET-1: the oracle targets exactly the paths PEFT's `check_target_module_exists`
    accepts (list: equal or `.name` suffix; string: full regex match; exclude_modules alike)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=targets, exclude_modules=exclude)
    want = [
        p
        for p in PEFT_PATHS
        if (hit := check_target_module_exists(config, p))
        and type(hit).__name__ != "_ExcludedModule"
    ]
    assert reference.targets(targets, PEFT_PATHS, exclude) == want


@pytest.mark.clause("SW-FORWARD-1", "SW-NOTATION-1")
def test_layer_forward_is_the_sum_written_out():
    """SW-FORWARD-1, SW-NOTATION-1: `y[b, o] = sum_i x[b, i] W[i, o] + c[o] +
    sum_k s_k sum_j (sum_i x[b, i] A_k[i, j]) B_k[j, o]`, by explicit loops."""
    rng = np.random.default_rng(0)
    x, w, c = rng.normal(size=(2, 3)), rng.normal(size=(3, 4)), rng.normal(size=4)
    terms = [
        (rng.normal(size=(3, r)), rng.normal(size=(r, 4)), s) for r, s in ((1, 0.5), (2, -3.0))
    ]
    want = np.zeros((2, 4))
    for b, o in itertools.product(range(2), range(4)):
        want[b, o] = sum(x[b, i] * w[i, o] for i in range(3)) + c[o]
        for a, bb, s in terms:
            r = a.shape[1]
            want[b, o] += s * sum(
                sum(x[b, i] * a[i, j] for i in range(3)) * bb[j, o] for j in range(r)
            )
    np.testing.assert_allclose(reference.layer_forward(x, w, c, terms), want, rtol=1e-12)


@pytest.mark.clause("SW-MODEL-1", "SW-FORWARD-2")
def test_chain_is_tanh_between_layers_and_skips_untargeted():
    """SW-MODEL-1, SW-FORWARD-2: tanh after every layer but the last; an adapter changes only the
    layers it targets."""
    rng = np.random.default_rng(1)
    layers = [(f"l{i}", rng.normal(size=(3, 3)), rng.normal(size=3)) for i in range(3)]
    x = rng.normal(size=(2, 3))
    h = np.tanh(x @ layers[0][1] + layers[0][2])
    h = np.tanh(h @ layers[1][1] + layers[1][2])
    a, b = rng.normal(size=(3, 2)), rng.normal(size=(2, 3))
    ad = reference.RefAdapter(r=2, lora_alpha=3.0, weights={"l2": (a, b)})
    want = h @ layers[2][1] + layers[2][2] + 1.5 * (h @ a) @ b
    np.testing.assert_allclose(reference.chain_forward(layers, x, [ad]), want, rtol=1e-12)
    base = h @ layers[2][1] + layers[2][2]
    np.testing.assert_allclose(reference.chain_forward(layers, x, []), base, rtol=1e-12)
    with pytest.raises(ValueError, match="3 row names for a batch of 2"):
        reference.mixed_forward(layers, x, [None, None, None])


def two_adapters(rng, r1=2, r2=2):
    return [
        reference.RefAdapter(
            r=r, lora_alpha=al, weights={"l0": (rng.normal(size=(5, r)), rng.normal(size=(r, 4)))}
        )
        for r, al in ((r1, 4.0), (r2, 1.0))
    ]


@pytest.mark.clause("SW-COMBINE-1", "SW-COMBINE-2")
def test_cat_is_exact_and_linear_has_peft_cross_terms():
    """SW-COMBINE-1, SW-COMBINE-2: cat's product is `sum w_i s_i A_i B_i`; linear's product
    is `c1 A1 B1 + c2 A2 B2 + sqrt(c1 c2) (A1 B2 + A2 B1)` for positive `c_i = w_i s_i`."""
    rng = np.random.default_rng(2)
    ads, ws = two_adapters(rng, 2, 3), [0.5, 2.0]
    cat = reference.combine_cat(ads, ws)
    (a, b), s = cat.weights["l0"], cat.scale_at("l0")
    (a1, b1), (a2, b2) = ads[0].weights["l0"], ads[1].weights["l0"]
    c1, c2 = 0.5 * 4.0 / 2, 2.0 * 1.0 / 3
    assert a.shape == (5, 5) and s == 1.0
    np.testing.assert_allclose(a @ b, c1 * a1 @ b1 + c2 * a2 @ b2, rtol=1e-12)
    ads = two_adapters(rng)
    lin = reference.combine_linear(ads, ws)
    (a, b), ((a1, b1), (a2, b2)) = lin.weights["l0"], (ads[0].weights["l0"], ads[1].weights["l0"])
    c1, c2 = 0.5 * 2.0, 2.0 * 0.5
    cross = math.sqrt(c1 * c2) * (a1 @ b2 + a2 @ b1)
    np.testing.assert_allclose(a @ b, c1 * a1 @ b1 + c2 * a2 @ b2 + cross, rtol=1e-12)
    with pytest.raises(ValueError, match="equal ranks"):
        reference.combine_linear(two_adapters(rng, 2, 3), ws)


@pytest.mark.clause("SW-COMBINE-3")
@pytest.mark.parametrize("k", [1, 2, 3])
def test_svd_beats_every_other_rank_k_candidate(k):
    """SW-COMBINE-3: the svd combination reaches `sqrt(sum_{j>k} sigma_j^2)` and no random
    rank-k product (nor a perturbation of the result) does better."""
    rng = np.random.default_rng(3)
    ads = two_adapters(rng, 2, 3)
    svd = reference.combine_svd(ads, [1.0, -1.0], rank=k)
    d = sum(
        w * ad.scale_at("l0") * ad.weights["l0"][0] @ ad.weights["l0"][1]
        for ad, w in zip(ads, [1.0, -1.0], strict=True)
    )
    a, b = svd.weights["l0"]
    assert a.shape[1] == k
    best = np.linalg.norm(d - a @ b)
    sigma = np.linalg.svd(d, compute_uv=False)
    assert best == pytest.approx(math.sqrt(np.sum(sigma[k:] ** 2)), rel=1e-9, abs=1e-12)
    for _ in range(200):
        other = rng.normal(size=(5, k)) @ rng.normal(size=(k, 4))
        assert np.linalg.norm(d - other) >= best - 1e-12
        nudged = (a + 1e-3 * rng.normal(size=a.shape)) @ (b + 1e-3 * rng.normal(size=b.shape))
        assert np.linalg.norm(d - nudged) >= best - 1e-12
    assert reference.combine_svd(ads, [1.0, -1.0]).weights["l0"][0].shape[1] == 3  # default k


@pytest.mark.clause("SW-MERGE-1", "SW-MERGE-3")
def test_merge_then_unmerge_round_trips_in_float64():
    """SW-MERGE-1, SW-MERGE-3: merge adds `s A B` to the kernel, unmerge subtracts it; the input
    layers are not modified."""
    rng = np.random.default_rng(4)
    layers = [("l0", rng.normal(size=(5, 4)), rng.normal(size=4))]
    keep = [(p, w.copy(), c.copy()) for p, w, c in layers]
    ads = two_adapters(rng)
    merged = reference.merge(layers, ads)
    want = layers[0][1] + sum(
        ad.scale_at("l0") * ad.weights["l0"][0] @ ad.weights["l0"][1] for ad in ads
    )
    np.testing.assert_allclose(merged[0][1], want, rtol=1e-12)
    back = reference.unmerge(merged, ads)
    np.testing.assert_allclose(back[0][1], layers[0][1], rtol=1e-12, atol=1e-12)
    assert all(np.array_equal(w, w0) for (_, w, _), (_, w0, _) in zip(layers, keep, strict=True))
