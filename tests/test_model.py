"""The Qwen3 module: shapes on the real 4B config, packing, padding, KV cache, scan, remat, attention switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mathgrpo.config import ModelConfig, load_model_config
from mathgrpo.model import (
    abstract_params,
    count_params,
    forward,
    init_cache,
    init_params,
    layers,
    logical_axes,
    logits,
    positions_from_segments,
    qwen3,
    unstack_layers,
)
from tests.test_config import CONFIGS

TINY = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                   num_attention_heads=6, num_key_value_heads=2, head_dim=12, rope_theta=3000.0,
                   param_dtype="float32", compute_dtype="float32", attention_block_size=4)


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def test_real_4b_parameter_count_without_allocation():
    """4,022,468,096 = V·D (tied) + L·(D·(N+2K)·H + N·H·D + 3·D·F + 2·H + 2·D) + D, with the 4B values."""
    config = load_model_config(CONFIGS / "qwen3_4b_base.yaml")
    V, D, F, L, N, K, H = 151936, 2560, 9728, 36, 32, 8, 128
    derived = V * D + L * (D * (N + 2 * K) * H + N * H * D + 3 * D * F + 2 * H + 2 * D) + D
    assert derived == 4_022_468_096
    abstract = abstract_params(config)
    assert all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(abstract))
    assert count_params(abstract) == derived
    axes = logical_axes(config)
    assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
        "layers", "embed", "q_heads", "head_dim")
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)) \
        == jax.tree.structure(abstract)


def test_positions_from_segments():
    segments = jnp.array([[0, 0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(segments),
                                  [[0, 0, 0, 1, 2, 0, 1], [0, 1, 2, 3, 0, 0, 0]])


def test_packed_row_equals_each_sequence_alone(params):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, TINY.vocab_size, 7), rng.integers(0, TINY.vocab_size, 5)
    packed = jnp.asarray(np.concatenate([a, b, [0, 0]]))[None]
    segments = jnp.asarray([[1] * 7 + [2] * 5 + [0, 0]])
    out, _ = forward(TINY, params, packed, positions_from_segments(segments), segments)
    alone_a = logits(TINY, params, a[None])
    alone_b = logits(TINY, params, b[None])
    np.testing.assert_allclose(out[0, :7], alone_a[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 7:12], alone_b[0], atol=1e-5)


def test_left_padding_does_not_change_valid_positions(params):
    tokens = np.random.default_rng(1).integers(0, TINY.vocab_size, (1, 9))
    padded = np.concatenate([np.full((1, 4), 5), tokens], axis=1)
    segments = jnp.asarray([[0] * 4 + [1] * 9])
    out, _ = forward(TINY, params, jnp.asarray(padded), positions_from_segments(segments), segments)
    np.testing.assert_allclose(out[:, 4:], logits(TINY, params, tokens), atol=1e-5)


@pytest.mark.parametrize("attention", ["reference", "blockwise"])
def test_prefill_then_decode_equals_full_forward(params, attention):
    """Left-padded prompts of different lengths, prefilled, then N single-token steps with the cache."""
    config = TINY.replace(attention=attention)
    rng = np.random.default_rng(2)
    prompt_lengths, bucket, steps = [3, 6], 6, 5
    total = bucket + steps
    sequences = [rng.integers(0, TINY.vocab_size, n + steps) for n in prompt_lengths]
    tokens = np.zeros((2, total), np.int32)
    segments = np.zeros((2, total), np.int32)
    for row, (n, seq) in enumerate(zip(prompt_lengths, sequences)):
        tokens[row, bucket - n:] = seq  # left padding
        segments[row, bucket - n:] = 1
    positions = positions_from_segments(jnp.asarray(segments))
    full, _ = forward(config, params, jnp.asarray(tokens), positions, jnp.asarray(segments))

    cache = init_cache(config, batch=2, max_length=total + 3)
    step_logits = []
    out, cache = forward(config, params, jnp.asarray(tokens[:, :bucket]), positions[:, :bucket],
                         jnp.asarray(segments[:, :bucket]), cache)
    step_logits.append(out)
    for t in range(bucket, total):
        out, cache = forward(config, params, jnp.asarray(tokens[:, t:t + 1]), positions[:, t:t + 1],
                             jnp.asarray(segments[:, t:t + 1]), cache)
        step_logits.append(out)
    assert int(cache.index) == total
    incremental = np.concatenate(step_logits, axis=1)
    valid = segments != 0
    np.testing.assert_allclose(incremental[valid], np.asarray(full)[valid], atol=1e-5)


def test_attention_implementations_agree_in_the_model(params):
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 11)))
    expected = logits(TINY, params, tokens)
    got = logits(TINY.replace(attention="blockwise", attention_block_size=4), params, tokens)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_scan_and_unrolled_layers_agree(params):
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, TINY.vocab_size, (2, 8)))
    np.testing.assert_allclose(logits(TINY.replace(scan_layers=False), params, tokens),
                               logits(TINY, params, tokens), atol=1e-6)


def test_per_layer_params_give_the_stacked_forward(params):
    """The sampler's per-layer copy (`unstack_layers`, whatever scan_layers says) runs the same layers:
    bit for bit the stacked forward's logits and KV cache (its layers unrolled), through a prefill and
    two decode steps."""
    config = TINY.replace(scan_layers=False)
    per_layer = unstack_layers(config, params)
    assert isinstance(per_layer["layers"], tuple) and len(per_layer["layers"]) == TINY.num_hidden_layers
    for index, layer in enumerate(per_layer["layers"]):
        jax.tree.map(lambda got, stacked: np.testing.assert_array_equal(got, stacked[index]), layer, params["layers"])
    assert len(unstack_layers(TINY, params)["layers"]) == TINY.num_hidden_layers  # scan_layers=True too
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, TINY.vocab_size, (2, 9)))
    run = jax.jit(lambda p, *args: forward(config, p, *args))
    caches = []
    # Stacked params and cache; per-layer params on the stacked cache; per-layer params and cache (the
    # sampler's), whose decode steps read each layer's slots in one pass on CPU (layers.decode_block_size).
    for p, cache_per_layer in ((params, False), (per_layer, False), (per_layer, True)):
        cache = init_cache(config, batch=2, max_length=12, per_layer=cache_per_layer)
        segments = jnp.ones((2, 1), jnp.int32)
        out, cache = run(p, tokens[:, :7], jnp.arange(7)[None].repeat(2, 0), jnp.ones((2, 7), jnp.int32), cache)
        outs = [out]
        cache = cache.replace(index=jnp.full((2,), 7, jnp.int32))  # then a slot per row, as in the pool
        for t in (7, 8):
            out, cache = run(p, tokens[:, t:t + 1], jnp.full((2, 1), t), segments, cache)
            outs.append(out)
        assert cache.per_layer == cache_per_layer
        caches.append((outs, np.stack(cache.k), np.stack(cache.v)))
    expected, expected_k, expected_v = caches[0]
    for got, got_k, got_v in caches[1:]:
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got_k, expected_k)
        np.testing.assert_array_equal(got_v, expected_v)
    with pytest.raises(ValueError, match="per-layer KV cache .* needs per-layer params"):
        run(params, tokens[:, :7], jnp.arange(7)[None].repeat(2, 0), jnp.ones((2, 7), jnp.int32),
            init_cache(config, batch=2, max_length=12, per_layer=True))


def test_bf16_cache_stores_the_bits_a_bf16_cache_would(params, monkeypatch):
    """A bf16 cache is stored as `kv_storage_dtype` says (uint16 bits on CPU): a prefill, then decode
    steps at one slot per row (the continuous sampler's writes and its blocked attention), give bit for
    bit the logits and keys/values of a cache held as bf16; and no step converts the whole cache to
    fp32, which XLA:CPU does for a bf16 cache's per-row writes (BENCHMARKS.md, session 15)."""
    config = TINY.replace(compute_dtype="bfloat16", scan_layers=False, decode_block_size=4)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, TINY.vocab_size, (2, 9)))
    run = jax.jit(lambda p, *args: forward(config, p, *args))

    def sample(storage):
        monkeypatch.setattr(qwen3, "kv_storage_dtype", storage)
        cache = init_cache(config, batch=2, max_length=12)
        out, cache = run(params, tokens[:, :7], jnp.arange(7)[None].repeat(2, 0), jnp.ones((2, 7), jnp.int32), cache)
        outs, cache = [out], cache.replace(index=jnp.full((2,), 7, jnp.int32))
        for t in (7, 8):
            out, cache = run(params, tokens[:, t:t + 1], jnp.full((2, 1), t), jnp.ones((2, 1), jnp.int32), cache)
            outs.append(out)
        step = run.lower(params, tokens[:, 8:9], jnp.full((2, 1), 8), jnp.ones((2, 1), jnp.int32), cache)
        return outs, cache, step.compile().as_text()

    stored, stored_cache, hlo = sample(layers.kv_storage_dtype)
    assert stored_cache.k.dtype == layers.kv_storage_dtype(jnp.bfloat16)
    if jax.default_backend() == "cpu":
        assert stored_cache.k.dtype == jnp.uint16
    whole_cache_in_fp32 = "f32[" + ",".join(map(str, stored_cache.k.shape)) + "]"
    assert whole_cache_in_fp32 not in hlo
    expected, expected_cache, _ = sample(lambda dtype: jnp.dtype(dtype))
    assert expected_cache.k.dtype == jnp.bfloat16
    for got, want in zip(stored, expected):
        np.testing.assert_array_equal(got, want)
    for got, want in ((stored_cache.k, expected_cache.k), (stored_cache.v, expected_cache.v)):
        np.testing.assert_array_equal(np.asarray(layers.from_kv(got, jnp.float32)), np.asarray(want, np.float32))


