"""The LM head at K ids per row and its top-k, against plain full-softmax references: values, gradients (repeated
ids included), lax.top_k's ids and tie-breaking (within and across vocabulary blocks and devices, against the
padding of a last block), the vocabulary-parallel mesh path, and compiled memory far below [N, V] fp32 logits."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mathgrpo.config import MeshConfig, ModelConfig
from mathgrpo.model import init_params, logits
from mathgrpo.parallel import mesh as parallel_mesh
from mathgrpo.rl import logprobs as rl_logprobs
from mathgrpo.rl.fused_head import fused_logprobs, fused_topk

FLOAT_MIN = float(jnp.finfo(jnp.float32).min)


def full_log_softmax(hidden, kernel, temperature):
    return jax.nn.log_softmax(jnp.dot(hidden, kernel, precision="highest") / temperature, axis=-1)


def reference_topk(hidden, kernel, k, count, temperature):
    """jax.lax.top_k of the whole [N, V] log-softmax; rows ≥ count give ids 0 and values 0."""
    values, ids = jax.lax.top_k(full_log_softmax(hidden, kernel, temperature), k)
    needed = (jnp.arange(hidden.shape[0]) < count)[:, None]
    return jnp.where(needed, ids, 0), jnp.where(needed, values, 0.0)


def reference_logprobs(hidden, kernel, targets, count, temperature):
    """log_softmax gathered at targets [N, K]; entropy = −Σ p·log p; rows ≥ count give 0."""
    log_p = full_log_softmax(hidden, kernel, temperature)
    needed = jnp.arange(hidden.shape[0]) < count
    logprob = jnp.take_along_axis(log_p, targets, axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return jnp.where(needed[:, None], logprob, 0.0), jnp.where(needed, entropy, 0.0)


def inputs(N, D, V, K, seed=0):
    """Random rows and head (peaked softmaxes as well as flat ones), K ids per row with repeats: column 3
    repeats column 0 and row 1 lists one id K times."""
    keys = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(keys[0], (N, D))
    kernel = jax.random.normal(keys[1], (D, V)) / np.sqrt(D) * 3.0
    targets = jax.random.randint(keys[2], (N, K), 0, V)
    targets = targets.at[:, 3].set(targets[:, 0]).at[1].set(targets[1, 0])
    return hidden, kernel, targets, jax.random.normal(keys[3], (N, K)), jax.random.normal(keys[4], (N,))


def tied_inputs(N, V, seed=0):
    """Rows whose logits are small integers (many exact ties, in every block and across block and device
    boundaries): one-hot hidden states pick integer rows of the head, so h·W is exact."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(np.eye(N, dtype=np.float32))
    kernel = jnp.asarray(rng.integers(0, 4, (N, V)).astype(np.float32))
    return hidden, kernel


def assert_grads_close(got, want, tol=1e-5):
    for a, b in zip(got, want):
        scale = float(jnp.max(jnp.abs(b))) or 1.0
        np.testing.assert_allclose(a / scale, b / scale, atol=tol)


