"""The fused LM head against a plain full-softmax reference: values and gradients of both outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mathgrpo.config import ModelConfig
from mathgrpo.model import init_params, logits
from mathgrpo.rl import logprobs as rl_logprobs
from mathgrpo.rl.fused_head import fused_logprobs, vocab_block_size


def reference(hidden, kernel, targets, count, temperature):
    """log_softmax over the whole [N, V] logits; entropy = −Σ p·log p; rows ≥ count give 0."""
    x = jnp.dot(hidden, kernel, precision="highest") / temperature
    log_p = jax.nn.log_softmax(x, axis=-1)
    logprob = jnp.take_along_axis(log_p, targets[:, None], axis=-1)[:, 0]
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    needed = jnp.arange(hidden.shape[0]) < count
    return jnp.where(needed, logprob, 0.0), jnp.where(needed, entropy, 0.0)


def inputs(N, D, V, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(keys[0], (N, D))
    kernel = jax.random.normal(keys[1], (D, V)) / np.sqrt(D) * 3.0  # peaked softmaxes as well as flat ones
    targets = jax.random.randint(keys[2], (N,), 0, V)
    return hidden, kernel, targets, jax.random.normal(keys[3], (N,)), jax.random.normal(keys[4], (N,))


def test_vocab_block_size_tiles_the_vocabulary():
    assert vocab_block_size(151_936, 8192) == 4748  # 151,936 = 2⁷·1187: 32 blocks of 4·1187
    assert 151_936 % vocab_block_size(151_936, 16384) == 0
    assert vocab_block_size(300, 8192) == 300  # one block
    assert vocab_block_size(293, 64) == 64  # 293 is prime: padded blocks


@pytest.mark.parametrize("V, temperature, row_block, vocab_block, save, count", [
    (301, 1.0, 8, 64, False, 29),  # 7 blocks of 43
    (293, 0.7, 5, 64, True, 37),  # prime vocabulary: 5 blocks of 64, the last one padded
    (293, 1.3, 64, 8192, False, 20),  # one block each way
    (128, 1.0, 4, 16, True, 0),  # nothing to score
])
def test_values_and_gradients_equal_full_softmax(V, temperature, row_block, vocab_block, save, count):
    N, D = 37, 16
    hidden, kernel, targets, g_logprob, g_entropy = inputs(N, D, V)

    def fused(h, k):
        return fused_logprobs(h, k, targets, count, temperature=temperature, row_block=row_block,
                              vocab_block=vocab_block, save_logits=save)

    def plain(h, k):
        return reference(h, k, targets, count, temperature)

    def objective(fn):  # both outputs carry a gradient (an entropy bonus needs the second)
        return lambda h, k: jnp.sum(fn(h, k)[0] * g_logprob) + jnp.sum(fn(h, k)[1] * g_entropy)

    for got, want in zip(jax.jit(fused)(hidden, kernel), plain(hidden, kernel)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    got = jax.jit(jax.grad(objective(fused), argnums=(0, 1)))(hidden, kernel)
    want = jax.grad(objective(plain), argnums=(0, 1))(hidden, kernel)
    for a, b in zip(got, want):
        scale = float(jnp.max(jnp.abs(b))) or 1.0
        np.testing.assert_allclose(a / scale, b / scale, atol=2e-5)
    if count == 0:
        assert float(jnp.max(jnp.abs(got[1]))) == 0.0


def test_bf16_head_accumulates_in_fp32():
    hidden, kernel, targets, g_logprob, _ = inputs(24, 32, 200, seed=3)
    h16, k16 = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    logprob, entropy = fused_logprobs(h16, k16, targets, 24, row_block=8, vocab_block=64)
    want_lp, want_entropy = reference(h16.astype(jnp.float32), k16.astype(jnp.float32), targets, 24, 1.0)
    assert logprob.dtype == jnp.float32
    np.testing.assert_allclose(logprob, want_lp, atol=2e-2)  # bf16 products, fp32 sums
    np.testing.assert_allclose(entropy, want_entropy, atol=2e-2)
    dh, dk = jax.grad(lambda h, k: jnp.sum(fused_logprobs(h, k, targets, 24, row_block=8, vocab_block=64)[0]
                                           * g_logprob), argnums=(0, 1))(h16, k16)
    assert dh.dtype == jnp.bfloat16 and dk.dtype == jnp.bfloat16


def test_kernel_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"expected \[D, V\]"):
        fused_logprobs(jnp.zeros((4, 8)), jnp.zeros((16, 8)), jnp.zeros(4, jnp.int32), 4)


TINY = ModelConfig(vocab_size=301, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, compute_dtype="float32",
                   tie_word_embeddings=True)


def test_masked_token_logprobs_score_only_the_masked_positions():
    """With a mask, grpo.token_logprobs scores the masked positions (from the position before) exactly
    as the full softmax of the model's logits does, and gives 0 everywhere else."""
    params = init_params(TINY, jax.random.key(1))
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (2, 19)))
    positions = jnp.broadcast_to(jnp.arange(19), (2, 19))
    mask = jnp.asarray(rng.random((2, 19)) < 0.5).at[:, 0].set(True)  # position 0 has no prediction
    logprobs, entropy = rl_logprobs.token_logprobs(TINY, params, tokens, positions, jnp.ones_like(tokens), mask=mask,
                                            chunk_size=4, vocab_block=64)
    full = np.asarray(logits(TINY, params, tokens), np.float64)  # [B, T, V]
    log_softmax = full - full.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected_lp = np.take_along_axis(log_softmax[:, :-1], np.asarray(tokens)[:, 1:, None], -1)[..., 0]
    expected_entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)[:, :-1]
    scored = np.asarray(mask).copy()
    scored[:, 0] = False
    np.testing.assert_allclose(np.asarray(logprobs)[:, 1:][scored[:, 1:]], expected_lp[scored[:, 1:]], atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy)[:, 1:][scored[:, 1:]], expected_entropy[scored[:, 1:]], atol=1e-5)
    assert np.all(np.asarray(logprobs)[~scored] == 0.0) and np.all(np.asarray(entropy)[~scored] == 0.0)


def test_nothing_to_score_gives_zero_gradient_even_with_huge_logits():
    """count 0 with recomputed tiles: the backward still visits row block 0 (it is peeled out of the
    row loop), whose rows have no log-sum-exp; logits far past exp's fp32 range must give 0, not nan."""
    N, D, V = 12, 8, 96
    hidden, kernel, targets, g_logprob, g_entropy = inputs(N, D, V)
    hidden = hidden * 100.0  # logits of order 10^2-10^3: exp overflows to inf without the mask

    def objective(h, k):
        logprob, entropy = fused_logprobs(h, k, targets, 0, row_block=4, vocab_block=32, save_logits=False)
        return jnp.sum(logprob * g_logprob) + jnp.sum(entropy * g_entropy)

    assert float(jnp.max(jnp.abs(hidden @ kernel))) > 200.0
    grads = jax.jit(jax.grad(objective, argnums=(0, 1)))(hidden, kernel)
    for g in grads:
        assert bool(jnp.all(g == 0.0)), g
