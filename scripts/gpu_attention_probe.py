"""GPU only: the cuDNN attention paths at the recipe's shapes (one packed row of 16,384 tokens, 32 query
heads, 8 kv heads, head dim 128), forward + backward: compiled temporary bytes and time of each.

    python scripts/gpu_attention_probe.py [--tokens 16384] [--segments 8 64 256]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from mathgrpo.model import layers


def packed_row(tokens: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    segment, start, sid = np.zeros((1, tokens), np.int32), 0, 1
    while start < tokens - 64:
        n = int(min(rng.integers(512, 8193), tokens - 64 - start))
        segment[0, start:start + n] = sid
        start, sid = start + n, sid + 1
    return segment


def probe(name, attention, q, k, v, segment, index):
    def loss(q, k, v):
        return jnp.sum(attention(q, k, v, segment, segment, index, index).astype(jnp.float32) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    try:
        compiled = fn.lower(q, k, v).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(compiled(q, k, v))
        start = time.perf_counter()
        for _ in range(5):
            out = compiled(q, k, v)
        jax.block_until_ready(out)
        seconds = (time.perf_counter() - start) / 5
        print(f"{name:<28} temp {temp / 2**30:8.2f} GiB   fwd+bwd {seconds * 1e3:8.2f} ms", flush=True)
    except Exception as error:  # report and go on: this is a probe
        print(f"{name:<28} FAILED {type(error).__name__}: {str(error)[:300]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--segments", type=int, nargs="*", default=[8, 64, 256])
    args = parser.parse_args()
    T, N, K, H = args.tokens, 32, 8, 128
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (1, T, N, H), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, T, K, H), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, T, K, H), jnp.bfloat16)
    segment = jnp.asarray(packed_row(T))
    index = jnp.arange(T)
    print(f"T={T}, {int(segment.max())} segments; {jax.devices()[0].device_kind}")
    probe("cudnn (mask as bias)", layers.cudnn_attention, q, k, v, segment, index)

    def causal_masked(q, k, v, qs, ks, qi, ki):
        mask = layers.attention_mask(qs, ks, qi, ki)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")

    probe("cudnn (mask + is_causal)", causal_masked, q, k, v, segment, index)
    for m in args.segments:
        layers.CUDNN_MAX_SEGMENTS = m
        probe(f"cudnn packed, M={m}", layers.cudnn_packed_attention, q, k, v, segment, index)
    probe("blockwise 512", lambda *a: layers.blockwise_attention(*a, block_size=512), q, k, v, segment, index)


if __name__ == "__main__":
    main()
