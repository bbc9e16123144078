"""Validation and the `eval` command: sample n responses per prompt, grade them, report verl's metrics.

`validate` is what verl's `RayPPOTrainer._validate` does (docs/recipe.md §2.9), on any `Rollout` engine:

    for each prompt: n samples (prompt-major; `SamplingParams.n`, the recipe's val_kwargs.n = 16)
    response text  = tokenizer.decode(response ids, skip_special_tokens=True)   # NaiveRewardManager
    result dict    = reward.score_batch(...)   # the grader picked per data source (select_grader)
    variables      = reward (= score, the sum of verl's reward tensor) + the dict's keys
                     (ttrl_math: score, format_score, acc, extracted_gt, pred; math_dapo: score, acc, pred)
    metrics        = evaluate_metrics.compute_validation_metrics, per data source, uid = prompt position:
                     val-core/{source}/acc/{mean@n, best@n/mean|std, maj@n/mean|std}, the rest val-aux/...

Addition (verl has none): the unbiased pass@k of Chen et al. (2021) for every power of two k <= n
(1, 2, 4, ...), from each prompt's count of correct samples (`acc`) and averaged over prompts, logged as
`val-aux/{source}/acc/pass@k`. Unlike verl's bootstrap `best@k` it is exactly "some of k draws without
replacement is correct", and pass@1 equals mean@n.

The `eval` command (`add_arguments` + `main`) loads a HF directory or an Orbax params checkpoint,
reads verl-schema parquet files (chat template with enable_thinking=False, as the recipe), runs
`validate` with the JAX sampler or vLLM, and writes generations.jsonl, metrics.json and run.json.
It stops on the tokenizer's EOS plus `<|im_end|>` and `<|endoftext|>`, as the recipe's offline eval.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence

import numpy as np

from mathgrpo.eval.metrics import compute_validation_metrics, pass_at_k
from mathgrpo.reward import graders
from mathgrpo.reward import pool as reward_pool_lib
from mathgrpo.rollout.base import FINISH_REASONS, Rollout, SamplingParams

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # the recipe's offline eval stops on both (docs/recipe.md §2.9)
LOG_SEED = 42  # verl's `_maybe_log_val_generations` shuffles with RandomState(42)


def pass_at_k_sizes(n: int) -> list[int]:
    """The k's of the pass@k metrics: powers of two up to n (1, 2, 4, ...)."""
    return [1 << e for e in range(n.bit_length()) if 1 << e <= n]


def bootstrap_sizes(n: int) -> list[int]:
    """The k's of verl's best@k / maj@k: 2, 4, 8, ... below n, then n itself (none for n = 1)."""
    return [] if n < 2 else [1 << e for e in range(1, n.bit_length()) if 1 << e < n] + [n]


def default_stop_token_ids(tokenizer, generation_config: dict | None = None) -> tuple[int, ...]:
    """The generation config's EOS ids (when given), the tokenizer's EOS, then `<|im_end|>` and
    `<|endoftext|>` where the vocabulary has them."""
    eos = (generation_config or {}).get("eos_token_id")
    ids = [int(i) for i in eos] if isinstance(eos, (list, tuple)) else ([] if eos is None else [int(eos)])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocabulary = tokenizer.get_vocab()
    ids += [int(vocabulary[token]) for token in STOP_TOKENS if token in vocabulary]
    return tuple(dict.fromkeys(ids))  # unique, in order


# ---------------------------------------------------------------------------------------------------
# Validation.


