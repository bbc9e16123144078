"""Packing a mini-batch of variable-length sequences into fixed-shape micro-batches (host, numpy).

The train step consumes arrays [M, R, L]: M micro-batches (run one after another, gradients
accumulated), R rows (one per data-parallel device: the R axis is the sharded one), L tokens per row
(the per-device token budget, verl's `ppo_max_token_len_per_gpu`). Several sequences share a row,
told apart by segment ids, with positions restarting at 0 — verl's `use_remove_padding` +
`use_dynamic_bsz` in a static shape.

Assignment, as verl: sequences are first balanced across rows (equal counts per row, greedy on
token totals, like `balance_batch`), then each row's sequences go into micro-batches by first-fit
decreasing under the budget. M is rounded up to a power of two so the jitted step recompiles only
when the number of micro-batches crosses a power of two; the step loops over the real count only.

On-policy distillation with top-k adds [M, R, L, K] fields (`topk_ids`, `topk_advantages`,
`topk_old_logprobs`) that the scoring pass fills on device in this layout; `pack` leaves them None.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mathgrpo.parallel.mesh import BATCH_AXES
from mathgrpo.parallel.shardings import replicated


@flax.struct.dataclass
class PackedBatch:
    tokens: jax.Array  # [M, R, L] int32
    positions: jax.Array  # [M, R, L] int32
    segment_ids: jax.Array  # [M, R, L] int32, 0 = padding
    loss_mask: jax.Array  # [M, R, L] f32, 1 on response tokens (the predicted ones)
    advantages: jax.Array  # [M, R, L] f32, the sequence's advantage on each response token
    rollout_logprobs: jax.Array  # [M, R, L] f32, the sampler's log-prob of each response token
    old_logprobs: jax.Array  # [M, R, L] f32, π_old (only read by an unfused step)
    ref_logprobs: jax.Array  # [M, R, L] f32, π_ref (only read with the KL loss)
    sequence_index: jax.Array  # [M, R, L] int32, sequence id in the mini-batch; S on padding
    sequence_slots: jax.Array  # [S] int32 (its shape gives segment sums a static size)
    legacy_weight: jax.Array  # [M, R] f32, verl legacy per-micro-batch weight n_seq(m, r) / S_r / R
    num_micro_batches: jax.Array  # [] int32, real micro-batches (≤ M)
    token_count: jax.Array  # [] f32, response tokens in the mini-batch
    sequence_count: jax.Array  # [] f32, sequences with at least one response token
    # On-policy distillation with top-k (K = distill.top_k, or 2K for the union strategies): the candidate ids
    # of each response position and their token-level advantages, written on device by the scoring pass
    # (train/distill.py) in this same packed layout. None for GRPO and sampled-token OPD (top_k = 0), so
    # their pytrees, and compiled steps, have no such leaves.
    topk_ids: jax.Array | None = None  # [M, R, L, K] int32, 0 off the response tokens
    topk_advantages: jax.Array | None = None  # [M, R, L, K] f32, A_{t,k}; 0 on ids that do not count
    topk_old_logprobs: jax.Array | None = None  # [M, R, L, K] f32, the student's log-probs at the ids when
    # scored (π_old of an unfused step; the fused step recomputes them)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one sequence went: micro-batch m, row r, first token at `start`."""

    micro_batch: int
    row: int
    start: int
    prompt_length: int
    response_length: int


def _balance_rows(lengths: np.ndarray, num_rows: int) -> list[list[int]]:
    """Equal-count partition of sequence ids over rows, greedy on the smallest token total."""
    capacity = math.ceil(len(lengths) / num_rows)
    rows: list[list[int]] = [[] for _ in range(num_rows)]
    totals = np.zeros(num_rows, np.int64)
    for index in np.argsort(-lengths, kind="stable"):
        open_rows = [r for r in range(num_rows) if len(rows[r]) < capacity]
        row = min(open_rows, key=lambda r: (totals[r], r))
        rows[row].append(int(index))
        totals[row] += lengths[index]
    return rows


