"""FLOP counts and MFU as verl estimates them (`verl/utils/flops_counter.py`, qwen2/qwen3)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def dense_parameters(model) -> int:
    """verl's N_dense = (3·D·F + D·(q + k + v + o))·L + 2·V·D, q = o = N·H, k = v = K·H.

    The embedding and LM head are both counted, tied or not (verl does the same)."""
    D, F, L, V = model.hidden_size, model.intermediate_size, model.num_hidden_layers, model.vocab_size
    N, K, H = model.num_attention_heads, model.num_key_value_heads, model.head_dim
    return (3 * D * F + D * (N * H + 2 * K * H + N * H)) * L + 2 * V * D


def flops_per_step(model, sequence_lengths: Iterable[int]) -> float:
    """verl's forward + backward estimate: 6·N_dense·Σ tokens + 12·Σ seqlen²·H·N·L (full square)."""
    lengths = np.asarray(list(sequence_lengths), dtype=np.int64)
    attention = 12 * model.head_dim * model.num_attention_heads * model.num_hidden_layers
    return float(6 * dense_parameters(model) * int(lengths.sum()) + attention * int((lengths * lengths).sum()))


def model_flops_per_step(model, sequence_lengths: Iterable[int]) -> float:
    """The matmul FLOPs a forward + backward of the model must execute, the usual MFU accounting:
    6·(layer weights + LM head)·Σ tokens + 6·Σ seqlen²·H·N·L (causal: half the score square).

    Unlike verl's estimate it counts no FLOPs for the embedding lookup (a gather) and half the
    attention square; it counts the head on every token, also where a step skips it (prompts)."""
    lengths = np.asarray(list(sequence_lengths), dtype=np.int64)
    weights = dense_parameters(model) - model.vocab_size * model.hidden_size  # without the embedding table
    attention = 6 * model.head_dim * model.num_attention_heads * model.num_hidden_layers
    return float(6 * weights * int(lengths.sum()) + attention * int((lengths * lengths).sum()))


def mfu(model, *, sequence_lengths: Iterable[int], seconds: float, n_devices: int, peak_flops: float,
        ppo_epochs: int = 1) -> float:
    """perf/mfu/actor: est_flops · ppo_epochs / seconds / peak_flops / n_devices.

    sequence_lengths: prompt + response length of every sequence of the step (all devices);
    seconds: wall time of the actor update (all epochs); peak_flops: per device (989e12, H100)."""
    return flops_per_step(model, sequence_lengths) * ppo_epochs / seconds / peak_flops / n_devices