def _generate(engine: Rollout, prompts: list[list[int]], params: SamplingParams, prompts_per_call: int | None
              ) -> tuple[list[list[int]], list[str]]:
    """Every response's ids and finish reason, prompt-major, checking the engine kept that order.

    With several processes each generates its contiguous share of the prompts (`shares.process_share`)
    and the shares are all-gathered, so every process returns the whole set. Samples are keyed by
    prompt index (`first_prompt`), so neither the split nor `prompts_per_call` changes them."""
    import jax

    from mathgrpo.rollout import shares

    share = shares.process_share(len(prompts))
    step = prompts_per_call or max(1, len(share))
    responses, reasons = [], []
    for start in range(share.start, share.stop, step):
        chunk = prompts[start:min(start + step, share.stop)]
        batch = engine.generate(chunk, params, first_prompt=start)
        expected = np.repeat(np.arange(len(chunk)), params.n)
        if len(batch) != len(expected) or not np.array_equal(batch.prompt_index, expected):
            raise ValueError(f"{type(engine).__name__}.generate returned {len(batch)} responses not in "
                             f"prompt-major order; expected {params.n} for each of {len(chunk)} prompts")
        responses += [batch.response(r) for r in range(len(batch))]
        reasons += list(batch.finish_reasons)
    if jax.process_count() == 1:
        return responses, reasons
    width = max([len(r) for r in responses], default=1)
    ids = np.zeros((len(responses), width), np.int32)
    for r, response in enumerate(responses):
        ids[r, :len(response)] = response
    ids, lengths, codes = shares.gather_rows(ids, np.asarray([len(r) for r in responses], np.int32),
                                             np.asarray([FINISH_REASONS.index(x) for x in reasons], np.int32))
    return [ids[r, :lengths[r]].tolist() for r in range(len(ids))], [FINISH_REASONS[c] for c in codes]


def _source_metrics(data_source: str, generations: list[dict], details: list[dict], n: int) -> dict[str, float]:
    """verl's metrics for one data source's samples, then the pass@k's."""
    infos = {"reward": [g["score"] for g in generations]}  # verl: reward = sum of the reward tensor = score
    for key in details[0]:  # one grader per data source, so every dict has the same keys
        infos[key] = [detail[key] for detail in details]
    uids = [str(g["prompt_index"]) for g in generations]
    metrics = compute_validation_metrics([data_source] * len(generations), uids, infos)
    correct: dict[int, int] = {}
    for g in generations:
        correct[g["prompt_index"]] = correct.get(g["prompt_index"], 0) + int(g["acc"])
    for k in pass_at_k_sizes(n):
        metrics[f"val-aux/{data_source}/acc/pass@{k}"] = float(np.mean([pass_at_k(n, c, k) for c in correct.values()]))
    return metrics


