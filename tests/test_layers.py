"""RoPE, RMSNorm and the attention implementations against numpy references written here."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mathgrpo.model.layers import (
    ONE_PASS_SLOTS,
    RMSNorm,
    apply_rope,
    blockwise_attention,
    cached_attention,
    cudnn_attention,
    cudnn_packed_attention,
    decode_attention,
    decode_block_size,
    decode_one_pass,
    kv_storage_dtype,
    project,
    reference_attention,
    segment_layout,
    target_platform,
)
from tests.test_plan import cuda_plugin_installed


def numpy_rope(x, positions, theta):
    """HF Qwen3: inv_freq = 1/theta^(2i/H); emb = cat(freqs, freqs); x·cos + rotate_half(x)·sin."""
    H = x.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, H, 2) / H)
    freqs = positions[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    rotated = np.concatenate([-x[..., H // 2:], x[..., : H // 2]], -1)
    return x * np.cos(emb) + rotated * np.sin(emb)


def test_rope_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [7, 8, 0, 1, 2]])
    got = apply_rope(jnp.asarray(x), jnp.asarray(positions), 5000.0)
    np.testing.assert_allclose(got, numpy_rope(x, positions, 5000.0), atol=1e-5)


def test_rmsnorm_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32) * 3
    weight = rng.normal(size=(16,)).astype(np.float32)
    norm = RMSNorm(1e-5, "embed", "float32", "float32")
    got = norm.apply({"params": {"weight": weight}}, jnp.asarray(x))
    expected = weight * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def numpy_attention(q, k, v, q_segment, kv_segment, q_index, kv_index):
    """Loop over (b, t, n): softmax over the allowed keys only (none allowed → zeros)."""
    B, T, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q, dtype=np.float64)
    for b in range(B):
        for t in range(T):
            allowed = [s for s in range(k.shape[1]) if kv_segment[b, s] == q_segment[b, t] != 0
                       and kv_index[s] <= q_index[t]]
            if not allowed:
                continue
            for n in range(N):
                scores = np.array([q[b, t, n] @ k[b, s, n // G] for s in allowed]) / np.sqrt(H)
                p = np.exp(scores - scores.max())
                p /= p.sum()
                out[b, t, n] = sum(pi * v[b, s, n // G] for pi, s in zip(p, allowed))
    return out


def random_qkv(rng, B, T, S, N, K, H):
    return (rng.normal(size=(B, T, N, H)).astype(np.float32), rng.normal(size=(B, S, K, H)).astype(np.float32),
            rng.normal(size=(B, S, K, H)).astype(np.float32))


def packed_segments(T):
    """Row 0: left padding then one sequence; row 1: two packed sequences then right padding."""
    segments = np.zeros((2, T), np.int32)
    segments[0, 3:] = 1
    segments[1, : T // 2] = 1
    segments[1, T // 2: T - 2] = 2
    return segments


@pytest.mark.parametrize("N, K", [(4, 4), (4, 2), (8, 2)])
def test_reference_attention_matches_numpy(N, K):
    rng = np.random.default_rng(2)
    T, H = 10, 8
    q, k, v = random_qkv(rng, 2, T, T, N, K, H)
    segments = packed_segments(T)
    index = np.arange(T)
    got = reference_attention(*map(jnp.asarray, (q, k, v, segments, segments, index, index)))
    expected = numpy_attention(q, k, v, segments, segments, index, index)
    valid = segments != 0
    np.testing.assert_allclose(np.asarray(got)[valid], expected[valid], atol=1e-5)


@pytest.mark.parametrize("T", [1, 3])
def test_cached_attention_matches_numpy_over_a_cache(T):
    """Queries at the end of a partly filled cache of S slots in the cache's [B, K, S, H] layout."""
    rng = np.random.default_rng(4)
    B, S, N, K, H = 2, 12, 8, 2, 16
    q, k, v = random_qkv(rng, B, T, S, N, K, H)
    kv_segment = np.zeros((B, S), np.int32)
    kv_segment[0, 2:9], kv_segment[1, 0:9] = 1, 1  # row 0 left-padded; slots 9.. still empty
    q_index = np.arange(9 - T, 9)
    q_segment = np.ones((B, T), np.int32)
    got = cached_attention(*map(jnp.asarray, (q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), q_segment,
                                              kv_segment, q_index, np.arange(S))))
    expected = numpy_attention(q, k, v, q_segment, kv_segment, q_index, np.arange(S))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)


