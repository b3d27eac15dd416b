"""The bench model and its adapters, built once per run for jaxlora and (optionally) PEFT.

With PEFT available, the base model is a random `transformers` Llama saved with
`save_pretrained` and loaded by `jaxlora.models.load_llama`, and adapters are PEFT adapters
(`init_lora_weights=False`) saved to disk and loaded by `jaxlora.io.load_peft`: both sides hold
the very same weights, so a benchmark can check that they compute the same logits before timing
them (spec SW-BENCH-2). Without PEFT (`--no-peft`), jaxlora builds random weights itself.

Example:
    >>> cfg = BenchConfig(hidden=32, intermediate=64, layers=1, heads=2, vocab=64, peft=False)
    >>> setup = Setup.build(cfg, root=None)
    >>> sorted(setup.model.lora_shapes())[0]
    'model.layers.0.mlp.down_proj'
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxlora
from jaxlora.models import Llama, LlamaConfig, load_llama

from ._harness import BenchConfig

__all__ = [
    "PROJECTIONS",
    "TOL_FLOAT32",
    "Setup",
    "agreement",
    "merged_model",
    "tol_check",
    "torch_forward",
]

#: LoRA targets: all 7 projections of every decoder layer.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: SW-TOL-1 for float32 outputs: `max|y - y*| <= tol * (1 + max|y*|)`.
TOL_FLOAT32 = 1e-4


def agreement(y: Any, reference: Any) -> float:
    """`max|y - ref| / (1 + max|ref|)`: compare it with `TOL_FLOAT32` (spec SW-TOL-1)."""
    y, reference = np.asarray(y, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(y - reference)) / (1.0 + np.max(np.abs(reference))))


def tol_check(value: float) -> dict[str, Any]:
    """A check entry of a report: `value` (an `agreement`) against SW-TOL-1 for float32."""
    return {"value": value, "limit": TOL_FLOAT32, "ok": bool(value <= TOL_FLOAT32)}


def merged_model(model: Llama, adapter: Mapping[str, jaxlora.LoraWeights]) -> Llama:
    """A new `Llama` whose projection kernels have `adapter` merged in (`jaxlora.merge` finds
    them by `Linear.lora_path`); `model` is unchanged."""
    return jaxlora.merge(model, adapter)


def _hf_fields(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.heads,
        "tie_word_embeddings": False,
        "pad_token_id": 0,
    }


def _lora_fields(rank: int) -> dict[str, Any]:
    return {"r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS)}


@dataclasses.dataclass
class Setup:
    """The jaxlora model, the checkpoint directory (PEFT mode) and the benchmark sizes."""

    config: BenchConfig
    model: Llama
    root: Path | None

    @classmethod
    def build(cls, config: BenchConfig, root: Path | None) -> Setup:
        """Build the bench model; with `config.peft`, via a `transformers` checkpoint in `root`."""
        if not config.peft:
            llama = LlamaConfig(
                config.vocab,
                config.hidden,
                config.intermediate,
                config.layers,
                config.heads,
                config.heads,
                config.head_dim,
            )
            return cls(config, Llama.random(llama, seed=config.seed), None)
        from tests.hf_fixtures import write_llama_checkpoint

        root = Path(tempfile.mkdtemp(prefix="jaxlora-bench-")) if root is None else root
        write_llama_checkpoint(root / "llama", seed=config.seed, **_hf_fields(config))
        return cls(config, load_llama(root / "llama"), root)

    @property
    def peft(self) -> bool:
        return self.root is not None

    def tokens(self, batch: int, seq: int, seed: int = 0) -> np.ndarray:
        """Random token ids `[batch, seq]` (int32), never the padding id 0."""
        rng = np.random.default_rng(self.config.seed + 1000 + seed)
        return rng.integers(1, self.config.vocab, (batch, seq), dtype=np.int32)

    def adapters(
        self, group: str, ranks: Mapping[str, int]
    ) -> tuple[jaxlora.AdapterBank, Any | None]:
        """`name -> rank` adapters on all 7 projections: `(jaxlora bank, PeftModel or None)`.

        In PEFT mode a fresh `transformers` base is wrapped (PEFT modifies it in place), the
        adapters are saved under `root/group` and jaxlora loads that directory.
        """
        shapes = self.model.lora_shapes()
        if not self.peft:
            bank = jaxlora.AdapterBank()
            for i, (name, rank) in enumerate(ranks.items()):
                cfg = jaxlora.LoraConfig(init_lora_weights=False, **_lora_fields(rank))
                key = jax.random.key(self.config.seed * 7919 + i + 1)
                bank = bank.add(name, jaxlora.init_adapter(key, cfg, shapes))
            return bank, None
        import torch
        import transformers

        from tests.hf_fixtures import write_peft_adapters

        torch.manual_seed(self.config.seed)
        base = transformers.LlamaForCausalLM.from_pretrained(self.root / "llama").eval()
        specs = {name: _lora_fields(rank) for name, rank in ranks.items()}
        peft_model = write_peft_adapters(base, self.root / group, specs, seed=self.config.seed)
        bank = jaxlora.io.load_peft(self.root / group, names=list(ranks), layer_shapes=shapes)
        return bank, peft_model.eval()

    def random_adapter_arrays(self, rank: int, seed: int) -> dict[str, jaxlora.LoraWeights]:
        """One adapter of random float32 factors, built in NumPy (fast, for many adapters)."""
        rng = np.random.default_rng(seed)
        adapter = {}
        for path, (d_in, d_out) in self.model.lora_shapes().items():
            a = rng.standard_normal((d_in, rank), np.float32) * np.float32(d_in**-0.5)
            b = rng.standard_normal((rank, d_out), np.float32) * np.float32(rank**-0.5)
            adapter[path] = jaxlora.LoraWeights(
                jax.numpy.asarray(a), jax.numpy.asarray(b), jax.numpy.asarray(2.0, np.float32)
            )
        return adapter


def torch_forward(peft_model: Any, tokens: np.ndarray, **kwargs: Any) -> Any:
    """PEFT/transformers logits of `tokens` (no grad); `kwargs` go to the model call."""
    import torch

    with torch.inference_mode():
        return peft_model(input_ids=torch.from_numpy(tokens).long(), **kwargs).logits