@pytest.mark.parametrize("policy", ["full", "full_offload", "save_dots", "save_qkv_proj", "save_attention_out"])
def test_remat_policies_keep_gradients(params, policy):
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, TINY.vocab_size, (2, 8)))

    def loss(config, p):
        return jnp.mean(jax.nn.log_softmax(logits(config, p, tokens))[..., 0])

    expected = jax.grad(lambda p: loss(TINY, p))(params)
    got = jax.jit(jax.grad(lambda p: loss(TINY.replace(remat_policy=policy), p)))(params)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-6), got, expected)


def test_full_remat_saves_layer_inputs_as_bits_not_widened_floats(params):
    """Under `full` remat the backward reads one [L, B, T, D] stack of saved layer inputs. In bf16 it
    must stay 2 bytes per element after XLA's optimizations (XLA:CPU once widened it to fp32) and
    the gradients must equal nn.remat's (`save_attention_out` recomputes the same ops)."""
    config = TINY.replace(compute_dtype="bfloat16", remat_policy="full")
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, TINY.vocab_size, (2, 8)))

    def loss(config, p):
        return jnp.mean(jax.nn.log_softmax(logits(config, p, tokens))[..., 0])

    grad = jax.jit(jax.grad(lambda p: loss(config, p)))
    hlo = grad.lower(params).compile().as_text()
    L, D = TINY.num_hidden_layers, TINY.hidden_size
    assert f"u16[{L},2,8,{D}]" in hlo, "the saved inputs are a u16 stack"
    assert f"f32[{L},2,8,{D}]" not in hlo and f"bf16[{L},2,8,{D}]" not in hlo, "no float copy of the stack"
    expected = jax.grad(lambda p: loss(config.replace(remat_policy="save_attention_out"), p))(params)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-6), grad(params), expected)


