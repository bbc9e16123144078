"""A step's rollouts across processes: each process generates and scores its share, then all hold the whole.

JAX's multi-controller runtime runs one process per GPU (or per CPU group under `launch.py --cpu`).
Rollout is per sequence, so the step's prompts are split into contiguous blocks of whole groups
(`process_share`); each process samples its block (the engines key samples by prompt index, so the
block is what one process would have drawn for those prompts) and scores it. `gather` then all-gathers
the per-process results, so every process holds the same full batch, and `check_same` compares a
digest of it across processes: a process whose batch differs (another reward time-out, a bug) stops
the run with an error naming it, instead of training on a mixed batch or hanging on other shapes.
With one process every function here is the identity.
"""

from __future__ import annotations

import hashlib

import jax
import numpy as np

from mathgrpo.rollout.base import FINISH_REASONS, RolloutBatch


class BatchMismatch(RuntimeError):
    """Processes hold different batches for one step; the message names the step and the process."""


def process_share(count: int, process: int | None = None, processes: int | None = None) -> range:
    """This process's contiguous block of `count` items (np.array_split's blocks: the first
    count % processes blocks hold one more)."""
    process = jax.process_index() if process is None else process
    processes = jax.process_count() if processes is None else processes
    base, extra = divmod(count, processes)
    start = process * base + min(process, extra)
    return range(start, start + base + (process < extra))


def _allgather(value: np.ndarray) -> np.ndarray:
    """[P, ...]: every process's `value` (same shape and dtype on all), in process order."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value))


def gather_rows(*arrays: np.ndarray) -> list[np.ndarray]:
    """Every process's rows of each array, concatenated in process order. Each array is [rows] or
    [rows, width, ...]: row counts and widths may differ between processes; shorter rows come back
    zero-padded to the widest."""
    if jax.process_count() == 1:
        return list(arrays)
    shapes = _allgather(np.asarray([a.shape[:2] if a.ndim > 1 else (len(a), 0) for a in arrays], np.int64))
    out = []
    for i, array in enumerate(arrays):
        counts = shapes[:, i, 0]  # [P] rows of each process
        full = (int(counts.max()),) + ((int(shapes[:, i, 1].max()),) if array.ndim > 1 else ()) + array.shape[2:]
        padded = np.zeros(full, array.dtype)
        padded[tuple(slice(0, size) for size in array.shape)] = array
        every = _allgather(padded)  # [P, *full]
        out.append(np.concatenate([every[p, : counts[p]] for p in range(len(counts))]))
    return out


def gather(batch: RolloutBatch, scores: np.ndarray, timeouts: int) -> tuple[RolloutBatch, np.ndarray, int]:
    """The whole step from every process's share: (batch, scores [R], reward time-outs), the same on
    every process, shares concatenated in process order (prompt-major, since shares are contiguous)."""
    if jax.process_count() == 1:
        return batch, np.asarray(scores, np.float32), int(timeouts)
    n = len(batch) // len(np.unique(batch.prompt_index))  # every process has at least one prompt (trainer)
    reasons = np.asarray([FINISH_REASONS.index(r) for r in batch.finish_reasons], np.int32)
    token_ids, logprobs, lengths, codes, all_scores, all_timeouts = gather_rows(
        batch.token_ids, batch.logprobs, batch.lengths, reasons, np.asarray(scores, np.float32),
        np.asarray([timeouts], np.int64))
    width = int(lengths.max())
    whole = RolloutBatch(prompt_index=np.repeat(np.arange(len(lengths) // n, dtype=np.int32), n),
                         token_ids=token_ids[:, :width], logprobs=logprobs[:, :width], lengths=lengths,
                         finish_reasons=tuple(FINISH_REASONS[c] for c in codes))
    return whole, all_scores, int(all_timeouts.sum())


def digest(*arrays: np.ndarray) -> np.ndarray:
    """Eight bytes of the SHA-256 of the arrays' shapes, dtypes and bytes, as two uint32."""
    hasher = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        hasher.update(f"{array.shape}{array.dtype}".encode())
        hasher.update(array.tobytes())
    return np.frombuffer(hasher.digest()[:8], np.uint32).copy()


def check_same(step: int, *arrays: np.ndarray) -> None:
    """Stops, naming the step and the first process that differs from process 0, unless every process
    holds the same arrays. Collective: every process calls it once per step."""
    if jax.process_count() == 1:
        return
    digests = _allgather(digest(*arrays))  # [P, 2]
    for process in range(1, len(digests)):
        if not np.array_equal(digests[process], digests[0]):
            raise BatchMismatch(f"step {step}: process {process}'s batch differs from process 0's (digest "
                                f"{digests[process].tolist()} vs {digests[0].tolist()}); every process must "
                                "train on one batch")
