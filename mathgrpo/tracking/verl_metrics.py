"""Training metrics with verl's names and formulas, and where they go: JSONL, TensorBoard, W&B, stdout, PNG.

Computations (pure numpy; docs/recipe.md §2.8), each reproducing a verl function:
- `data_metrics`       `verl/trainer/ppo/metric_utils.py::compute_data_metrics`: critic/score|rewards|
                       advantages|returns/{mean,max,min}, response_length[_non_aborted]/{mean,max,min,
                       clip_ratio}, response/aborted_ratio, prompt_length/{mean,max,min,clip_ratio}.
- `timing_metrics`     `compute_timing_metrics`: timing_s/*, timing_per_token_ms/* (gen ÷ response
                       tokens; ref, values, adv, update_critic, update_actor ÷ prompt + response tokens).
- `throughput_metrics` `compute_throughout_metrics`: perf/{total_num_tokens,time_per_step,throughput}.
- `mfu`                `verl/utils/flops_counter.py` (qwen2/qwen3 estimate) as used for perf/mfu/actor.
- `memory_metrics`     perf/max_memory_{allocated,reserved}_gb, perf/cpu_memory_used_gb (GiB, as verl).
- `reduce_metrics`     `verl/utils/metric`: max if "max" is in the key, else min if "min", else mean.

Sinks (`sinks.make_logger`, chosen by name as verl's trainer.logger): console (a one-line progress
display), jsonl (metrics.jsonl, samples.jsonl), tensorboard (tensorboardX), wandb; `read_metrics_jsonl`;
`plots.plot_curves` (curves.png, drawn by matplotlib).

Departures from verl:
- Inputs are per-response arrays, not padded token tensors. A response's advantage is broadcast
  over its tokens, so advantage/return statistics weight each response by its length (verl's
  masked_select over response tokens). Arithmetic is float64 (verl: float32 torch).
- verl takes max_response_length / max_prompt_length from the padded tensor widths; here they are
  passed in (the config values, which are those widths when batches are padded to the maximum).
- critic/returns equal critic/advantages (GRPO has no critic); critic/true_reward (a fork-only
  key) and critic/values are not emitted.
- perf/cpu_memory_used_gb is this process's peak RSS; verl logs psutil's node-wide used memory.
- perf/max_memory_reserved_gb reads XLA's allocator pool (peak_pool_bytes), torch's counterpart.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GIB = 1024**3


def _vector(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array (one value per response), got shape {array.shape}")
    return array


def _stats(prefix: str, values: np.ndarray) -> dict[str, float]:
    return {f"{prefix}/mean": float(np.mean(values)), f"{prefix}/max": float(np.max(values)),
            f"{prefix}/min": float(np.min(values))}


def data_metrics(*, scores, advantages, response_lengths, prompt_lengths, max_response_length: int,
                 max_prompt_length: int, rewards=None) -> dict[str, float]:
    """verl's compute_data_metrics from per-response arrays [S] (S = prompts × n).

    scores: the sequence score (sum of token_level_scores); rewards: the sequence reward, equal to
    scores when no KL penalty is in the reward (the recipe); advantages: one per response.
    A response of length 0 is "aborted": score and reward statistics skip it, as in verl.
    """
    scores = _vector(scores, "scores")
    arrays = {"advantages": _vector(advantages, "advantages"),
              "response_lengths": _vector(response_lengths, "response_lengths"),
              "prompt_lengths": _vector(prompt_lengths, "prompt_lengths"),
              "rewards": scores if rewards is None else _vector(rewards, "rewards")}
    for name, array in arrays.items():
        if array.shape != scores.shape:
            raise ValueError(f"{name} has {array.size} values but scores has {scores.size}: one per response")
    advantages, response_lengths = arrays["advantages"], arrays["response_lengths"]
    prompt_lengths, rewards = arrays["prompt_lengths"], arrays["rewards"]
    live = response_lengths > 0
    if not live.any():
        raise ValueError("every response is empty (length 0); verl raises here too")
    # Token-weighted: response i contributes advantage_i once per response token.
    token_advantage_mean = float(np.sum(advantages * response_lengths) / np.sum(response_lengths))
    advantage_stats = {"mean": token_advantage_mean, "max": float(np.max(advantages[live])),
                       "min": float(np.min(advantages[live]))}
    live_lengths = response_lengths[live]
    return {
        **_stats("critic/score", scores[live]),
        **_stats("critic/rewards", rewards[live]),
        **{f"critic/advantages/{k}": v for k, v in advantage_stats.items()},
        **{f"critic/returns/{k}": v for k, v in advantage_stats.items()},  # GRPO: returns = advantages
        **_stats("response_length", response_lengths),
        "response_length/clip_ratio": float(np.mean(response_lengths == max_response_length)),
        **_stats("response_length_non_aborted", live_lengths),
        "response_length_non_aborted/clip_ratio": float(np.mean(live_lengths == max_response_length)),
        "response/aborted_ratio": float(np.mean(~live)),
        **_stats("prompt_length", prompt_lengths),
        "prompt_length/clip_ratio": float(np.mean(prompt_lengths == max_prompt_length)),
    }


# verl's compute_timing_metrics: which token count each per-token timing divides by.
_PER_RESPONSE_TOKEN = ("gen",)
_PER_TOKEN = ("ref", "values", "adv", "update_critic", "update_actor")


def timing_metrics(timings: Mapping[str, float], *, response_tokens: int, total_tokens: int) -> dict[str, float]:
    """timing_s/{name} for every timing; timing_per_token_ms/{name} for verl's stages that have one."""
    metrics = {f"timing_s/{name}": float(seconds) for name, seconds in timings.items()}
    for names, tokens in ((_PER_RESPONSE_TOKEN, response_tokens), (_PER_TOKEN, total_tokens)):
        for name in names:
            if name in timings and tokens > 0:
                metrics[f"timing_per_token_ms/{name}"] = float(timings[name]) * 1000.0 / tokens
    return metrics