def _first_fit_decreasing(ids: list[int], lengths: np.ndarray, budget: int,
                           max_items: int | None = None) -> list[list[int]]:
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(ids, key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if lengths[index] <= room and (max_items is None or len(bins[b]) < max_items):
                bins[b].append(index)
                free[b] -= int(lengths[index])
                break
        else:
            bins.append([index])
            free.append(budget - int(lengths[index]))
    return bins


def pack(prompts: Sequence[np.ndarray], responses: Sequence[np.ndarray], advantages, *, num_rows: int,
         row_length: int, rollout_logprobs: Sequence[np.ndarray] | None = None,
         old_logprobs: Sequence[np.ndarray] | None = None, ref_logprobs: Sequence[np.ndarray] | None = None,
         response_masks: Sequence[np.ndarray] | None = None, micro_batch_bucket: bool = True,
         max_sequences_per_row: int | None = None) -> tuple[PackedBatch, list[Placement]]:
    """Packs S sequences (prompt + response token ids; per-response-token arrays) into a PackedBatch.

    Args:
      advantages: [S] one advantage per sequence.
      num_rows: R, rows per micro-batch (the data-parallel size).
      row_length: L, the token budget of one row.
      *_logprobs: per sequence, one value per response token (missing arrays are zeros).
      response_masks: per sequence, which response tokens count (default: all).
      max_sequences_per_row: at most this many sequences share a row (cuDNN's varlen attention
        describes a fixed number of segments per row; see `sequence_cap`). None: no limit.
    Returns: the batch (numpy arrays) and where each sequence was placed.
    """
    count = len(prompts)
    if count == 0 or len(responses) != count or len(advantages) != count:
        raise ValueError(f"pack needs as many prompts ({len(prompts)}), responses ({len(responses)}) "
                         f"and advantages ({len(advantages)}), at least one")
    lengths = np.array([len(p) + len(r) for p, r in zip(prompts, responses)], np.int64)
    too_long = np.flatnonzero(lengths > row_length)
    if too_long.size:
        raise ValueError(f"sequence {int(too_long[0])} has {int(lengths[too_long[0]])} tokens, over the "
                         f"micro-batch budget of {row_length} (grpo.micro_batch_tokens must be at least "
                         "max prompt + response length)")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every sequence needs at least one prompt token (responses are scored from it)")
    rows = _balance_rows(lengths, num_rows)
    if max_sequences_per_row is not None and max_sequences_per_row < 1:
        raise ValueError(f"max_sequences_per_row must be >= 1 or None, got {max_sequences_per_row}")
    micro = [_first_fit_decreasing(ids, lengths, row_length, max_sequences_per_row) for ids in rows]
    used = max(len(bins) for bins in micro)
    allocated = 1 << (used - 1).bit_length() if micro_batch_bucket else used
    shape = (allocated, num_rows, row_length)
    out = {name: np.zeros(shape, np.int32) for name in ("tokens", "positions", "segment_ids")}
    for name in ("loss_mask", "advantages", "rollout_logprobs", "old_logprobs", "ref_logprobs"):
        out[name] = np.zeros(shape, np.float32)
    out["sequence_index"] = np.full(shape, count, np.int32)
    legacy = np.zeros((allocated, num_rows), np.float32)
    placements: list[Placement | None] = [None] * count
    for r, bins in enumerate(micro):
        row_total = len(rows[r])
        for m, ids in enumerate(bins):
            start = 0
            legacy[m, r] = len(ids) / max(row_total, 1) / num_rows
            for segment, i in enumerate(ids, start=1):
                p, resp = np.asarray(prompts[i]), np.asarray(responses[i])
                n_p, n_r = len(p), len(resp)
                span = slice(start, start + n_p + n_r)
                response_span = slice(start + n_p, start + n_p + n_r)
                out["tokens"][m, r, span] = np.concatenate([p, resp])
                out["positions"][m, r, span] = np.arange(n_p + n_r)
                out["segment_ids"][m, r, span] = segment
                out["sequence_index"][m, r, span] = i
                mask = np.ones(n_r, np.float32) if response_masks is None else np.asarray(response_masks[i], np.float32)
                out["loss_mask"][m, r, response_span] = mask
                out["advantages"][m, r, response_span] = float(advantages[i]) * mask
                for name, values in (("rollout_logprobs", rollout_logprobs), ("old_logprobs", old_logprobs),
                                     ("ref_logprobs", ref_logprobs)):
                    if values is not None:
                        out[name][m, r, response_span] = np.asarray(values[i], np.float32)
                placements[i] = Placement(m, r, start, n_p, n_r)
                start += n_p + n_r
    batch = PackedBatch(
        **out,
        sequence_slots=np.arange(count, dtype=np.int32),
        legacy_weight=legacy,
        num_micro_batches=np.int32(used),
        token_count=np.float32(out["loss_mask"].sum()),
        sequence_count=np.float32(sum(1 for i in range(count) if (
            len(responses[i]) and (response_masks is None or np.asarray(response_masks[i]).sum() > 0)))),
    )
    return batch, placements  # type: ignore[return-value]


def sequence_cap(model) -> int | None:
    """Sequences allowed per packed row for this model config: `model.attention_max_segments` under
    cuDNN attention (its varlen kernel describes that many), else no limit."""
    return model.attention_max_segments if model.attention == "cudnn" else None


def unpack_responses(values: np.ndarray, placements: list[Placement]) -> list[np.ndarray]:
    """Per-sequence response slices of a [M, R, L] per-token array (e.g. the step's log-probs)."""
    values = np.asarray(values)
    out = []
    for p in placements:
        begin = p.start + p.prompt_length
        out.append(values[p.micro_batch, p.row, begin: begin + p.response_length])
    return out


def batch_shardings(mesh: Mesh, *, topk: bool = False) -> Any:
    """Shardings of a PackedBatch: rows over (data, fsdp); everything else replicated.

    The top-k fields are None unless `topk` (a host batch from `pack` has none, and `put_global` needs the
    same structure). As a jit in/out sharding the `topk=True` tree fits a batch with or without them: a
    sharding at a None field covers no array."""
    rows = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))
    candidates = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None, None)) if topk else None
    return PackedBatch(
        tokens=rows, positions=rows, segment_ids=rows, loss_mask=rows, advantages=rows,
        rollout_logprobs=rows, old_logprobs=rows, ref_logprobs=rows, sequence_index=rows,
        sequence_slots=replicated(mesh), legacy_weight=NamedSharding(mesh, PartitionSpec(None, BATCH_AXES)),
        num_micro_batches=replicated(mesh), token_count=replicated(mesh), sequence_count=replicated(mesh),
        topk_ids=candidates, topk_advantages=candidates, topk_old_logprobs=candidates,
    )