def test_bf16_compute_keeps_fp32_params_and_logits(params):
    config = TINY.replace(compute_dtype="bfloat16")
    tokens = jnp.asarray([[1, 2, 3, 4]])
    out = logits(config, params, tokens)
    assert out.dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    np.testing.assert_allclose(out, logits(TINY, params, tokens), atol=0.05)


def test_token_chunking_keeps_logits_and_gradients(params):
    """Position-wise parts run over chunks of 3 tokens (T = 10: a ragged last chunk)."""
    tokens = jnp.asarray(np.random.default_rng(6).integers(0, TINY.vocab_size, (2, 10)))

    def loss(config, p):
        return jnp.mean(jax.nn.log_softmax(logits(config, p, tokens))[..., 0])

    chunked = TINY.replace(token_chunk_size=3)
    np.testing.assert_allclose(logits(chunked, params, tokens), logits(TINY, params, tokens), atol=1e-5)
    expected = jax.grad(lambda p: loss(TINY, p))(params)
    got = jax.grad(lambda p: loss(chunked, p))(params)
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, atol=1e-6), got, expected)


@pytest.mark.parametrize("packed", [True, False])
def test_cudnn_attention_takes_the_packed_kernel_from_hopper_on_and_the_masked_one_before(params, monkeypatch, packed):
    """model.attention='cudnn': on sm >= 9.0 cuDNN's packed (varlen) kernel; an A100/A800 (sm 8.0, the
    recipe's own GPUs) has no packed layout (JAX refuses it), so cuDNN with the segment mask. Both
    kernels need a GPU: here the reference attention stands in for each and records which one ran."""
    from mathgrpo.model import layers, qwen3

    called = []

    def packed_kernel(q, k, v, q_segment, kv_segment, q_index, kv_index, *, max_segments):
        called.append("packed")
        return layers.reference_attention(q, k, v, q_segment, kv_segment, q_index, kv_index)

    def masked_kernel(q, k, v, q_segment, kv_segment, q_index, kv_index):
        called.append("masked")
        return layers.reference_attention(q, k, v, q_segment, kv_segment, q_index, kv_index)

    monkeypatch.setattr(qwen3, "cudnn_packed_attention", packed_kernel)
    monkeypatch.setattr(qwen3, "cudnn_attention", masked_kernel)
    monkeypatch.setattr(qwen3, "cudnn_packed_supported", lambda: packed)
    tokens = jax.random.randint(jax.random.key(3), (2, 10), 0, TINY.vocab_size)
    segments = jnp.array([[1] * 6 + [2] * 4, [0] * 3 + [1] * 7])  # packed row; left-padded row
    positions = positions_from_segments(segments)
    got, _ = forward(TINY.replace(attention="cudnn"), params, tokens, positions, segments)
    expected, _ = forward(TINY.replace(attention="reference"), params, tokens, positions, segments)
    assert called and set(called) == {"packed" if packed else "masked"}
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_kv_cache_writes_equal_numpy_on_each_platforms_form(monkeypatch, platform):
    """`write_rows` (a decode step's per-row write) and `write_prompts` (the continuous sampler's
    admission) take a different form on CPU than elsewhere (qwen3.py says why); both forms, traced
    for either platform and run here, write what numpy's indexing writes and nothing else."""
    from mathgrpo.model import qwen3

    monkeypatch.setattr(qwen3, "target_platform", lambda: platform)
    rng = np.random.default_rng(11)
    L, B, K, S, H, A, n, T = 2, 6, 2, 10, 4, 2, 2, 3
    cache_k = rng.normal(size=(L, B, K, H, S)).astype(np.float32)  # qwen3.KVCache's layouts
    cache_v = rng.normal(size=(L, B, K, S, H)).astype(np.float32)

    new_k, new_v = (rng.normal(size=(B, K, H)).astype(np.float32) for _ in range(2))
    slots, layer = np.array([0, 3, 9, 12, 5, 1]), 1  # 12: past the end, lands on the last slot
    got = jax.jit(qwen3.write_rows)(cache_k, cache_v, new_k, new_v, layer, slots)
    expected_k, expected_v = cache_k.copy(), cache_v.copy()
    expected_k[layer, np.arange(B), :, :, np.minimum(slots, S - 1)] = new_k
    expected_v[layer, np.arange(B), :, np.minimum(slots, S - 1), :] = new_v
    for out, expected in zip(got, (expected_k, expected_v)):
        np.testing.assert_array_equal(np.asarray(out), expected)

    prompt_k = rng.normal(size=(L, A, K, H, T)).astype(np.float32)
    prompt_v = rng.normal(size=(L, A, K, T, H)).astype(np.float32)
    rows = np.array([4, 1, B, 2])  # prompt 0 -> rows 4, 1; prompt 1 -> row 2 (and B: nothing)
    got = jax.jit(qwen3.write_prompts, static_argnums=5)(cache_k, cache_v, prompt_k, prompt_v, rows, n)
    expected_k, expected_v = cache_k.copy(), cache_v.copy()
    for i, row in enumerate(rows):
        if row < B:
            expected_k[:, row, :, :, :T] = prompt_k[:, i // n]
            expected_v[:, row, :, :T] = prompt_v[:, i // n]
    for out, expected in zip(got, (expected_k, expected_v)):
        np.testing.assert_array_equal(np.asarray(out), expected)
