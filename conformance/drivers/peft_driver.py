"""`PeftDriver`: Hugging Face PEFT (PyTorch) behind the Driver protocol (spec SW-IO-11).

The spec's chain (SW-MODEL-1) is built as nested torch modules (`blocks.0.q` is the
`nn.Linear` at `model.blocks[0].q`, weight = `W^T`) and wrapped with PEFT. Every operation maps
to PEFT's public API, so the suite reports what PEFT does, deviations included:

| protocol            | PEFT                                                              |
|---------------------|-------------------------------------------------------------------|
| add_adapter         | `get_peft_model` (first) / `add_adapter`, `init_lora_weights=False`,|
|                     | then `lora_A = A^T`, `lora_B = B^T` copied in                     |
| set_active(name)    | `PeftModel.set_adapter(name)` (also for a one-name list)          |
| set_active([a, b])  | `model.base_model.set_adapter([a, b])`                            |
| set_active(None)    | forward inside `with model.disable_adapter():` (PEFT has no       |
|                     | "no active adapter" state; the driver keeps this one flag)        |
| forward_mixed       | `model(x, adapter_names=[...])`, `"__base__"` for None rows       |
| merge / unmerge     | `merge_adapter(safe_merge=...)` / `unmerge_adapter()`             |
| delete_adapter      | `delete_adapter`                                                  |
| combine             | `add_weighted_adapter(..., combination_type=method)`              |

The driver itself only refuses A/B shapes that do not fit a layer (before PEFT is called;
PEFT's own state-dict loader would raise after injecting the adapter).

Importing this module without torch or peft raises `ImportError` (the CLI reports a skip).

Example:
    >>> import numpy as np
    >>> from jaxlora.reference import RefAdapter
    >>> d = PeftDriver()
    >>> d.build([("l0", np.eye(2), np.zeros(2))], "float64")
    >>> d.add_adapter("a", RefAdapter(1, 2.0, {"l0": (np.ones((2, 1)), np.ones((1, 2)))}))
    >>> d.set_active("a")
    >>> d.forward(np.ones((1, 2))).tolist()
    [[5.0, 5.0]]
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Sequence

import numpy as np

try:
    import peft
    import torch
    from torch import nn
except ImportError as e:  # pragma: no cover - exercised only without torch/peft
    raise ImportError(
        f"the 'peft' conformance driver needs torch and peft ({e}); install them with "
        "`pip install torch peft` (see pyproject.toml's [test] extra)."
    ) from e

from jaxlora.reference import RefAdapter

__all__ = ["PeftDriver", "TorchChain", "peft_lora_config"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


class TorchChain(nn.Module):
    """SW-MODEL-1 in PyTorch: `nn.Linear` layers at dotted paths, `tanh` between them.

    Arguments:
        layers: `(path, W [in, out], c [out])` per layer, in order.
        dtype: a torch dtype.
    """

    def __init__(self, layers, dtype: torch.dtype = torch.float32):
        super().__init__()
        self._chain_paths = [path for path, _, _ in layers]
        for path, w, c in layers:
            *parents, leaf = path.split(".")
            node: nn.Module = self
            for part in parents:
                if part not in node._modules:
                    node.add_module(part, nn.Module())
                node = node._modules[part]
            w = np.asarray(w)
            linear = nn.Linear(w.shape[0], w.shape[1], dtype=dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.as_tensor(np.ascontiguousarray(w.T), dtype=dtype))
                linear.bias.copy_(torch.as_tensor(np.asarray(c), dtype=dtype))
            node.add_module(leaf, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        last = len(self._chain_paths) - 1
        for i, path in enumerate(self._chain_paths):
            h = self.get_submodule(path)(h)
            if i < last:
                h = torch.tanh(h)
        return h


def _targets(paths: list[str], model_paths: Sequence[str]) -> list[str] | str:
    """`target_modules` for exactly `paths`: the list of paths (PEFT's usual form), unless
    another layer's path ends in "." + one of them (the list rule would target it too,
    SW-TARGET-1); then one regex that fullmatch-es exactly these paths."""
    collide = any(q != p and q.endswith("." + p) for p in paths for q in model_paths)
    return "|".join(re.escape(p) for p in paths) if collide else paths


def peft_lora_config(adapter: RefAdapter, model_paths: Sequence[str] = ()) -> peft.LoraConfig:
    """The PEFT `LoraConfig` that gives every layer of `adapter` its rank and scale.

    The adapter targets exactly the paths it has weights for among the model's `model_paths`.
    A combination result (`fixed_scale`) becomes per-path rank/alpha patterns.
    """
    paths = list(adapter.weights)
    if adapter.fixed_scale is None:
        r, alpha, rslora = int(adapter.r), adapter.lora_alpha, bool(adapter.use_rslora)
        ranks, alphas = dict(adapter.rank_pattern), dict(adapter.alpha_pattern)
    else:
        ranks = {re.escape(p): int(np.shape(a)[1]) for p, (a, _) in adapter.weights.items()}
        alphas = {k: adapter.fixed_scale * v for k, v in ranks.items()}
        r, alpha, rslora = max(ranks.values()), adapter.fixed_scale * max(ranks.values()), False
    return peft.LoraConfig(
        r=r,
        lora_alpha=alpha,
        use_rslora=rslora,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        target_modules=_targets(paths, model_paths),
        lora_dropout=0.0,
        init_lora_weights=False,
    )


def _lora_layer(model: nn.Module, path: str):
    module = model.get_submodule(path) if path else model
    return module if hasattr(module, "lora_A") else None


class PeftDriver:
    """PEFT on PyTorch (CPU) as a conformance-suite driver."""

    name = "peft"
    capabilities = frozenset(
        {
            "multi_active",
            "mixed",
            "merge",
            "safe_merge",
            "combine_cat",
            "combine_linear",
            "combine_svd",
            "rslora",
            "patterns",
            "target_selection",
            "dtype:float64",
            "dtype:float32",
            "dtype:bfloat16",
        }
    )

    def __init__(self) -> None:
        self._base: TorchChain | None = None
        self._model: peft.PeftModel | None = None
        self._dtype = torch.float32
        self._disabled = True  # the protocol's "no active adapter" (see the module docstring)

    def versions(self) -> dict[str, str]:
        return {"peft": peft.__version__, "torch": torch.__version__}

    # -- model and bank ----------------------------------------------------------------------
    def build(self, layers, dtype: str) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"the peft driver supports {sorted(_DTYPES)}, not {dtype!r}.")
        self._dtype = _DTYPES[dtype]
        self._base = TorchChain(layers, self._dtype).eval()
        self._layer_shapes = {p: np.shape(w) for p, w, _ in layers}
        self._model = None
        self._disabled = True

    def _check_shapes(self, name: str, adapter: RefAdapter) -> None:
        for path, (a, b) in adapter.weights.items():
            io = self._layer_shapes.get(path)
            rank = adapter.rank_at(path) if adapter.fixed_scale is None else np.shape(a)[1]
            if io is not None and (np.shape(a), np.shape(b)) != ((io[0], rank), (rank, io[1])):
                raise ValueError(
                    f"adapter {name!r}, layer {path!r}: A{np.shape(a)} B{np.shape(b)} do not fit "
                    f"the layer {io} with rank {rank}."
                )

    def add_adapter(self, name: str, adapter: RefAdapter) -> None:
        self._check_shapes(name, adapter)
        config = peft_lora_config(adapter, list(self._layer_shapes))
        if self._model is None:
            self._model = peft.get_peft_model(self._base, config, adapter_name=name).eval()
        else:
            self._model.add_adapter(name, config)
        with torch.no_grad():
            for path, (a, b) in adapter.weights.items():
                layer = _lora_layer(self._model.base_model.model, path)
                if layer is None or name not in layer.lora_A:
                    continue  # PEFT did not target this path; it silently skips it
                a_t = torch.as_tensor(np.ascontiguousarray(np.asarray(a).T), dtype=self._dtype)
                b_t = torch.as_tensor(np.ascontiguousarray(np.asarray(b).T), dtype=self._dtype)
                layer.lora_A[name].weight.copy_(a_t)
                layer.lora_B[name].weight.copy_(b_t)
        self._model.eval()

    def _require_model(self, name: str) -> peft.PeftModel:
        if self._model is None:
            raise ValueError(f"Adapter {name} not found (the model has no adapters).")
        return self._model

    def delete_adapter(self, name: str) -> None:
        self._require_model(name).delete_adapter(name)

    def set_active(self, active: str | Sequence[str] | None) -> None:
        if active is None or (not isinstance(active, str) and len(active) == 0):
            self._disabled = True
            return
        if isinstance(active, str) or len(active) == 1:
            name = active if isinstance(active, str) else active[0]
            self._require_model(name).set_adapter(name)
        else:
            self._require_model(active[0]).base_model.set_adapter(list(active))
        self._disabled = False

    # -- forward -----------------------------------------------------------------------------
    def _run(self, x: np.ndarray, **kwargs) -> np.ndarray:
        x_t = torch.as_tensor(np.asarray(x), dtype=self._dtype)
        model = self._base if self._model is None else self._model
        with torch.no_grad():
            y = model(x_t, **kwargs)
        return y.to(torch.float64).numpy() if y.dtype == torch.bfloat16 else y.numpy()

    def forward(self, x: np.ndarray) -> np.ndarray:
        disabled = self._disabled and self._model is not None
        with self._model.disable_adapter() if disabled else contextlib.nullcontext():
            return self._run(x)

    def forward_mixed(self, x: np.ndarray, rows) -> np.ndarray:
        names = ["__base__" if r is None else r for r in rows]
        if self._model is None:
            if any(r is not None for r in rows):
                raise ValueError(f"Trying to infer with non-existing adapter(s): {names}")
            if len(rows) != np.shape(x)[0]:
                raise ValueError(f"{len(rows)} adapter names for {np.shape(x)[0]} rows")
            return self._run(x)
        return self._run(x, adapter_names=names)

    # -- merge and combine -------------------------------------------------------------------
    def merge(self, safe: bool = False) -> None:
        if self._model is None:
            return
        names = [] if self._disabled else None  # None: PEFT merges its active adapters
        self._model.merge_adapter(adapter_names=names, safe_merge=safe)

    def unmerge(self) -> None:
        if self._model is not None:
            self._model.unmerge_adapter()

    def combine(self, new_name, names, weights, method, svd_rank=None) -> None:
        self._require_model(new_name).add_weighted_adapter(
            adapters=list(names),
            weights=list(weights),
            adapter_name=new_name,
            combination_type=method,
            svd_rank=svd_rank,
        )
        self._model.eval()

    def base_kernels(self) -> dict[str, np.ndarray]:
        root = self._base if self._model is None else self._model.base_model.model
        out = {}
        for path in self._layer_shapes:
            module = root.get_submodule(path)
            linear = getattr(module, "base_layer", module)
            out[path] = linear.weight.detach().to(torch.float64).numpy().T.copy()
        return out

    def select_targets(self, paths, target_modules, exclude_modules=None) -> list[str]:
        """The paths PEFT wraps for this `target_modules` (on a throwaway 1x1 chain)."""
        probe = TorchChain([(p, np.ones((1, 1)), np.zeros(1)) for p in paths], torch.float32)
        config = peft.LoraConfig(
            r=1, target_modules=target_modules, exclude_modules=exclude_modules
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.get_peft_model(probe, config).base_model.model
        return [p for p in paths if _lora_layer(wrapped, p) is not None]