def _stacked(x, layers=3, layer=1, keys=False):
    """x [B, S, K, H] as layer `layer` of a stacked cache whose other layers are noise: keys
    [L, B, K, H, S] or values [L, B, K, S, H] (qwen3.KVCache)."""
    x = x.transpose(0, 2, 3, 1) if keys else x.transpose(0, 2, 1, 3)
    cache = np.random.default_rng(9).normal(size=(layers,) + x.shape).astype(np.float32)
    cache[layer] = x
    return jnp.asarray(cache), jnp.asarray(layer)


@pytest.mark.parametrize("block, layers", [(8, 3), (16, 3), (37, 3), (None, 3), (None, 1), (8, 1)])
def test_decode_attention_matches_numpy(block, layers):
    """One query per row, each row at its own slot of a 37-slot cache, in blocks of 8 or 16 (the last
    one partial), one block of all slots, or the default (one pass: `decode_one_pass` on CPU), over a
    stacked cache of 3 layers or a per-layer one (a stack of 1); row 1 is left-padded, row 3 sits in
    the partial last block, row 2 at slot 0."""
    rng = np.random.default_rng(5)
    B, S, N, K, H = 4, 37, 8, 2, 16
    q, k, v = random_qkv(rng, B, 1, S, N, K, H)
    position = np.array([20, 11, 0, 35])
    kv_segment = (np.arange(S)[None, :] <= position[:, None]).astype(np.int32)
    kv_segment[1, :4] = 0  # left padding
    q_segment = np.ones((B, 1), np.int32)
    (cache_k, layer), (cache_v, _) = _stacked(k, layers, layers // 2, keys=True), _stacked(v, layers, layers // 2)
    got = np.asarray(decode_attention(jnp.asarray(q), cache_k, cache_v, layer, *map(
        jnp.asarray, (q_segment, kv_segment, position[:, None], np.arange(S))), block_size=block))
    for b in range(B):
        expected = numpy_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], q_segment[b:b + 1], kv_segment[b:b + 1],
                                   position[b:b + 1], np.arange(S))
        np.testing.assert_allclose(got[b:b + 1], expected, atol=1e-5)


