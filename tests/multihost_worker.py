"""One process of the two-process test (tests/test_sharding.py): 4 fake CPU devices, gloo collectives.

Usage: multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID OUT.npz
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main() -> None:
    coordinator, num_processes, process_id, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from mathgrpo.parallel import mesh as parallel_mesh

    parallel_mesh.initialize_distributed(coordinator, num_processes, process_id)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    import numpy as np
    from jax.experimental import multihost_utils

    from mathgrpo.config import MeshConfig
    from tests.test_sharding import run_step

    mesh = parallel_mesh.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    state, outputs, _ = run_step(mesh)
    params = [np.asarray(multihost_utils.process_allgather(leaf, tiled=True)) for leaf in jax.tree.leaves(state.params)]
    metrics = {k: float(np.asarray(v.addressable_data(0))) for k, v in outputs["metrics"].items()}
    if jax.process_index() == 0:
        np.savez(out, metrics=json.dumps(metrics), **{f"param{i}": p for i, p in enumerate(params)})
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