@pytest.mark.parametrize("V, temperature, row_block, vocab_block, k, count", [
    (301, 1.0, 8, 64, 16, 29),  # 7 blocks of 43
    (293, 0.7, 5, 64, 16, 37),  # prime vocabulary: 5 blocks of 64, the last one padded
    (293, 1.3, 64, 16, 20, 20),  # k > vocabulary block: a tile offers fewer than k candidates
    (128, 1.0, 4, 16, 1, 0),  # nothing to compute: ids and log-probs 0
])
def test_topk_equals_lax_top_k_of_full_logits(V, temperature, row_block, vocab_block, k, count):
    N, D = 37, 16
    hidden, kernel, targets, _, _ = inputs(N, D, V, 5)
    run = jax.jit(lambda h, w, t: fused_topk(h, w, k, count, temperature=temperature, row_block=row_block,
                                             vocab_block=vocab_block, targets=t))
    ids, values, picked = run(hidden, kernel, targets)
    want_ids, want_values = reference_topk(hidden, kernel, k, count, temperature)
    assert ids.dtype == jnp.int32 and ids.shape == (N, k) and values.shape == (N, k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(values, want_values, atol=1e-5, rtol=0)
    # the same walk's log-probs at given ids are fused_logprobs' (targets [N, K] and [N])
    want_picked, _ = reference_logprobs(hidden, kernel, targets, count, temperature)
    np.testing.assert_allclose(picked, want_picked, atol=1e-5, rtol=0)
    _, _, one = fused_topk(hidden, kernel, k, count, temperature=temperature, row_block=row_block,
                           vocab_block=vocab_block, targets=targets[:, 0])
    np.testing.assert_allclose(one, want_picked[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("V, vocab_block, k", [
    (301, 8, 16),  # blocks of 7: k > block, ties across every boundary
    (293, 16, 40),  # prime: padded last block
    (301, 512, 301),  # one block, the whole vocabulary sorted
])
def test_topk_breaks_ties_like_lax_top_k(V, vocab_block, k):
    """Logits in {0, 1, 2, 3}: equal values everywhere; lax.top_k's ids are the lower ones among equals."""
    N = 11
    hidden, kernel = tied_inputs(N, V)
    ids, values = fused_topk(hidden, kernel, k, N, row_block=4, vocab_block=vocab_block)
    want_ids, want_values = reference_topk(hidden, kernel, k, N, 1.0)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(values, want_values, atol=1e-5, rtol=0)


def test_padding_columns_never_win_a_tie():
    """V = 13 in blocks of 8: the last block has 5 real columns and 3 padding ones at the lowest float. Real
    columns at that same value are still picked before any padding column (lower ids first), k = V."""
    V = 13
    rng = np.random.default_rng(1)
    row = rng.integers(0, 4, V).astype(np.float32)
    row[8:] = FLOAT_MIN  # the real columns of the padded block tie with its padding
    row[2] = FLOAT_MIN  # and one in the first block
    hidden, kernel = jnp.ones((3, 1)), jnp.asarray(row[None, :])
    ids, values = fused_topk(hidden, kernel, V, 3, row_block=2, vocab_block=8)
    want_values, want_ids = jax.lax.top_k(jnp.asarray(row), V)
    assert sorted(np.asarray(ids[0]).tolist()) == list(range(V))
    np.testing.assert_array_equal(ids, np.broadcast_to(want_ids, (3, V)))
    np.testing.assert_allclose(values, np.broadcast_to(want_values - jax.nn.logsumexp(row), (3, V)), rtol=1e-6)


def test_topk_refuses_k_outside_the_vocabulary():
    with pytest.raises(ValueError, match="expected 1 ≤ k ≤ V"):
        fused_topk(jnp.zeros((4, 8)), jnp.zeros((8, 10)), 11, 4)


@pytest.mark.parametrize("V, temperature, row_block, vocab_block, save, count", [
    (301, 1.0, 8, 64, False, 29),  # 7 blocks of 43
    (293, 0.7, 5, 64, True, 37),  # padded last block, saved tiles
    (128, 1.0, 4, 16, False, 0),  # nothing to score: zero gradient
])
def test_logprobs_at_k_ids_values_and_gradients_equal_full_softmax(V, temperature, row_block, vocab_block, save,
                                                                  count):
    """[N, K] targets with repeated ids: values, and the gradient in hidden and kernel of Σ g·logprob + Σ e·entropy
    (a random cotangent for each), equal jax.grad of the full-logits computation."""
    N, D, K = 37, 16, 6
    hidden, kernel, targets, g_logprob, g_entropy = inputs(N, D, V, K)

    def fused(h, w):
        return fused_logprobs(h, w, targets, count, temperature=temperature, row_block=row_block,
                              vocab_block=vocab_block, save_logits=save)

    def plain(h, w):
        return reference_logprobs(h, w, targets, count, temperature)

    def objective(fn):
        return lambda h, w: jnp.sum(fn(h, w)[0] * g_logprob) + jnp.sum(fn(h, w)[1] * g_entropy)

    got, want = jax.jit(fused)(hidden, kernel), plain(hidden, kernel)
    assert got[0].shape == (N, K) and got[1].shape == (N,)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    grads = jax.jit(jax.grad(objective(fused), argnums=(0, 1)))(hidden, kernel)
    assert_grads_close(grads, jax.grad(objective(plain), argnums=(0, 1))(hidden, kernel))
    if count == 0:
        assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in grads)
    # one id per row as [N, 1] is the [N] head
    single = fused_logprobs(hidden, kernel, targets[:, 0], count, temperature=temperature, row_block=row_block,
                            vocab_block=vocab_block)
    column = fused_logprobs(hidden, kernel, targets[:, :1], count, temperature=temperature, row_block=row_block,
                            vocab_block=vocab_block)
    np.testing.assert_array_equal(single[0], column[0][:, 0])


MESHES = {"fsdp8": MeshConfig(data=1, fsdp=8, tensor=1), "fsdp4_tp2": MeshConfig(data=1, fsdp=4, tensor=2)}


def position_reference(hidden, kernel, targets, mask, k, temperature):
    """Per position t (scored from hidden[t-1], position 0 and unmasked positions 0): log-probs at targets
    [B, T, K], entropy, top-k ids and log-probs, all from the full log-softmax."""
    B, T, D = hidden.shape
    shifted = jnp.concatenate([hidden[:, :1], hidden[:, :-1]], axis=1).reshape(B * T, D)
    log_p = full_log_softmax(shifted, kernel, temperature)
    values, ids = jax.lax.top_k(log_p, k)
    score = (jnp.asarray(mask) > 0).at[:, 0].set(False).reshape(B * T, 1)
    logprob = jnp.take_along_axis(log_p, targets.reshape(B * T, -1), axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1, keepdims=True)
    return {name: jnp.where(score, value, 0).reshape(B, T, -1) for name, value in
            dict(logprob=logprob, entropy=entropy, ids=ids, values=values).items()}


@pytest.mark.parametrize("mesh_name", [None, "fsdp8", "fsdp4_tp2"])
def test_hidden_head_at_k_ids_and_topk_on_one_device_and_on_a_mesh(mesh_name):
    """hidden_logprobs with [B, T, K] ids (values and gradients) and hidden_topk (with the teacher's targets)
    equal the full-softmax reference, on the fused head and on the vocabulary-parallel mesh path (V = 301
    does not split evenly over 8 devices: padded columns)."""
    B, T, D, V, K, k, temperature = 2, 13, 16, 301, 5, 16, 0.8
    hidden, kernel, targets, g_logprob, g_entropy = inputs(B * T, D, V, K, seed=2)
    hidden, targets, g_logprob = hidden.reshape(B, T, D), targets.reshape(B, T, K), g_logprob.reshape(B, T, K)
    mask = jax.random.uniform(jax.random.key(3), (B, T)) < 0.7
    options = dict(temperature=temperature, chunk_size=4, mask=mask, vocab_block=64)

    def head(h, w):
        return rl_logprobs.hidden_logprobs(None, w, h, targets, **options)

    def objective(h, w):
        logprob, entropy = head(h, w)
        return jnp.sum(logprob * g_logprob) + jnp.sum(entropy * g_entropy.reshape(B, T))

    def plain(h, w):
        ref = position_reference(h, w, targets, mask, k, temperature)
        return jnp.sum(ref["logprob"] * g_logprob) + jnp.sum(ref["entropy"][..., 0] * g_entropy.reshape(B, T))

    def topk(h, w):
        return rl_logprobs.hidden_topk(None, w, h, k=k, targets=targets, **options)

    mesh = None if mesh_name is None else parallel_mesh.make_mesh(MESHES[mesh_name], jax.devices()[:8])
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        (logprob, entropy), grads = jax.jit(head)(hidden, kernel), jax.jit(jax.grad(objective, (0, 1)))(hidden, kernel)
        ids, values, picked = jax.jit(topk)(hidden, kernel)
        one, _ = jax.jit(lambda h, w: rl_logprobs.hidden_logprobs(None, w, h, targets[..., 0], **options))(
            hidden, kernel)  # one id per position, [B, T]: the path the GRPO step takes
    ref = position_reference(hidden, kernel, targets, mask, k, temperature)
    np.testing.assert_allclose(logprob, ref["logprob"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(entropy, ref["entropy"][..., 0], atol=1e-5, rtol=1e-5)
    assert_grads_close(grads, jax.grad(plain, (0, 1))(hidden, kernel))
    np.testing.assert_array_equal(ids, ref["ids"])
    np.testing.assert_allclose(values, ref["values"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(picked, ref["logprob"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(one, ref["logprob"][..., 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mesh_name", [None, "fsdp8"])
def test_hidden_topk_breaks_ties_like_lax_top_k(mesh_name):
    """Integer logits: ties inside vocabulary blocks and devices and across their boundaries (301 columns over 8
    devices of 38, blocks of 7)."""
    N, V, k = 9, 301, 24
    hidden, kernel = tied_inputs(N, V, seed=3)
    hidden = jnp.concatenate([hidden, jnp.zeros((1, N))])[None]  # [1, N + 1, N]: position t from row t - 1
    mesh = None if mesh_name is None else parallel_mesh.make_mesh(MESHES[mesh_name], jax.devices()[:8])
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        ids, values = jax.jit(lambda h, w: rl_logprobs.hidden_topk(None, w, h, k=k, chunk_size=4, vocab_block=8))(
            hidden, kernel)
    want_values, want_ids = jax.lax.top_k(jax.nn.log_softmax(jnp.asarray(hidden[0, :-1]) @ kernel), k)
    np.testing.assert_array_equal(ids[0, 1:], want_ids)
    np.testing.assert_allclose(values[0, 1:], want_values, atol=1e-5, rtol=0)
    assert np.all(np.asarray(ids[0, 0]) == 0)


TINY = ModelConfig(vocab_size=301, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, compute_dtype="float32",
                   tie_word_embeddings=True)


def test_token_topk_and_token_logprobs_at_its_ids_agree_with_the_model():
    """The model's top-k at the masked positions equals lax.top_k of its full logits; scoring those ids with
    token_logprobs(targets=) gives the same log-probs (the student scoring its own top-k)."""
    params = init_params(TINY, jax.random.key(1))
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 19)))
    positions = jnp.broadcast_to(jnp.arange(19), (2, 19))
    mask = jnp.asarray(rng.random((2, 19)) < 0.5)
    segments = jnp.ones_like(tokens)
    ids, values = rl_logprobs.token_topk(TINY, params, tokens, positions, segments, k=16, mask=mask, chunk_size=4,
                                         vocab_block=64)
    full = jax.nn.log_softmax(logits(TINY, params, tokens), axis=-1)  # [B, T, V]
    want_values, want_ids = jax.lax.top_k(full[:, :-1], 16)
    scored = np.asarray(mask).copy()
    scored[:, 0] = False
    np.testing.assert_array_equal(np.asarray(ids)[:, 1:][scored[:, 1:]], np.asarray(want_ids)[scored[:, 1:]])
    np.testing.assert_allclose(np.asarray(values)[:, 1:][scored[:, 1:]], np.asarray(want_values)[scored[:, 1:]],
                               atol=1e-5)
    assert np.all(np.asarray(ids)[~scored] == 0) and np.all(np.asarray(values)[~scored] == 0.0)
    rescored, _ = rl_logprobs.token_logprobs(TINY, params, tokens, positions, segments, mask=mask, chunk_size=4,
                                             vocab_block=64, targets=ids)
    np.testing.assert_allclose(rescored, values, atol=1e-5)


def test_blocked_head_compiles_far_below_full_logits():
    """At N = 1024 rows, D = 256, V = 151,936 (blocks of 4,748), compiled only: the top-k pass (with K = 16
    targets) and the K-id log-prob pass take < 1/16 of the N·V·4 bytes of fp32 logits in temporaries, the
    K-id gradient < 1/8 (its [D, V] kernel gradient is an output); the naive top-k takes all of them."""
    N, D, V, K, k = 1024, 256, 151_936, 16, 16
    hidden, kernel = jax.ShapeDtypeStruct((N, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32)
    targets, cotangent = jax.ShapeDtypeStruct((N, K), jnp.int32), jax.ShapeDtypeStruct((N, K), jnp.float32)
    options = dict(row_block=512, vocab_block=8192)

    def temp_bytes(fn, *args):
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = N * V * 4
    topk = temp_bytes(lambda h, w, t: fused_topk(h, w, k, N, targets=t, **options), hidden, kernel, targets)
    forward = temp_bytes(lambda h, w, t: fused_logprobs(h, w, t, N, **options), hidden, kernel, targets)
    grad = temp_bytes(lambda h, w, t, g: jax.grad(
        lambda h, w: jnp.sum(fused_logprobs(h, w, t, N, **options)[0] * g), argnums=(0, 1))(h, w),
        hidden, kernel, targets, cotangent)
    naive = temp_bytes(lambda h, w: jax.lax.top_k(jax.nn.log_softmax(h @ w), k), hidden, kernel)
    print(f"temp MiB: top-k {topk / 2**20:.1f}, K-id log-probs {forward / 2**20:.1f}, their gradient "
          f"{grad / 2**20:.1f}, naive top-k {naive / 2**20:.1f}; [N, V] fp32 logits {logits_bytes / 2**20:.1f}")
    assert topk < logits_bytes / 16 and forward < logits_bytes / 16
    assert grad < logits_bytes / 8
    assert naive >= logits_bytes  # the measure sees whole logits when they exist
