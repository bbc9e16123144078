"""GPU only: the per-step fixed cost of the 4B train step outside the decoder layers — the chunked
log-prob + entropy pass over the 151,936-word head (fwd + bwd, per chunk size), the tied embedding's
gradient, and AdamW over the 4B-shaped embedding + 12 layers — each timed alone on one 16,384-token row.

    python scripts/gpu_head_probe.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from mathgrpo.config import load_model_config
from mathgrpo.rl import logprobs as rl_logprobs


def timed(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    model = load_model_config("configs/models/qwen3_4b_base.yaml").replace(compute_dtype="bfloat16")
    T, D, V = 16384, model.hidden_size, model.vocab_size
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (1, T, D), jnp.bfloat16)
    kernel = (jax.random.normal(keys[1], (D, V), jnp.float32) * 0.02).astype(jnp.bfloat16)
    tokens = jax.random.randint(keys[2], (1, T), 0, V)
    weights = jax.random.normal(keys[3], (1, T), jnp.float32)
    matmul_flops = 4 * 2 * T * D * V  # forward, recomputed forward, two backward matmuls
    print(f"{jax.devices()[0].device_kind}; head matmul work per row (fwd+recompute+bwd): "
          f"{matmul_flops / 1e12:.1f} TFLOP")
    for chunk in (512, 2048, 4096, 8192):
        def loss(h, k):
            logprobs, entropy = rl_logprobs.hidden_logprobs(model, k, h, tokens, chunk_size=chunk)
            return jnp.sum(logprobs * weights) + 1e-3 * jnp.sum(entropy * weights)

        fn = jax.jit(jax.grad(loss, (0, 1)))
        seconds = timed(fn, hidden, kernel)
        print(f"log-prob+entropy fwd+bwd, chunk {chunk:>5}: {seconds * 1e3:8.1f} ms  "
              f"({matmul_flops / seconds / 1e12:6.1f} TFLOP/s of head matmuls)", flush=True)

    embedding = jax.random.normal(keys[1], (V, D), jnp.float32)
    cotangent = jax.random.normal(keys[0], (1, T, D), jnp.float32)
    embed_grad = jax.jit(jax.grad(lambda e: jnp.sum(jnp.take(e, tokens, axis=0) * cotangent)))
    print(f"embedding gradient (scatter-add into [V, D] fp32): {timed(embed_grad, embedding) * 1e3:8.1f} ms",
          flush=True)

    params = {"embed": embedding, "layers": jnp.zeros((12 * 101_000_000 // D, D), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-6, weight_decay=0.01))
    state = optimizer.init(params)

    @jax.jit
    def update(params, state, grads):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    count = sum(p.size for p in jax.tree.leaves(params))
    print(f"AdamW + clip over {count / 1e9:.2f}B fp32 params: {timed(update, params, state, grads) * 1e3:8.1f} ms",
          flush=True)


if __name__ == "__main__":
    main()