def throughput_metrics(*, total_tokens: int, step_time: float, n_devices: int) -> dict[str, float]:
    """perf/throughput = prompt + response tokens of the step / (step wall time · devices)."""
    return {"perf/total_num_tokens": float(total_tokens), "perf/time_per_step": float(step_time),
            "perf/throughput": total_tokens / (step_time * n_devices)}


def memory_metrics(device=None) -> dict[str, float]:
    """Peak device memory from XLA's allocator (when the backend reports it) and peak process RSS, in GiB."""
    if device is None:
        import jax  # lazy: the computations above need no JAX

        device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    metrics = {}
    allocated = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    reserved = next((stats[k] for k in ("peak_pool_bytes", "pool_bytes", "peak_bytes_reserved") if k in stats), None)
    if allocated is not None:
        metrics["perf/max_memory_allocated_gb"] = allocated / GIB
    if reserved is not None:
        metrics["perf/max_memory_reserved_gb"] = reserved / GIB
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    metrics["perf/cpu_memory_used_gb"] = peak_rss * (1 if sys.platform == "darwin" else 1024) / GIB
    return metrics


def reduce_metrics(metrics: Sequence[Mapping[str, float]] | Mapping[str, Sequence[float]]) -> dict[str, float]:
    """Reduce per-micro-batch (or per-rank) metrics: np.max if "max" in the key, np.min if "min", else mean.

    Takes a list of dicts (a key missing from some dicts is reduced over those that have it) or
    verl's own form, a dict of lists."""
    if isinstance(metrics, Mapping):
        collected = {key: list(values) for key, values in metrics.items()}
    else:
        collected = {}
        for row in metrics:
            for key, value in row.items():
                collected.setdefault(key, []).append(value)
    reduced = {}
    for key, values in collected.items():
        reduce = np.max if "max" in key else np.min if "min" in key else np.mean
        reduced[key] = float(reduce(values)) if values else math.nan
    return reduced
