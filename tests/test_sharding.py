"""Sharding: every shipped mesh config gives the single-device result; the 4B state is truly sharded;
bad meshes fail before compiling; two processes with 4 devices each equal one process."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mathgrpo import model as mathgrpo_model
from mathgrpo.config import ConfigError, GRPOConfig, MeshConfig, ModelConfig, OptimConfig, from_dict, read_yaml
from mathgrpo.model import init_params
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.parallel import shardings as parallel_shardings
from mathgrpo.train import packing
from mathgrpo.train import state as train_state
from mathgrpo.train import step as train_step_lib
from tests.test_config import CONFIGS as MODEL_CONFIGS

MESH_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "mesh"
# remat "full" as in the recipe: the hand-written remat and its in-place layer-gradient accumulation
# (model.full_remat_layers) run sharded; the vocabulary-parallel head runs whenever a mesh is set.
SHARDED_TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, compute_dtype="float32",
                           remat_policy="full")
ROOT = Path(__file__).resolve().parents[1]


def load_mesh(name: str) -> MeshConfig:
    return from_dict(MeshConfig, read_yaml(MESH_CONFIGS / f"{name}.yaml"), prefix="mesh.")


def make_batch(seed: int, num_rows: int):
    rng = np.random.default_rng(seed)
    count = 16
    prompts = [rng.integers(0, 128, rng.integers(2, 8)) for _ in range(count)]
    responses = [rng.integers(0, 128, rng.integers(1, 12)) for _ in range(count)]
    advantages = rng.normal(size=count)
    rollout = [rng.normal(-4.8, 0.3, len(r)) for r in responses]
    batch, _ = packing.pack(prompts, responses, advantages, num_rows=num_rows, row_length=24,
                            rollout_logprobs=rollout)
    return batch


def run_step(mesh=None, num_rows=8):
    params = init_params(SHARDED_TINY, jax.random.key(0))
    # Adam's first update is ≈ lr·sign(g): a gradient entry near 0 flips sign under a different fp32
    # reduction order and moves its parameter by 2·lr. A large eps keeps the update linear in g, so
    # comparing updated params compares the sharded computation, not sign noise.
    algo, optim = GRPOConfig(), OptimConfig(lr=1e-3, eps=1e-3)
    batch = make_batch(0, num_rows)
    state = train_state.init_train_state(params, optim)
    step = train_step_lib.make_train_step(SHARDED_TINY, algo, optim, mesh=mesh)
    logprob_fn = train_step_lib.make_logprob_fn(SHARDED_TINY, algo, mesh=mesh)
    if mesh is not None:
        optimizer = train_state.make_optimizer(optim)
        state = parallel_shardings.put_global(state, train_state.train_state_shardings(SHARDED_TINY, optimizer, mesh))
        batch = parallel_shardings.put_global(batch, packing.batch_shardings(mesh))
    logprobs, _ = logprob_fn(state.params, batch)
    state, out = step(state, batch)
    return state, out, logprobs


@pytest.fixture(scope="module")
def single_device_result():
    return jax.tree.map(np.asarray, run_step(mesh=None))


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("name", ["single", "fsdp8", "fsdp4_tp2", "dp2_fsdp4", "fsdp_all"])
def test_mesh_config_matches_single_device(name, single_device_result):
    mesh = parallel_mesh.make_mesh(load_mesh(name), jax.devices()[:8] if name != "single" else jax.devices()[:1])
    state, out, logprobs = run_step(mesh)
    ref_state, ref_out, ref_logprobs = single_device_result
    for key, value in ref_out["metrics"].items():
        np.testing.assert_allclose(out["metrics"][key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    for got, expected in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        assert relative_error(got, expected) <= 1e-5
    np.testing.assert_allclose(logprobs, ref_logprobs, atol=1e-5)
    if name == "fsdp4_tp2":
        q = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # [L, D, N, H]


@pytest.mark.parametrize("name, divisor", [("fsdp8", 8), ("fsdp4_tp2", 8), ("dp2_fsdp4", 4)])
def test_4b_state_is_truly_sharded(name, divisor):
    """Abstract 4B train state: each device holds 1/divisor of every large leaf; no replicated copy."""
    from mathgrpo.config import load_model_config

    model = load_model_config(MODEL_CONFIGS / "qwen3_4b_base.yaml")
    mesh = parallel_mesh.make_mesh(load_mesh(name), jax.devices()[:8])
    optimizer = train_state.make_optimizer(OptimConfig())
    shardings = train_state.train_state_shardings(model, optimizer, mesh)
    abstract = jax.eval_shape(lambda: train_state.init_train_state(
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), mathgrpo_model.abstract_params(model)), OptimConfig()))
    total = per_device = 0
    for leaf, leaf_sharding in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
        size = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        shard = int(np.prod(leaf_sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        total += size
        per_device += shard
        if size > 1e6:  # every large tensor (all but norms) split by the full data-parallel factor
            assert shard * divisor <= size * (1 + 1e-9), (leaf.shape, leaf_sharding.spec)
    assert total > 3 * 4.0e9 * 4  # params + two Adam moments, fp32
    assert per_device <= total / divisor * 1.01, (per_device / 2**30, total / 2**30)


def test_bad_meshes_fail_before_compiling():
    with pytest.raises(ConfigError, match="has 16 devices but 8 are available"):
        parallel_mesh.make_mesh(MeshConfig(data=2, fsdp=4, tensor=2), jax.devices()[:8])
    assert parallel_mesh.make_mesh(MeshConfig(data=1, fsdp=3, tensor=2), jax.devices()[:8]).devices.size == 6
    with pytest.raises(ConfigError, match="do not divide the 8 devices"):
        parallel_mesh.make_mesh(MeshConfig(data=3, fsdp=-1, tensor=1), jax.devices()[:8])
    with pytest.raises(ConfigError, match="at most one axis"):
        MeshConfig(data=-1, fsdp=-1)
    mesh = parallel_mesh.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4), jax.devices()[:8])
    with pytest.raises(ConfigError, match="num_key_value_heads=2 is not divisible by the mesh's tensor axis"):
        parallel_shardings.param_shardings(SHARDED_TINY, mesh)
    mesh = parallel_mesh.make_mesh(MeshConfig(data=1, fsdp=8, tensor=1), jax.devices()[:8])
    odd = SHARDED_TINY.replace(hidden_size=60)
    with pytest.raises(ConfigError, match=r"'embed' of size 60 is not divisible by mesh axis fsdp of size 8"):
        parallel_shardings.param_shardings(odd, mesh)
    with pytest.raises(ConfigError, match="unknown logical axes"):
        parallel_mesh.logical_rules(MeshConfig(logical_rules={"embedding": "fsdp"}))
    with pytest.raises(ConfigError, match="not mesh axes"):
        MeshConfig(logical_rules={"embed": "model"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, single_device_result):
    """2 local processes × 4 fake CPU devices (gloo) form one 8-device fsdp mesh."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    workers = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), f"127.0.0.1:{port}", "2", str(i),
         str(tmp_path / f"out{i}.npz")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    logs = [w.communicate(timeout=300)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), "\n".join(logs)
    ref_state, ref_out, _ = single_device_result
    result = np.load(tmp_path / "out0.npz")
    metrics = json.loads(str(result["metrics"]))
    for key, value in ref_out["metrics"].items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, atol=1e-7, err_msg=key)
    for i, expected in enumerate(jax.tree.leaves(ref_state.params)):
        assert relative_error(result[f"param{i}"], expected) <= 1e-5