def test_decode_attention_row_does_not_depend_on_the_other_rows():
    """The block loop runs to the furthest row's slot; the blocks past a row's own slot leave it
    bit-identical (so the continuous sampler's samples do not depend on the pool's other rows)."""
    rng = np.random.default_rng(6)
    B, S, N, K, H = 3, 64, 4, 2, 16
    q, k, v = random_qkv(rng, B, 1, S, N, K, H)
    (cache_k, layer), (cache_v, _) = _stacked(k, keys=True), _stacked(v)
    attend_blocks = jax.jit(functools.partial(decode_attention, block_size=8))
    outputs = []
    for furthest in (9, 30, 63):  # rows 1 and 2 reach 1, 4 and 8 blocks of 8
        position = jnp.array([9, furthest, furthest])
        segment = (jnp.arange(S)[None, :] <= position[:, None]).astype(jnp.int32)
        outputs.append(np.asarray(attend_blocks(jnp.asarray(q), cache_k, cache_v, layer, jnp.ones((B, 1), jnp.int32),
                                                segment, position[:, None], jnp.arange(S)))[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_decode_attention_does_not_copy_the_stacked_cache(dtype):
    """Compiled for this platform, the block loop's temporaries stay below one of the stacked caches
    (8 layers), stored as `kv_storage_dtype` says. On XLA:CPU a loop slicing a stacked bf16
    cache made an fp32 copy of all of it (twice its bytes, per cache): the 4B recipe's CPU plan no
    longer fit."""
    L, B, K, S, H, N = 8, 4, 2, 1024, 32, 4
    keys = jax.ShapeDtypeStruct((L, B, K, H, S), kv_storage_dtype(dtype))
    values = jax.ShapeDtypeStruct((L, B, K, S, H), kv_storage_dtype(dtype))
    attend = jax.jit(functools.partial(decode_attention, block_size=128))
    compiled = attend.lower(jax.ShapeDtypeStruct((B, 1, N, H), jnp.dtype(dtype)), keys, values,
                            jnp.int32(3), jnp.ones((B, 1), jnp.int32), jnp.ones((B, S), jnp.int32),
                            jnp.full((B, 1), 700, jnp.int32), jnp.arange(S)).compile()
    cache_bytes = L * B * K * S * H * jnp.dtype(dtype).itemsize
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes


def test_decode_one_pass_reads_a_per_layer_cache_in_place():
    """The CPU default over a per-layer cache (`decode_block_size`: one pass up to ONE_PASS_SLOTS slots)
    compiles without a temporary of the cache's size: the multiply-reduce passes read the layer's keys
    and values where they lie (BENCHMARKS.md, session 17). Its output is `cached_attention`'s."""
    B, K, S, H, N = 4, 2, ONE_PASS_SLOTS, 64, 4
    assert decode_block_size(S, 1) == (S if target_platform() == "cpu" else 512)
    assert decode_block_size(S + 1, 1) == decode_block_size(S, 3) == (128 if target_platform() == "cpu" else 512)
    args = (jax.ShapeDtypeStruct((B, 1, N, H), jnp.float32), jax.ShapeDtypeStruct((1, B, K, H, S), jnp.float32),
            jax.ShapeDtypeStruct((1, B, K, S, H), jnp.float32), jnp.int32(0), jnp.ones((B, 1), jnp.int32),
            jnp.ones((B, S), jnp.int32), jnp.full((B, 1), 300, jnp.int32), jnp.arange(S))
    compiled = jax.jit(decode_attention).lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < B * K * S * H * 4 // 4

    rng = np.random.default_rng(11)
    q, k, v = random_qkv(rng, B, 1, 40, N, K, 16)
    position = np.array([39, 3, 20, 0])
    kv_segment = (np.arange(40)[None, :] <= position[:, None]).astype(np.int32)
    kv_segment[0, :2] = 0
    rest = list(map(jnp.asarray, (np.ones((B, 1), np.int32), kv_segment, position[:, None], np.arange(40))))
    keys, values = jnp.asarray(k.transpose(0, 2, 3, 1)), jnp.asarray(v.transpose(0, 2, 1, 3))  # the cache's layout
    np.testing.assert_allclose(np.asarray(decode_one_pass(jnp.asarray(q), keys, values, *rest)),
                               np.asarray(cached_attention(jnp.asarray(q), keys.swapaxes(-1, -2), values, *rest)),
                               atol=1e-6)


@pytest.mark.parametrize("T, block", [(37, 8), (64, 16), (16, 32)])
def test_blockwise_equals_reference(T, block):
    rng = np.random.default_rng(3)
    q, k, v = map(jnp.asarray, random_qkv(rng, 2, T, T, 8, 2, 16))
    segments = jnp.asarray(packed_segments(T))
    index = jnp.arange(T)
    args = (q, k, v, segments, segments, index, index)
    expected = reference_attention(*args)
    got = blockwise_attention(*args, block_size=block)
    valid = np.asarray(segments) != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(expected)[valid], atol=1e-5)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.where(segments[:, :, None, None] != 0, fn(q, k, v) ** 2, 0.0))

    grads_expected = jax.grad(lambda *a: loss(lambda *x: reference_attention(*x, *args[3:]), *a), (0, 1, 2))(q, k, v)
    grads_got = jax.grad(lambda *a: loss(lambda *x: blockwise_attention(*x, *args[3:], block_size=block), *a),
                         (0, 1, 2))(q, k, v)
    for g, e in zip(grads_got, grads_expected):
        np.testing.assert_allclose(g, e, atol=1e-4)


