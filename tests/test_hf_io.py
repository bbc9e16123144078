"""HF safetensors ⇄ params: bitwise round trips, sharded loading, transformers reload, clear errors."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors.torch import load_file, save_file

from mathgrpo.config import ConfigError
from mathgrpo.model import abstract_params, logits
from mathgrpo.weights import hf

SHAPE = dict(num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3, head_dim=16)


def all_tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a HF dir, read with the safetensors library (the reference reader)."""
    tensors = {}
    for file in sorted(os.listdir(path)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, file)))
    return tensors


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].view(torch.int16 if a[name].dtype == torch.bfloat16 else a[name].dtype),
                           b[name].view(torch.int16 if b[name].dtype == torch.bfloat16 else b[name].dtype)), name


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_sharded_bf16_round_trip_is_bitwise(tiny_hf_dir, tmp_path, tied, param_dtype):
    source = tiny_hf_dir("bfloat16", max_shard_size="40KB", tie_word_embeddings=tied, **SHAPE)
    assert os.path.exists(source / "model.safetensors.index.json")
    config, params = hf.load(source, dtype=param_dtype)
    assert all(leaf.dtype == jnp.dtype(param_dtype) for leaf in jax.tree.leaves(params))
    hf.save(config, params, tmp_path / "out", dtype="bfloat16", max_shard_bytes=40_000)
    assert_bitwise_equal(all_tensors(source), all_tensors(tmp_path / "out"))
    assert ("lm_head.weight" in all_tensors(tmp_path / "out")) == (not tied)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1
    assert all(os.path.getsize(tmp_path / "out" / f) <= 40_000 + 2_000 for f in files)  # + header
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in all_tensors(source).values())


def test_export_loads_in_transformers_with_identical_logits(tiny_hf_dir, tmp_path):
    import transformers

    source = tiny_hf_dir("float32", tie_word_embeddings=True, **SHAPE)
    config, params = hf.load(source)
    hf.save(config, params, tmp_path / "out", dtype="float32")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors"]
    original = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert exported.config.tie_word_embeddings
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(original(tokens).logits, exported(tokens).logits)
    np.testing.assert_allclose(logits(config.replace(compute_dtype="float32"), params, tokens.numpy()),
                               exported(tokens).logits.detach().numpy(), atol=1e-5)


def test_tokenizer_and_generation_config_are_written(tiny_hf_dir, tmp_path, qwen3_tokenizer_dir):
    config, params = hf.load(tiny_hf_dir(**SHAPE))
    hf.save(config, params, tmp_path / "out", tokenizer_dir=qwen3_tokenizer_dir,
               generation_config={"eos_token_id": [2, 3], "max_new_tokens": 7})
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["max_new_tokens"] == 7


def test_load_straight_into_shardings(tiny_hf_dir):
    """Each device receives only its shard; values equal the single-device load."""
    source = tiny_hf_dir("bfloat16", **SHAPE)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
    config, reference = hf.load(source)

    def shardings(config):
        # Split the largest axis of each leaf over fsdp when it divides, else replicate.
        def one(leaf):
            axes = [None] * leaf.ndim
            for axis in np.argsort(leaf.shape)[::-1]:
                if leaf.shape[axis] % 4 == 0:
                    axes[axis] = "fsdp"
                    break
            return NamedSharding(mesh, PartitionSpec(*axes))
        return jax.tree.map(one, abstract_params(config))

    config, sharded = hf.load(source, shardings=shardings)
    expected_shardings = shardings(config)
    for leaf, ref, sharding in zip(jax.tree.leaves(sharded), jax.tree.leaves(reference),
                                   jax.tree.leaves(expected_shardings)):
        assert leaf.sharding == sharding
        assert {s.data.shape for s in leaf.addressable_shards} == {sharding.shard_shape(leaf.shape)}
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    emb = sharded["embed_tokens"]["embedding"]
    assert emb.addressable_shards[0].data.shape == (config.vocab_size // 4, config.hidden_size)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.fixture
def single_file_dir(tiny_hf_dir, tmp_path):
    source = tiny_hf_dir(**SHAPE)
    target = tmp_path / "model"
    shutil.copytree(source, target)
    return target


def rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(single_file_dir):
    rewrite(single_file_dir, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(hf.HFFormatError, match=r"missing tensor.*model\.layers\.1\.self_attn\.k_norm\.weight"):
        hf.load(single_file_dir)


def test_extra_tensor_is_named(single_file_dir):
    rewrite(single_file_dir, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(hf.HFFormatError, match=r"unexpected tensor.*model\.layers\.9\.mlp\.up_proj\.weight"):
        hf.load(single_file_dir)


def test_wrong_shape_is_named(single_file_dir):
    def change(t):
        t["model.layers.0.mlp.down_proj.weight"] = t["model.layers.0.mlp.down_proj.weight"][:, :-1].contiguous()
    rewrite(single_file_dir, change)
    with pytest.raises(hf.HFFormatError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*shape.*expected"):
        hf.load(single_file_dir)


def test_non_qwen3_config(single_file_dir):
    config = json.loads((single_file_dir / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (single_file_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not a dense Qwen3"):
        hf.load(single_file_dir)


def test_config_shape_mismatch_names_the_tensor(single_file_dir):
    config = json.loads((single_file_dir / "config.json").read_text())
    config["intermediate_size"] = 100
    (single_file_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(hf.HFFormatError, match=r"gate_proj\.weight.*has shape"):
        hf.load(single_file_dir)


@pytest.fixture
def sharded_dir(tiny_hf_dir, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(tiny_hf_dir(max_shard_size="40KB", **SHAPE), target)
    return target


def test_broken_index_json(sharded_dir):
    (sharded_dir / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(hf.HFFormatError, match="broken index"):
        hf.load(sharded_dir)


def test_index_pointing_to_a_missing_file(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    os.remove(sharded_dir / first)
    with pytest.raises(hf.HFFormatError, match=f"{first}.*does not exist"):
        hf.load(sharded_dir)


def test_index_listing_a_tensor_its_file_lacks(sharded_dir):
    index_path = sharded_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = sorted(set(index["weight_map"].values()))[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(hf.HFFormatError, match=r"model\.norm\.weight.*lacks it"):
        hf.load(sharded_dir)


def test_truncated_safetensors_file(single_file_dir):
    path = single_file_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(hf.HFFormatError, match="model.safetensors"):
        hf.load(single_file_dir)


def test_no_weights_at_all(single_file_dir):
    os.remove(single_file_dir / "model.safetensors")
    with pytest.raises(hf.HFFormatError, match="no model.safetensors"):
        hf.load(single_file_dir)
