"""One process of the 2-process tensor-parallel run of `tests/test_multiprocess.py` (SW-TP-4).

Run as `python tests/multiprocess_worker.py PROCESS_ID PORT CHECKPOINT ADAPTERS OUT`: it joins
the other process through `jax.distributed.initialize` on 127.0.0.1 (CPU collectives over
gloo), builds global meshes over both processes' devices, loads the checkpoint straight into its
shards, runs a sharded mixed-adapter forward (read back with `jaxlora.sharding.to_host`) and
`generate` on the sharded model, and writes what it saw (`np.savez`) for the test to compare
with the single-process run. Not a test module itself.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

#: (data, model) meshes over the 4 global devices and the LoRA layout (SW-TP-5) on each: the
#: data axis across the two processes (each process feeds its own rows), then the model axis
#: across them (its all-reduces and all-gathers cross processes).
MESHES = ((2, 2, "replicate-factors"), (1, 4, "split-factors"))


def main(process_id: int, port: int, checkpoint: str, adapters: str, out: str, case: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    import numpy as np

    import jaxlora
    from jaxlora.generate import generate
    from jaxlora.models import forward, load_llama
    from jaxlora.models.tp import shard_lora
    from jaxlora.sharding import make_mesh, shard_batch, to_host

    spec = json.loads(case)
    tokens, mask = np.asarray(spec["tokens"], np.int32), np.asarray(spec["mask"], bool)
    rows = spec["rows"]
    result: dict[str, object] = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    for data, model_size, layout in MESHES:
        mesh = make_mesh(data=data, model=model_size)
        tag = f"{data}x{model_size}"
        result[f"{tag}_mesh_processes"] = sorted({d.process_index for d in mesh.devices.flat})
        model = load_llama(checkpoint, mesh=mesh)
        layer = model.layers[0].q_proj.kernel[...]
        result[f"{tag}_q_shards"] = len(layer.addressable_shards)
        result[f"{tag}_q_fully_addressable"] = layer.is_fully_addressable
        bank = jaxlora.io.load_peft(adapters, layer_shapes=model.lora_shapes())
        stacked = jaxlora.stack(jaxlora.conform(bank))
        lora = shard_lora(stacked.route(rows), model.config, mesh, lora_layout=layout)
        result[f"{tag}_ids_replicated"] = lora.ids.is_fully_replicated
        # Each process gives its own rows: the data axis splits the batch over processes.
        local = slice(None)
        if data == 2:
            half = len(rows) // 2
            local = slice(process_id * half, (process_id + 1) * half)
        x = shard_batch(tokens[local], mesh)
        m = shard_batch(mask[local], mesh)
        logits = forward(model, x, attention_mask=m, lora=lora)
        result[f"{tag}_logits_addressable"] = logits.is_fully_addressable
        result[f"{tag}_logits"] = to_host(logits)  # the whole value, gathered from both
        # `generate` on the sharded model, the data axis across the processes for 2x2 (the
        # routed ids span both: read back with `to_host`); every process gives every prompt.
        prompts = [row[msk].tolist() for row, msk in zip(tokens, mask, strict=True)]
        gen = generate(model, prompts, lora=lora, max_new_tokens=spec["new_tokens"])
        result[f"{tag}_generated"] = np.asarray(gen.tokens)
    np.savez(out, **{k: np.asarray(v) for k, v in result.items()})
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, port, ckpt, adapters, out, case = sys.argv[1:7]
    main(int(pid), int(port), ckpt, adapters, out, case)