def validate(engine: Rollout, records: Sequence, tokenizer, params: SamplingParams, *, grader: str = "ttrl_math",
             reward_pool: reward_pool_lib.RewardPool | None = None, jsonl_path: str | os.PathLike | None = None,
             log_generations: int = 0, prompts_per_call: int | None = None
             ) -> tuple[dict[str, float], list[dict]]:
    """Samples `params.n` responses for each record, grades them and computes the validation metrics.

    Args:
      engine: any `Rollout` (only `generate` is called; the trainer passes its live engine).
      records: `data.PromptRecord`s (prompt_ids, ground_truth, data_source, index).
      tokenizer: decodes prompts and responses (skip_special_tokens=True, as verl).
      params: sampling; `n` samples per prompt, `seed` keys them (with each prompt's index).
      grader: `reward.select_grader`'s choice ("ttrl_math" for the recipe, "auto" routes by source).
      reward_pool: a persistent `RewardPool` for the sympy / math-verify checks (None: a temporary one).
      jsonl_path: where to write one JSON line per generation (None: not written).
      log_generations: print this many generations, chosen as verl's `log_val_generations` chooses.
      prompts_per_call: prompts per `engine.generate` call (None: this process's share at once); bounds
        the JAX sampler's KV cache. vLLM schedules internally and needs no chunking.

    Returns:
      (metrics, generations). metrics: verl's `val-core/...` and `val-aux/...` names per data source,
      plus `val-aux/{source}/acc/pass@k` (unbiased pass@k, k = 1, 2, 4, ... <= n; not in verl).
      generations: per response, prompt-major: data_source, prompt_index (position in `records`),
      row (in its file), sample_index, prompt, response, ground_truth, pred, score, acc,
      finish_reason, response_length (tokens, stop token included), grade_status.
    """
    if not records:
        raise ValueError("validate() needs at least one prompt record")
    prompts = [list(record.prompt_ids) for record in records]
    response_ids, finish_reasons = _generate(engine, prompts, params, prompts_per_call)
    n = params.n
    responses = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    prompt_texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)  # verl's logged inputs
    owners = [records[r // n] for r in range(len(responses))]
    scores, info = reward_pool_lib.score_batch(responses, [record.ground_truth for record in owners],
                                      [record.data_source for record in owners], grader=grader, pool=reward_pool)
    generations = []
    rows = zip(owners, responses, response_ids, finish_reasons, scores)
    for r, (record, text, ids, reason, score) in enumerate(rows):
        detail = info["details"][r]
        generations.append({
            "data_source": record.data_source, "prompt_index": r // n, "row": record.index, "sample_index": r % n,
            "prompt": prompt_texts[r // n], "response": text, "ground_truth": record.ground_truth,
            "pred": detail["pred"], "score": score, "acc": bool(detail["acc"]), "finish_reason": reason,
            "response_length": len(ids), "grade_status": info["status"][r],
        })
    metrics: dict[str, float] = {}
    for data_source in dict.fromkeys(record.data_source for record in records):
        members = [r for r, g in enumerate(generations) if g["data_source"] == data_source]
        metrics.update(_source_metrics(data_source, [generations[r] for r in members],
                                       [info["details"][r] for r in members], n))
    import jax

    if jax.process_index() != 0:  # every process holds the same generations; one writes them
        return metrics, generations
    if jsonl_path is not None:
        write_jsonl(jsonl_path, generations)
    if log_generations > 0:
        print(format_generations(select_logged_generations(generations, log_generations)))
    return metrics, generations


def write_jsonl(path: str | os.PathLike, generations: Sequence[dict]) -> None:
    """One JSON object a line; creates the parent directory (e.g. the trainer's validation/)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for generation in generations:
            f.write(json.dumps(generation, ensure_ascii=False) + "\n")


def select_logged_generations(generations: Sequence[dict], count: int) -> list[dict]:
    """verl's choice of generations to log: sort by prompt text, shuffle with RandomState(42), take `count`."""
    ordered = sorted(generations, key=lambda g: g["prompt"])  # stable, as Python's sort in verl
    np.random.RandomState(LOG_SEED).shuffle(ordered)
    return ordered[:count]


def format_generations(generations: Sequence[dict]) -> str:
    blocks = []
    for number, g in enumerate(generations, 1):
        blocks.append(f"[generation {number}/{len(generations)}] {g['data_source']} prompt {g['prompt_index']} "
                      f"sample {g['sample_index']}: score {g['score']} (pred {g['pred']!r}, ground truth "
                      f"{g['ground_truth']!r}, {g['finish_reason']}, {g['response_length']} tokens)\n"
                      f"--- prompt\n{g['prompt']}\n--- response\n{g['response']}")
    return "\n".join(blocks)


def format_table(metrics: dict[str, float], generations: Sequence[dict]) -> str:
    """A readable summary per data source: mean@n, then best@k, maj@k, pass@k by k."""
    lines = []
    for data_source in dict.fromkeys(g["data_source"] for g in generations):
        own = [g for g in generations if g["data_source"] == data_source]
        n = 1 + max(g["sample_index"] for g in own)
        prompts = len(own) // n
        truncated = np.mean([g["finish_reason"] == "length" for g in own])
        mean_length = np.mean([g["response_length"] for g in own])
        lines.append(f"{data_source}: {prompts} prompts x {n} samples, mean@{n} = "
                     f"{metrics[f'val-core/{data_source}/acc/mean@{n}']:.4f}; response length mean "
                     f"{mean_length:.0f} tokens, {100 * truncated:.1f}% truncated")

        def value(name: str) -> str:
            for prefix in ("val-core", "val-aux"):
                key = f"{prefix}/{data_source}/acc/{name}"
                if key in metrics:
                    return f"{metrics[key]:8.4f}"
            return f"{'-':>8}"

        lines.append(f"  {'k':>5} {'best@k':>8} {'maj@k':>8} {'pass@k':>8}")
        for k in sorted(set(bootstrap_sizes(n)) | set(pass_at_k_sizes(n))):
            lines.append(f"  {k:>5} {value(f'best@{k}/mean')} {value(f'maj@{k}/mean')} {value(f'pass@{k}')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The eval command.


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from mathgrpo.config import ATTENTION_IMPLEMENTATIONS, ENGINES

    parser.add_argument("--model", required=True,
                        help="a HF model directory (config.json + safetensors) or an Orbax params checkpoint")
    parser.add_argument("--data", required=True, nargs="+", help="verl-schema parquet files (e.g. aime24.parquet)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory (default: the model dir, or the checkpoint's recorded one)")
    parser.add_argument("--n", type=int, default=16, help="samples per prompt (recipe: val_kwargs.n = 16)")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="recipe validation: 1.0; the recipe's offline eval used 0.7")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--max-tokens", type=int, default=31744, help="new tokens per response (recipe: 31744)")
    parser.add_argument("--max-prompt-length", type=int, default=1024,
                        help="longer prompts are dropped (data.max_prompt_length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-slots", type=int, default=None,
                        help="JAX engine: continuous batching over a pool of this many rows (default: one static "
                             "batch of every row)")
    parser.add_argument("--engine", default="jax", choices=list(ENGINES),
                        help="jax: the JAX sampler; vllm: vLLM (its CPU build on a CPU)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="vLLM: no CUDA graphs or torch.compile (a faster start, slower decoding)")
    parser.add_argument("--grader", default="ttrl_math", choices=list(graders.GRADERS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="params dtype")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                        help="matmul dtype of either engine (model.compute_dtype)")
    parser.add_argument("--attention", default="reference", choices=list(ATTENTION_IMPLEMENTATIONS),
                        help="attention implementation of the JAX model")
    parser.add_argument("--prompts-per-call", type=int, default=None,
                        help="prompts per generate call (default: all); bounds the JAX sampler's memory")
    parser.add_argument("--log-generations", type=int, default=0, help="print this many generations")
    parser.add_argument("--out", default=None, help="directory for generations.jsonl, metrics.json, run.json")
    return parser


def main(args: argparse.Namespace) -> int:
    from mathgrpo.config import DataConfig, RolloutConfig
    from mathgrpo.data.prompts import load_tokenizer, read_prompts
    from mathgrpo.rollout import factory

    rollout = RolloutConfig(engine=args.engine, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            enforce_eager=args.enforce_eager, max_slots=args.max_slots)
    try:
        factory.prepare(args.engine, rollout)  # before JAX starts and before the model loads
    except factory.EngineUnavailable as error:
        raise SystemExit(f"eval: {error}") from None
    from mathgrpo.parallel import mesh

    mesh.initialize_distributed()  # under launch.py: each process evaluates its share of the prompts
    from mathgrpo.weights.policy import load_policy

    try:
        config, params, tokenizer_dir, _ = load_policy(args.model, dtype=args.dtype, tokenizer_dir=args.tokenizer,
                                                       attention=args.attention, compute_dtype=args.compute_dtype)
    except FileNotFoundError as error:
        raise SystemExit(f"eval: --model {error}") from None
    tokenizer = load_tokenizer(tokenizer_dir)
    records, summary = read_prompts(args.data, tokenizer, DataConfig(max_prompt_length=args.max_prompt_length,
                                                                     enable_thinking=False))
    print(summary)
    if not records:
        raise SystemExit(f"no prompts left to evaluate in {args.data}")
    sampling = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              max_tokens=args.max_tokens, stop_token_ids=default_stop_token_ids(tokenizer),
                              seed=args.seed)
    max_length = max(len(record.prompt_ids) for record in records) + args.max_tokens
    try:
        engine = factory.make_engine(args.engine, config, params, max_length=max_length, rollout=rollout,
                                     seed=args.seed, sampling=sampling)
    except ValueError as error:  # a model or settings the engine cannot serve
        raise SystemExit(f"eval: {error}") from None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    with reward_pool_lib.RewardPool() as pool:
        metrics, generations = validate(
            engine, records, tokenizer, sampling, grader=args.grader, reward_pool=pool,
            jsonl_path=os.path.join(args.out, "generations.jsonl") if args.out else None,
            log_generations=args.log_generations, prompts_per_call=args.prompts_per_call)
    seconds = time.perf_counter() - start
    import jax

    if jax.process_index() != 0:  # every process holds the whole result; process 0 reports it
        return 0
    tokens = sum(g["response_length"] for g in generations)
    print(f"{len(generations)} responses, {tokens} tokens in {seconds:.1f} s ({tokens / seconds:.0f} tokens/s)")
    if args.out:
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        run = {"args": vars(args), "sampling": dataclasses.asdict(sampling), "data": str(summary),
               "seconds": seconds, "response_tokens": tokens}
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump(run, f, indent=2, default=str)
        print(f"wrote {args.out}/generations.jsonl, metrics.json, run.json")
    print(format_table(metrics, generations))
    print(json.dumps(metrics), flush=True)
    return 0