def test_blockwise_memory_is_linear_in_length():
    """Forward+backward temporaries: the reference holds B·N·T·S fp32 scores (O(T²)); blockwise
    holds one [B, N, block, S] block at a time. At T=4096, block=256 the reference's scores alone are
    1·4·4096·4096·4 B = 268 MB; blockwise must stay under a quarter of the reference."""
    B, T, N, K, H, block = 1, 4096, 4, 2, 16, 256
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.float32)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)
    idx = jax.ShapeDtypeStruct((T,), jnp.int32)

    def temp_bytes(fn):
        def loss(q, k, v, seg, idx):
            return jnp.sum(fn(q, k, v, seg, seg, idx, idx))

        compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, seg, idx).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    reference = temp_bytes(reference_attention)
    blockwise = temp_bytes(lambda *a: blockwise_attention(*a, block_size=block))
    assert reference >= B * N * T * T * 4, reference
    assert blockwise < reference / 4, (blockwise, reference)


def test_cudnn_needs_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: the parity tests exercise cuDNN instead")
    x = jnp.zeros((1, 4, 2, 8))
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        cudnn_attention(x, x, x, seg, seg, jnp.arange(4), jnp.arange(4))


@pytest.mark.gpu
def test_cudnn_matches_reference_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("no GPU")
    rng = np.random.default_rng(4)
    T = 128
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in random_qkv(rng, 2, T, T, 8, 2, 64))
    segments = jnp.asarray(packed_segments(T))
    index = jnp.arange(T)
    args = (q, k, v, segments, segments, index, index)
    valid = np.asarray(segments) != 0
    got = np.asarray(cudnn_attention(*args), np.float32)[valid]
    expected = np.asarray(reference_attention(*args), np.float32)[valid]
    np.testing.assert_allclose(got, expected, atol=2e-2)


def test_segment_layout_describes_each_contiguous_segment():
    segments = packed_segments(12)  # row 0: padding 0..2, then one sequence; row 1: 6 + 4 tokens, 2 padding
    seqlen, offsets = segment_layout(jnp.asarray(segments), max_segments=3)
    np.testing.assert_array_equal(np.asarray(seqlen), [[9, -1, -1], [6, 4, -1]])
    np.testing.assert_array_equal(np.asarray(offsets), [[3, -1, -1, -1], [0, 6, -1, -1]])


@pytest.mark.gpu
def test_cudnn_packed_matches_reference_with_gradients_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("no GPU")
    rng = np.random.default_rng(5)
    T = 256
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in random_qkv(rng, 2, T, T, 8, 2, 64))
    segments = jnp.asarray(packed_segments(T))
    index = jnp.arange(T)
    valid = (np.asarray(segments) != 0)
    weights = jnp.asarray(rng.normal(size=(2, T, 8, 64)), jnp.float32) * valid[:, :, None, None]

    def loss(attention, q, k, v):
        out = attention(q, k, v, segments, segments, index, index).astype(jnp.float32)
        return jnp.sum(out * weights), out

    packed = functools.partial(cudnn_packed_attention, max_segments=4)
    (_, got), got_grads = jax.value_and_grad(lambda *a: loss(packed, *a), (0, 1, 2), has_aux=True)(q, k, v)
    (_, want), want_grads = jax.value_and_grad(lambda *a: loss(reference_attention, *a), (0, 1, 2),
                                               has_aux=True)(q, k, v)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-2)
    assert np.all(np.asarray(got)[~valid] == 0)
    for g, w in zip(got_grads, want_grads):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, w, atol=5e-2 * max(1.0, np.abs(w).max()))
    # More segments in a row than described: NaN (the train step refuses it), never a wrong answer.
    too_few = functools.partial(cudnn_packed_attention, max_segments=1)
    assert np.all(np.isnan(np.asarray(too_few(q, k, v, segments, segments, index, index), np.float32)))


