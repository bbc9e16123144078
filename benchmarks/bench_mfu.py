"""`python -m benchmarks --mfu`: the train step's model FLOPs utilization on one accelerator.

The 4B recipe's shapes (configs/models/qwen3_4b_base.yaml) with fewer layers so the fp32 params, AdamW
state and gradients fit one device; packed micro-batches of `--mfu-tokens` tokens (sequences of mixed
lengths, as after rollout), `--mfu-micro-batches` per step, bf16 compute, cuDNN attention on GPU. MFU is
verl's: `metrics.flops_per_step` (6·N_dense·tokens + attention, the recompute of remat not counted) /
step seconds / the device's bf16 dense peak (989.4 TFLOP/s on H100 SXM, verl's `get_device_flops`).
Also printed, from the same run: a bf16 8192³ matmul's FLOP/s (the achievable peak), the compiled
program's memory analysis and the device's measured peak bytes in use.

`--mfu-compile-only` stops after compiling and prints the memory analysis: on CPU it gives XLA:CPU's
estimate of the same program, to set against the GPU's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16, verl's get_device_flops


def device_peak(kind: str) -> float | None:
    for name, value in PEAK_BF16.items():
        if name in kind:
            return value
    return None


def bf16_matmul_flops_per_s(size: int = 8192, repeats: int = 10) -> float:
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = dot(a, b)
    out.block_until_ready()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def mixed_lengths(total: int, seed: int, shortest: int = 512, longest: int = 8192) -> list[int]:
    """Sequence lengths (prompt + response) that fill one `total`-token row, as packing would."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(min(rng.integers(shortest, longest + 1), total - sum(lengths))))
    return [n for n in lengths if n >= 2]


def run(args: argparse.Namespace) -> dict:
    import jax
    import numpy as np

    from mathgrpo.config import GRPOConfig, OptimConfig, load_model_config
    from mathgrpo.model import init_params
    from mathgrpo.tools import plan
    from mathgrpo.tracking import flops
    from mathgrpo.train import packing
    from mathgrpo.train import state as train_state
    from mathgrpo.train import step as train_step_lib

    on_gpu = jax.default_backend() == "gpu"
    attention = args.mfu_attention or ("cudnn" if on_gpu else "blockwise")
    model = load_model_config("configs/models/qwen3_4b_base.yaml", (f"num_hidden_layers={args.mfu_layers}",))
    model = model.replace(param_dtype="float32", compute_dtype="bfloat16", attention=attention,
                          attention_block_size=512, attention_max_segments=args.mfu_max_segments,
                          token_chunk_size=args.mfu_token_chunk,
                          remat_policy=args.mfu_remat)
    algo = GRPOConfig(rollout_is="token", micro_batch_tokens=args.mfu_tokens, logprob_chunk_size=args.mfu_logprob_chunk,
                      logprob_vocab_block=args.mfu_vocab_block)
    optim = OptimConfig(lr=1e-6)
    rng = np.random.default_rng(0)
    prompts, responses, lengths = [], [], []
    for m in range(args.mfu_micro_batches):
        for n in mixed_lengths(args.mfu_tokens, seed=m):
            p = min(1024, n // 4)
            prompts.append(rng.integers(3, model.vocab_size, p))
            responses.append(rng.integers(3, model.vocab_size, n - p))
            lengths.append(n)
    advantages = rng.normal(size=len(prompts))
    batch, _ = packing.pack(prompts, responses, advantages, num_rows=1, row_length=args.mfu_tokens,
                            max_sequences_per_row=packing.sequence_cap(model),
                            rollout_logprobs=[-rng.random(len(r)) for r in responses])
    report: dict = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                    "layers": model.num_hidden_layers, "attention": attention, "remat": model.remat_policy,
                    "micro_batch_tokens": args.mfu_tokens, "micro_batches": int(batch.num_micro_batches),
                    "tokens_per_step": int(sum(lengths)), "sequences": len(lengths)}
    step = train_step_lib.make_train_step(model, algo, optim)
    abstract = jax.eval_shape(lambda: train_state.init_train_state(
        init_params(model, jax.random.key(0)), optim))
    started = time.perf_counter()
    compiled = step.lower(abstract, batch).compile()
    report["compile_seconds"] = time.perf_counter() - started
    report["compiled_memory"] = plan.compiled_memory(compiled)
    report["flops_per_step"] = flops.flops_per_step(model, lengths)
    if args.mfu_compile_only:
        return report

    state = jax.jit(lambda key: train_state.init_train_state(init_params(model, key), optim))(jax.random.key(0))
    times = []
    for i in range(args.mfu_steps + 1):
        start = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready(out["metrics"])
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    report["step_seconds"] = seconds
    report["step_seconds_all"] = times
    report["tokens_per_s"] = report["tokens_per_step"] / seconds
    report["achieved_flops_per_s"] = report["flops_per_step"] / seconds
    report["loss"] = float(out["metrics"]["actor/pg_loss"]) if "actor/pg_loss" in out["metrics"] else None
    stats = jax.devices()[0].memory_stats() or {}
    report["device_peak_bytes_in_use"] = stats.get("peak_bytes_in_use")
    report["device_bytes_limit"] = stats.get("bytes_limit")
    peak = device_peak(report["device_kind"])
    report["device_peak_flops"] = peak
    report["mfu"] = report["achieved_flops_per_s"] / peak if peak else None
    if on_gpu:
        report["bf16_matmul_flops_per_s"] = bf16_matmul_flops_per_s()
        report["fraction_of_measured_matmul"] = report["achieved_flops_per_s"] / report["bf16_matmul_flops_per_s"]
    return report


def format_report(r: dict) -> str:
    gib, memory = 2**30, r["compiled_memory"]
    lines = [f"mfu: Qwen3-4B shapes, {r['layers']} layers, {r['attention']} attention, remat {r['remat']}, "
             f"{r['micro_batches']} micro-batches of {r['micro_batch_tokens']} tokens "
             f"({r['sequences']} sequences, {r['tokens_per_step']} tokens) on {r['device_kind']}",
             f"  compile {r['compile_seconds']:.1f} s; compiled peak {memory['peak_bytes'] / gib:.2f} GiB "
             f"(temp {memory['temp_bytes'] / gib:.2f} GiB)"]
    if "step_seconds" in r:
        lines.append(f"  step {r['step_seconds']:.3f} s, {r['tokens_per_s']:,.0f} tokens/s, "
                     f"{r['achieved_flops_per_s'] / 1e12:.1f} TFLOP/s (verl formula)")
        if r.get("mfu") is not None:
            lines.append(f"  MFU {r['mfu']:.3f} of {r['device_peak_flops'] / 1e12:.1f} TFLOP/s")
        if r.get("bf16_matmul_flops_per_s"):
            lines.append(f"  bf16 matmul 8192^3: {r['bf16_matmul_flops_per_s'] / 1e12:.1f} TFLOP/s; step = "
                         f"{r['fraction_of_measured_matmul']:.3f} of it")
        if r.get("device_peak_bytes_in_use"):
            lines.append(f"  device peak in use {r['device_peak_bytes_in_use'] / gib:.2f} GiB")
    return "\n".join(lines)


def emit(report: dict, text: str, out: str | None) -> int:
    """Prints a device benchmark's text and its JSON line, and writes the JSON to `out` if given."""
    print(text)
    print(json.dumps(report))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def main(args: argparse.Namespace) -> int:
    report = run(args)
    return emit(report, format_report(report), args.out)
