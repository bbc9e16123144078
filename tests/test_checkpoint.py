"""Orbax params checkpoints and the `convert` command: HF → Orbax → HF is bitwise."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mathgrpo.model import abstract_params
from mathgrpo.weights import hf, orbax
from tests.test_hf_io import SHAPE, all_tensors, assert_bitwise_equal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mathgrpo", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_orbax_to_hf_cli_is_bitwise(tiny_hf_dir, tmp_path, qwen3_tokenizer_dir, tied):
    source = tmp_path / "hf"
    import shutil
    shutil.copytree(tiny_hf_dir("bfloat16", max_shard_size="40KB", tie_word_embeddings=tied, **SHAPE), source)
    hf.copy_tokenizer(qwen3_tokenizer_dir, source)
    result = run_cli("convert", "hf-to-orbax", "--hf-dir", str(source), "--out", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    result = run_cli("convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"),
                     "--max-shard-size", "40KB")
    assert result.returncode == 0, result.stderr
    assert_bitwise_equal(all_tensors(source), all_tensors(tmp_path / "back"))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["tie_word_embeddings"] == tied
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == 2


def test_fp32_hf_to_orbax_to_hf_with_default_flags_is_bitwise_fp32(tiny_hf_dir, tmp_path):
    """The export's default dtype is the source files' (recorded at conversion): an fp32 model comes back
    fp32, bit for bit, and a trainer-style checkpoint without that record exports its params' dtype."""
    source = tiny_hf_dir("float32", **SHAPE)
    assert hf.stored_dtype(source) == "float32"
    result = run_cli("convert", "hf-to-orbax", "--hf-dir", str(source), "--out", str(tmp_path / "ckpt"))
    assert result.returncode == 0, result.stderr
    assert orbax.read_meta(tmp_path / "ckpt")["hf_dtype"] == "float32"
    result = run_cli("convert", "orbax-to-hf", "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    assert result.returncode == 0, result.stderr
    assert hf.stored_dtype(tmp_path / "back") == "float32"
    assert_bitwise_equal(all_tensors(source), all_tensors(tmp_path / "back"))
    # --dtype still says otherwise
    orbax.orbax_to_hf(tmp_path / "ckpt", tmp_path / "bf16", dtype="bfloat16")
    assert hf.stored_dtype(tmp_path / "bf16") == "bfloat16"
    # No record (a trainer's params checkpoint): the params' dtype.
    config, params = hf.load(source)
    orbax.save_params(tmp_path / "trained", config, params)
    orbax.orbax_to_hf(tmp_path / "trained", tmp_path / "trained_hf")
    assert hf.stored_dtype(tmp_path / "trained_hf") == "float32"


def test_dtype_arguments_take_names_numpy_and_jax_dtypes(tiny_hf_dir, tmp_path):
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np

    source = tiny_hf_dir("float32", **SHAPE)
    for dtype in ("bfloat16", jnp.bfloat16, np.dtype(ml_dtypes.bfloat16)):
        config, params = hf.load(source, dtype=dtype)
        assert config.param_dtype == "bfloat16" and params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    for i, dtype in enumerate((np.float32, jnp.float32)):
        hf.save(config, params, tmp_path / f"out{i}", dtype=dtype)
        assert hf.stored_dtype(tmp_path / f"out{i}") == "float32"
    for bad in ("int8", np.int32, "fp32"):
        with pytest.raises(ValueError, match="expected one of"):
            hf.load(source, dtype=bad)


def test_checkpoint_records_config_and_tokenizer(tiny_hf_dir, tmp_path):
    source = tiny_hf_dir(**SHAPE)
    config = orbax.hf_to_orbax(source, tmp_path / "ckpt")
    meta = orbax.read_meta(tmp_path / "ckpt")
    assert orbax.model_config_from_meta(meta) == config
    assert meta["tokenizer_dir"] is None  # the tiny model has no tokenizer files


def test_restore_into_shardings_equals_source(tiny_hf_dir, tmp_path):
    source = tiny_hf_dir(**SHAPE)
    config, params = hf.load(source)
    orbax.save_params(tmp_path / "ckpt", config, params)
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))

    def shardings(config):
        return jax.tree.map(
            lambda leaf: NamedSharding(mesh, PartitionSpec(*(["fsdp"] if leaf.shape[0] % 8 == 0 else [None]))),
            abstract_params(config))

    restored_config, restored, _ = orbax.restore_params(tmp_path / "ckpt", shardings=shardings)
    assert restored_config == config
    for got, expected, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(params),
                                       jax.tree.leaves(shardings(config))):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_save_refuses_to_overwrite_and_restore_names_bad_dirs(tiny_hf_dir, tmp_path):
    config, params = hf.load(tiny_hf_dir(**SHAPE))
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        orbax.save_params(tmp_path / "exists", config, params)
    with pytest.raises(FileNotFoundError, match="not a mathgrpo params checkpoint"):
        orbax.restore_params(tmp_path / "exists")


def test_parity_cli_prints_json_last_and_exit_code(tiny_hf_dir):
    result = run_cli("parity", "--hf-dir", str(tiny_hf_dir(**SHAPE)), "--batch", "2", "--seq", "12")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    for key in ("max_abs_logit_diff", "max_abs_logprob_diff", "mean_kl", "greedy_next_token_agreement"):
        assert key in figures
    assert figures["max_abs_logprob_diff"] <= 1e-4
    assert any(line.startswith("max_abs_logprob_diff") for line in lines)


def test_train_checkpoint_refuses_another_state_before_reading(tmp_path):
    """A step restored into a state of other shapes or other arrays fails naming the first difference,
    from the step's metadata, in a new checkpointer (a new process's view) and before any read starts."""
    from mathgrpo.config import OptimConfig
    from mathgrpo.train import state as train_state

    def state(width, extra_leaf=False):
        params = {"embed": np.zeros((8, width), np.float32), "layers": {"w": np.ones((2, width, width), np.float32)}}
        if extra_leaf:
            params["head"] = np.zeros((width, 8), np.float32)
        return train_state.init_train_state(params, OptimConfig(lr=1e-3))

    saver = orbax.TrainCheckpointer(tmp_path / "ckpt", async_save=False)
    saver.save(3, state(4), {"step": 3})
    saver.close()
    loader = orbax.TrainCheckpointer(tmp_path / "ckpt")
    restored, extra = loader.restore(3, jax.eval_shape(lambda: state(4)))
    assert extra == {"step": 3} and restored.params["layers"]["w"].shape == (2, 4, 4)
    with pytest.raises(ValueError, match=r"ckpt/3: opt_state\.1\.0\.mu\.embed was saved with shape \(8, 4\), "
                                         r"expected \(8, 6\)"):
        loader.restore(3, jax.eval_shape(lambda: state(6)))
    with pytest.raises(ValueError, match=r"other arrays than the training state: missing \['opt_state.1.0.mu.head', "):
        loader.restore(3, jax.eval_shape(lambda: state(4, extra_leaf=True)))