def test_projection_gradient_is_fp32_not_rounded_to_the_compute_dtype():
    """`project` in bf16: y = bf16(x)·bf16(W), and ∂W = bf16(x)ᵀ·bf16(∂y) summed in fp32 *and kept in
    fp32* (verl reduces gradients in fp32). Autodiff through the cast would round ∂W to bf16 (relative
    error ~4e-3), which the 1e-5 bound below refuses; ∂x is in x's dtype."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 48)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(48, 40)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(64, 40)), jnp.float32)

    def loss(kernel, x):
        y = project("ND,DF->NF", x, kernel, jnp.bfloat16, ("embed", "mlp"))
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    grad_kernel, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(kernel, x)
    as64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    g = as64(cotangent.astype(jnp.bfloat16))
    expected = as64(x).T @ g
    assert grad_kernel.dtype == jnp.float32 and grad_x.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad_kernel, np.float64), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as64(grad_x), g @ as64(kernel.astype(jnp.bfloat16)).T, rtol=1e-2, atol=1e-2)


def test_norm_weight_gradient_is_fp32_not_rounded_to_the_compute_dtype():
    """RMSNorm in bf16: y = bf16(w)·bf16(normed), as HF; ∂w = Σ over the 512 tokens of ∂y·normed, summed
    in fp32 *and kept in fp32* (as `project`'s ∂W). The inputs make every rounding before the sum exact
    (rows of ±2^k, so normed = ±1; a bf16 cotangent; eps 0): the sum must match float64 to 1e-6, which
    autodiff's bf16 sum through the weight's cast misses by far (checked below); ∂x as autodiff's."""
    rng = np.random.default_rng(0)
    signs = rng.choice([-1.0, 1.0], size=(4, 128, 48))
    x = jnp.asarray(2.0 ** rng.integers(-3, 4, size=(4, 128, 1)) * signs, jnp.bfloat16)
    weight = jnp.asarray(rng.normal(size=(48,)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(4, 128, 48)), jnp.bfloat16).astype(jnp.float32)
    norm = RMSNorm(0.0, "embed", "float32", "bfloat16")

    def ours(weight, x):
        return norm.apply({"params": {"weight": weight}}, x)

    def autodiff(weight, x):  # the same forward with no custom gradient
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True))
        return weight.astype(jnp.bfloat16) * normed.astype(jnp.bfloat16)

    def grads(scale):
        loss = lambda w, x: jnp.sum(scale(w, x).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(weight, x)

    (grad_w, grad_x), (auto_w, auto_x) = grads(ours), grads(autodiff)
    np.testing.assert_array_equal(np.asarray(ours(weight, x), np.float32), np.asarray(autodiff(weight, x), np.float32))
    expected = np.sum(np.asarray(cotangent, np.float64) * signs, axis=(0, 1))
    assert grad_w.dtype == jnp.float32 and grad_x.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(grad_w, np.float64), expected, rtol=1e-6, atol=1e-6)
    assert np.max(np.abs(np.asarray(auto_w, np.float64) - expected)) > 1e-2  # the bf16 sum
    np.testing.assert_array_equal(np.asarray(grad_x, np.float32), np.asarray(auto_x, np.float32))


