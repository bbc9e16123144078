"""The CPU kernel `rows_dot` (model/cpu_kernels.py) against numpy, and the sampler's use of it."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mathgrpo.config import ModelConfig
from mathgrpo.model import cpu_kernels, init_params
from mathgrpo.rollout import JaxSampler, jax_sampler

SUPPORTED, WHY = cpu_kernels.cpu_supported()
needs_kernel = pytest.mark.skipif(not SUPPORTED or jax.default_backend() != "cpu", reason=f"rows_dot: {WHY}")


@needs_kernel
def test_the_kernel_builds_where_the_machine_supports_it():
    """A machine with AVX-512F and a compiler must get the kernel, not a silent fallback to XLA's dot."""
    assert cpu_kernels.rows_dot_available()
    assert cpu_kernels.library_path().exists()


@needs_kernel
@pytest.mark.parametrize("V, D, B", [
    (1000, 64, 1),     # one column
    (1003, 96, 5),     # rows not a multiple of any tile height; a part of one register of columns
    (997, 128, 17),    # two registers, the second masked
    (2000, 64, 33),
    (1234, 32, 64),    # exactly one block of columns
    (777, 48, 65),     # two blocks, the second of one column
    (500, 40, 130),    # three blocks
    (47, 16, 8),       # fewer rows than one chunk
])
def test_rows_dot_equals_the_float64_product_and_its_columns_are_independent(V, D, B):
    """out = rows · xᵀ up to fp32 rounding of a D-term sum (against numpy in float64), and each column is
    bit-identical to the same column computed alone: the kernel's columns do not see each other."""
    rng = np.random.default_rng(V * 7 + B)
    rows = rng.standard_normal((V, D)).astype(np.float32)
    x = rng.standard_normal((B, D)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_kernels.rows_dot)(rows, x))
    exact = rows.astype(np.float64) @ x.astype(np.float64).T
    # A sequential fp32 sum of D products: each step rounds by at most 2^-24 of the running magnitude.
    bound = D * 2.0**-24 * (np.abs(rows).astype(np.float64) @ np.abs(x).astype(np.float64).T)
    assert got.shape == (V, B) and got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= bound)
    for column in {0, B // 2, B - 1}:
        alone = np.asarray(jax.jit(cpu_kernels.rows_dot)(rows, x[column:column + 1]))[:, 0]
        np.testing.assert_array_equal(alone, got[:, column])
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.rows_dot)(rows, x[::-1]))[:, ::-1], got)


@needs_kernel
def test_rows_dot_names_what_it_takes():
    with pytest.raises(TypeError, match="fp32 operands.*bfloat16"):
        cpu_kernels.rows_dot(jnp.ones((4, 8), jnp.bfloat16), jnp.ones((2, 8)))
    with pytest.raises(ValueError, match=re.escape("rows [V, D] and x [B, D], got (4, 8) and (2, 6)")):
        cpu_kernels.rows_dot(jnp.ones((4, 8)), jnp.ones((2, 6)))


@needs_kernel
def test_the_samplers_head_runs_on_the_kernel_on_one_cpu_device():
    """vocab_logits of an fp32 model on one CPU device is the kernel's product (its custom call is in the
    lowered head); a bf16 model takes XLA's dot."""
    config = ModelConfig(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, compute_dtype="float32",
                         tie_word_embeddings=False)
    params = init_params(config, jax.random.key(0))
    sampler = JaxSampler(config, params, max_length=16, max_slots=4)
    hidden = jax.random.normal(jax.random.key(1), (3, 32))
    logits = jax.jit(lambda held, h: jax_sampler.vocab_logits(config, held, h))
    np.testing.assert_array_equal(logits(sampler.params, hidden),
                                  cpu_kernels.rows_dot(sampler.params["lm_head"]["rows"], hidden))
    assert cpu_kernels.TARGET in logits.lower(sampler.params, hidden).as_text()
    bf16 = config.replace(compute_dtype="bfloat16")
    held = JaxSampler(bf16, params, max_length=16, max_slots=4).params
    assert cpu_kernels.TARGET not in jax.jit(lambda h: jax_sampler.vocab_logits(bf16, held, h)).lower(hidden).as_text()
