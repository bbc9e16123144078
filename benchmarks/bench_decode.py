"""`python -m benchmarks --decode`: the JAX sampler's decode speed at Qwen3-4B shapes against the
memory roofline of one accelerator.

Random bf16 weights of configs/models/qwen3_4b_base.yaml (`--decode-layers` of its 36), the continuous
sampler with a pool of `--decode-slots` rows, one request per row: prompts of `--decode-prompt` tokens
and exactly `--decode-tokens` new tokens each (no stop tokens), T = 1. One warm-up call in which every
request stops after its first token (the same compiled shapes), then one timed call.

The roofline: a decode step must read every weight once and each live row's keys and values up to its
position, so at best it takes (weight bytes + KV bytes read) / bandwidth seconds and makes one token per
row. Weight bytes: every matmul weight in bf16, the LM head (tied in Qwen3-4B: the embedding table) once;
the embedding lookup reads a row per token, not counted. KV bytes read per step, on
average over the call: rows × (prompt + (new tokens − 1) / 2) × 2 (k, v) × layers × kv heads × head dim ×
2 bytes. Bandwidth: a copy of a 2 GiB array measured in the same run (bytes read + written / seconds),
the achievable figure rather than the data sheet's. The sampler's decode attention reads the cache in
blocks up to the furthest row's position (model/layers.decode_attention), so it reads at most a block
per row more than the roofline counts; the fraction says what that and everything else costs.
"""

from __future__ import annotations

import argparse
import time


def copy_bandwidth(gib: float = 2.0, repeats: int = 5) -> float:
    """Bytes per second of the best of `repeats` copies of a `gib`-GiB bf16 array (read + write)."""
    import jax
    import jax.numpy as jnp

    n = int(gib * 2**30) // 2
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda a: a + jnp.bfloat16(1))  # one read and one write of every element
    copy(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        copy(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n * 2 / best


def roofline_bytes_per_step(config, rows: int, context: float) -> tuple[int, float]:
    """(weight bytes, mean KV bytes) one decode step of `rows` rows at mean `context` must read."""
    from mathgrpo.tracking.flops import dense_parameters

    # verl's N_dense counts the embedding and the LM head, V·D each, tied or not; a step reads the head
    # whole and only a row of the embedding per token (tied: the same table, read once as the head).
    weight_bytes = 2 * (dense_parameters(config) - config.vocab_size * config.hidden_size)
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    return weight_bytes, rows * context * kv_per_token


def run(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from mathgrpo.config import load_model_config
    from mathgrpo.model import init_params
    from mathgrpo.rollout.base import SamplingParams
    from mathgrpo.rollout.jax_sampler import JaxSampler

    config = load_model_config("configs/models/qwen3_4b_base.yaml", (f"num_hidden_layers={args.decode_layers}",))
    config = config.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    if args.decode_hidden:  # a smaller model of the same layout (tests on CPU)
        config = config.replace(hidden_size=args.decode_hidden, intermediate_size=3 * args.decode_hidden,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=4096)
    params = jax.jit(init_params, static_argnums=0)(config, jax.random.key(0))
    rows, P, M = args.decode_slots, args.decode_prompt, args.decode_tokens
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, P).tolist() for _ in range(rows)]
    sampler = JaxSampler(config, params, max_length=P + M, max_slots=rows, prompt_bucket=P)
    sampling = SamplingParams(n=1, temperature=1.0, max_tokens=M, seed=0)
    sampler.generate(prompts, sampling, max_tokens=[1] * rows)  # compiles: the same shapes
    start = time.perf_counter()
    out = sampler.generate(prompts, sampling)
    seconds = time.perf_counter() - start
    assert int(out.lengths.min()) == M, "every request must make exactly --decode-tokens tokens"
    tokens = rows * M
    weight_bytes, kv_bytes = roofline_bytes_per_step(config, rows, P + (M - 1) / 2)
    bandwidth = copy_bandwidth(args.decode_copy_gib)
    roofline = rows * bandwidth / (weight_bytes + kv_bytes)  # tokens/s: one token per row per step
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "layers": config.num_hidden_layers, "hidden": config.hidden_size, "rows": rows, "prompt": P,
        "new_tokens": M, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "weight_bytes_per_step": weight_bytes, "kv_bytes_per_step": kv_bytes,
        "copy_bandwidth_bytes_per_s": bandwidth, "roofline_tokens_per_s": roofline,
        "fraction_of_roofline": tokens / seconds / roofline,
        "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
    }


def format_report(r: dict) -> str:
    return "\n".join([
        f"decode: Qwen3-4B shapes, {r['layers']} layers (hidden {r['hidden']}), bf16, {r['rows']} rows x "
        f"({r['prompt']} prompt + {r['new_tokens']} new tokens) on {r['device_kind']}",
        f"  {r['tokens_per_s']:,.0f} tokens/s ({r['seconds']:.2f} s); a step reads >= "
        f"{r['weight_bytes_per_step'] / 2**30:.2f} GiB of weights + {r['kv_bytes_per_step'] / 2**30:.2f} GiB of KV",
        f"  copy bandwidth {r['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s -> roofline "
        f"{r['roofline_tokens_per_s']:,.0f} tokens/s; fraction {r['fraction_of_roofline']:.3f}",
    ])


def main(args: argparse.Namespace) -> int:
    from benchmarks.bench_mfu import emit

    report = run(args)
    return emit(report, format_report(report), args.out)