def described_fsdp8_hlo(loss, arg_specs, shapes):
    """Compiled HLO text of jax.grad(loss) on 8 described H100s (fsdp 8, the logical rules active); arg_specs
    are the PartitionSpecs of the arguments, shapes their ShapeDtypeStructs."""
    from pathlib import Path

    import flax.linen as nn
    from jax.sharding import Mesh, NamedSharding

    from mathgrpo.config import MeshConfig
    from mathgrpo.parallel import mesh as parallel_mesh
    from mathgrpo.tools import plan

    spec = Path(__file__).resolve().parent.parent / "configs" / "gpus" / "h100_sxm.txtpb"
    config = MeshConfig(data=1, fsdp=8, tensor=1)
    devices = plan.plan_devices(config, gpu_spec=spec.read_text())
    mesh = Mesh(np.array(devices).reshape(1, 8, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel_mesh.logical_rules(config)):
        step = jax.jit(jax.grad(loss), in_shardings=tuple(NamedSharding(mesh, s) for s in arg_specs))
        return step.lower(*shapes).compile().as_text()


@pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (requirements-gpu.txt); no GPU")
def test_projection_gradient_is_reduce_scattered_in_fp32_on_described_gpus():
    """XLA:GPU, fsdp over 8 described H100s, a token-chunk loop over a bf16 projection of an fp32
    sharded kernel: the kernel's gradient is reduce-scattered in fp32 (autodiff: bf16)."""
    import re

    from jax.sharding import PartitionSpec

    D, F, B, T, C = 1024, 4096, 8, 4096, 1024

    def loss(kernel, x):
        def chunk(xc):  # [B, C, D]
            y = project("ND,DF->NF", xc.reshape(-1, D), kernel, jnp.bfloat16, ("embed", "mlp"))
            return jnp.sum(jnp.square(y.astype(jnp.float32)))
        return jnp.sum(jax.lax.map(jax.checkpoint(chunk), x.reshape(B, T // C, C, D).swapaxes(0, 1)))

    text = described_fsdp8_hlo(loss, (PartitionSpec("fsdp", None), PartitionSpec("fsdp", None, None)),
                               (jax.ShapeDtypeStruct((D, F), jnp.float32),
                                jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16)))
    scattered = re.findall(r"((?:bf16|f32)\[[0-9,]+\])\{[0-9,]*\} reduce-scatter", text)
    assert scattered and all(s.startswith("f32[") for s in scattered), scattered


@pytest.mark.skipif(not cuda_plugin_installed(), reason="needs JAX's CUDA plugin (requirements-gpu.txt); no GPU")
@pytest.mark.parametrize("custom", [True, False], ids=["scale_by_weight", "autodiff"])
def test_norm_weight_gradient_is_reduce_scattered_in_fp32_on_described_gpus(custom):
    """XLA:GPU, fsdp over 8 described H100s, a token-chunk loop over bf16 rows times an fp32 sharded
    norm weight: `scale_by_weight` reduces its gradient across devices in fp32 (a reduce-scatter);
    autodiff through the cast (the model before it) in bf16 — both checked, so the test tells the two
    apart."""
    import re

    from jax.sharding import PartitionSpec

    from mathgrpo.model.layers import scale_by_weight

    D, B, T, C = 1024, 8, 4096, 1024

    def scale(rows, weight):
        if custom:
            return scale_by_weight(rows, weight, jnp.bfloat16, ("embed",))
        return weight.astype(jnp.bfloat16) * rows

    def loss(weight, x):
        def chunk(xc):  # [B, C, D]
            return jnp.sum(jnp.square(scale(xc, weight).astype(jnp.float32)))
        return jnp.sum(jax.lax.map(jax.checkpoint(chunk), x.reshape(B, T // C, C, D).swapaxes(0, 1)))

    text = described_fsdp8_hlo(loss, (PartitionSpec("fsdp"), PartitionSpec("fsdp", None, None)),
                               (jax.ShapeDtypeStruct((D,), jnp.float32), jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16)))
    # the gradient's reductions over the fsdp axis: a reduce-scatter to the weight's shards (ours, whose
    # gradient carries the weight's sharding) or an all-reduce (autodiff's has none), sync or async
    reduced = re.findall(r"((?:bf16|f32)\[[0-9,]+\])\{[0-9,]*\} (?:reduce-scatter|all-reduce)(?:-done)?\(", text)
    assert reduced, "no gradient reduction in the compiled step"
    assert all(r.startswith("f32[" if custom else "bf16[") for r in reduced), reduced
