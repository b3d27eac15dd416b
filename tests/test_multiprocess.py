"""Two real processes, one global mesh (specs/families.md §3): `tests/multiprocess_worker.py`
run twice on 127.0.0.1 with `jax.distributed.initialize` and gloo CPU collectives, compared
with this (single) process's run of the same checkpoint, adapters and batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import jaxlora
from jaxlora import reference
from jaxlora.generate import generate
from jaxlora.models import forward, load_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

WORKER = Path(__file__).with_name("multiprocess_worker.py")
#: Bounded time: both processes are killed after this many seconds.
TIMEOUT_S = 420
TOKENS = [[1, 2, 3, 4, 5], [0, 5, 6, 7, 8], [0, 0, 0, 8, 9], [10, 11, 12, 13, 14]]
MASK = [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1], [1, 1, 1, 1, 1]]
ROWS = ["ffn", None, "attn", "ffn"]
NEW_TOKENS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(checkpoint: Path, adapters: Path, out: Path) -> list[subprocess.Popen]:
    case = json.dumps({"tokens": TOKENS, "mask": MASK, "rows": ROWS, "new_tokens": NEW_TOKENS})
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    logs = [out / f"process{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        args = [str(i), str(port), str(checkpoint), str(adapters), str(out / f"process{i}.npz")]
        with open(logs[i], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), *args, case],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _wait_workers(procs: list[subprocess.Popen], out: Path, started: float) -> list[dict]:
    logs = [out / f"process{i}.log" for i in range(2)]
    deadline = started + TIMEOUT_S
    try:
        # A process that fails leaves the other waiting for it: stop both at the first failure.
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for i, p in enumerate(procs):
        tail = logs[i].read_text()[-4000:]
        assert p.returncode == 0, (
            f"process {i} exited {p.returncode} (limit {TIMEOUT_S} s):\n{tail}"
        )
    return [dict(np.load(out / f"process{i}.npz")) for i in range(2)]


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """A one-layer Qwen3 checkpoint (q/k norms, GQA) with two PEFT adapters, on disk."""
    root = tmp_path_factory.mktemp("multiprocess")
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,  # one layer: what is checked is the same, half the compile time
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(root / "model")
    torch.manual_seed(1)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"], init_lora_weights=False
        ),
        adapter_name="ffn",
    )
    model.add_adapter(
        "attn",
        peft.LoraConfig(
            r=2,
            lora_alpha=3,
            target_modules=["q_proj", "o_proj"],
            rank_pattern={"o_proj": 1},
            init_lora_weights=False,
        ),
    )
    model.save_pretrained(root / "adapters")
    return root


@pytest.mark.slow
@pytest.mark.clause("SW-TP-4", "SW-TP-5")
def test_two_processes_equal_one(peers, tmp_path):
    """SW-TP-4: two processes on 127.0.0.1 (jax.distributed, gloo) build global meshes over
    both processes' devices, load the checkpoint into shards no process holds whole, and give
    the single-process mixed-adapter logits (read back with to_host) and `generate`'s greedy
    tokens, with the data axis across the processes (the routed ids span both) and with the
    model axis across them (lora_layout="split-factors", SW-TP-5); both processes agree."""
    started = time.monotonic()
    procs = _start_workers(peers / "model", peers / "adapters", tmp_path)
    try:  # the single-process run while the two processes start and compile
        model = load_llama(peers / "model")
        bank = jaxlora.io.load_peft(peers / "adapters", layer_shapes=model.lora_shapes())
        assert set(bank.names) == {"ffn", "attn"}
        lora = jaxlora.stack(jaxlora.conform(bank)).route(ROWS)
        tokens, mask = np.asarray(TOKENS, np.int32), np.asarray(MASK, bool)
        want = np.asarray(forward(model, tokens, attention_mask=mask, lora=lora))
        prompts = [row[m].tolist() for row, m in zip(tokens, mask, strict=True)]
        want_tokens = generate(model, prompts, lora=lora, max_new_tokens=NEW_TOKENS).tokens
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        raise
    results = _wait_workers(procs, tmp_path, started)

    for r in results:
        assert (int(r["process_count"]), int(r["device_count"])) == (2, 4)
        assert int(r["local_device_count"]) == 2
        for tag in ("2x2", "1x4"):
            assert r[f"{tag}_mesh_processes"].tolist() == [0, 1], "the mesh is not global"
            assert not bool(r[f"{tag}_q_fully_addressable"])
            assert int(r[f"{tag}_q_shards"]) == 2
            assert not bool(r[f"{tag}_logits_addressable"])  # to_host gathered it
            # split over both processes where the data axis is (generate reads them back)
            assert bool(r[f"{tag}_ids_replicated"]) == (tag == "1x4")
            got = r[f"{tag}_logits"]
            real = mask
            ok, err, bound = reference.allclose(got[real], want[real].astype(np.float64), "float32")
            assert ok, f"{tag}: max error {err:.3g} > SW-TOL-1 bound {bound:.3g}"
            np.testing.assert_array_equal(r[f"{tag}_generated"], want_tokens, err_msg=tag)
    for tag in ("2x2", "1x4"):
        np.testing.assert_array_equal(results[0][f"{tag}_logits"], results[1][f"{tag}_logits"])
