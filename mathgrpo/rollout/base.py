"""What every rollout engine takes and returns: `SamplingParams`, `RolloutBatch`, the `Rollout` protocol.

Two engines implement the protocol (the JAX sampler everywhere, vLLM on GPU), and the trainer must not
be able to tell them apart. The contract:

- **Order is prompt-major.** Response `r` answers prompt `r // n`: the n responses of a prompt are
  contiguous, which is what GRPO's group statistics rely on.
- **Token ids include the stop token** when a response stopped on one (`finish_reason == "stop"`),
  and nothing after it. A response that ran to `max_tokens` without stopping has reason `"length"`;
  a stop token drawn as the very last allowed token counts as `"stop"` (vLLM checks stop first).
- **Log-probs are of the sampled tokens under softmax(logits / T) over the whole vocabulary**: top-k
  and top-p choose the support to sample from, but the returned log-prob is NOT renormalized over that
  support. So it equals the trainer's `log_softmax(logits / T)` at the same temperature, and the
  TIS ratio `exp(old - rollout)` measures only the engines' numerical gap, never a `log(mass)` bias
  (vLLM's "processed" log-probs carry that bias; see docs/vllm.md).
  Greedy decoding (T = 0) has no softmax(logits / 0); it returns the log-prob at T = 1,
  `log_softmax(logits)`, the model's own probability of the argmax token.
- **Samples are keyed, not batched**: with the same weights, sample k of prompt i depends on
  (seed, i, k) alone (the JAX sampler exactly; vLLM through per-request seeds), so a process that
  generates its share of a step's prompts (`first_prompt`) draws what one process would.
- **Padding**: `token_ids` and `logprobs` are [R, M] arrays, M the longest response of the batch;
  entries at or after `lengths[r]` are 0 and must be masked (`mask`). verl pads rollout log-probs
  with -1; a mask is harder to misuse.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

FINISH_REASONS = ("stop", "length")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample; vLLM's field names and meanings, so the vLLM engine passes them straight through.

    Attributes:
      n: responses per prompt (GRPO's group size G).
      temperature: logits are divided by it; 0 means greedy (argmax).
      top_p: nucleus sampling: sample from the smallest set of most likely tokens whose probability
        reaches top_p (the most likely token is always in it); 1 turns it off. Applied after top-k,
        on the top-k-renormalized distribution (vLLM's and HF's order).
      top_k: sample from the k most likely tokens; 0 or -1 turns it off (vLLM's convention).
      max_tokens: most new tokens per response, the stop token included. No default: vLLM's
        default of 16 has silently truncated more than one RL run.
      stop_token_ids: a response ends after generating any of these (kept in the output). Empty means
        only `max_tokens` ends a response; the trainer passes the tokenizer's EOS explicitly.
      seed: the same seed, prompts and weights give the same samples. Vary it per step.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    seed: int = 0

    def __post_init__(self):
        # Lists (YAML, callers) become tuples so the params stay hashable (they key jit caches).
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for name in ("n", "top_k", "max_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"SamplingParams.{name} must be an integer, got {value!r}")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n={self.n}: need at least 1 response per prompt")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens={self.max_tokens}: need at least 1 new token")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"SamplingParams.temperature={self.temperature!r}: expected a finite number >= 0 (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p={self.top_p!r}: expected a number in (0, 1] (1 = off)")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k={self.top_k}: expected k >= 1, or 0 / -1 for off")
        for token in self.stop_token_ids:
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
                raise ValueError(f"SamplingParams.stop_token_ids={self.stop_token_ids}: "
                                 f"expected non-negative token ids, got {token!r}")
        # Plain Python values: numpy scalars would hash alike but print and serialize differently.
        for name in ("n", "top_k", "max_tokens", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k >= 1

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


@dataclasses.dataclass(frozen=True, eq=False)  # eq would compare arrays elementwise
class RolloutBatch:
    """The responses to a list of prompts, prompt-major (R = len(prompts) * n rows). Host numpy arrays.

    Attributes:
      prompt_index: [R] int32, the prompt each response answers (r // n).
      token_ids: [R, M] int32 response tokens (the stop token included), 0 after `lengths`.
      logprobs: [R, M] float32 log-probs of `token_ids` under softmax(logits / T) over the full
        vocabulary (greedy: T = 1), 0 after `lengths`. See the module docstring.
      lengths: [R] int32, tokens in each response (>= 1).
      finish_reasons: R strings, "stop" or "length".
    """

    prompt_index: np.ndarray
    token_ids: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    finish_reasons: tuple[str, ...]

    def __post_init__(self):
        R = len(self.prompt_index)
        if self.token_ids.ndim != 2 or self.token_ids.shape != self.logprobs.shape or self.token_ids.shape[0] != R:
            raise ValueError(f"RolloutBatch: token_ids {self.token_ids.shape} and logprobs "
                             f"{self.logprobs.shape} must both be [R={R}, M]")
        if self.lengths.shape != (R,) or len(self.finish_reasons) != R:
            raise ValueError(f"RolloutBatch: lengths {self.lengths.shape} and {len(self.finish_reasons)} "
                             f"finish reasons for R={R} responses")
        bad = sorted(set(self.finish_reasons) - set(FINISH_REASONS))
        if bad:
            raise ValueError(f"RolloutBatch: finish reasons {bad}; expected {FINISH_REASONS}")
        if R and (self.lengths.min() < 1 or self.lengths.max() > self.token_ids.shape[1]):
            raise ValueError(f"RolloutBatch: lengths must be in [1, {self.token_ids.shape[1]}]")

    def __len__(self) -> int:
        return len(self.prompt_index)

    @property
    def mask(self) -> np.ndarray:
        """[R, M] bool, True on response tokens."""
        return np.arange(self.token_ids.shape[1])[None, :] < self.lengths[:, None]

    def response(self, r: int) -> list[int]:
        """Response r's token ids, unpadded."""
        return self.token_ids[r, : self.lengths[r]].tolist()

    def response_logprobs(self, r: int) -> np.ndarray:
        return self.logprobs[r, : self.lengths[r]]


@runtime_checkable
class Rollout(Protocol):
    """A rollout engine: the JAX sampler or vLLM. Both return the same `RolloutBatch` semantics."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 first_prompt: int = 0, max_tokens: Sequence[int] | None = None) -> RolloutBatch:
        """n responses to each prompt (token ids, no padding), prompt-major. `first_prompt`: the index
        of prompts[0] in the whole batch this call is a share of; sample k of prompt i is drawn from a
        stream keyed by (params.seed, first_prompt + i, k), so it does not depend on the share.
        `max_tokens`: each prompt's own limit, at most params.max_tokens (None: that for all)."""
        ...

    def sleep(self) -> None:
        """Releases what the engine can while the trainer runs; the next update_weights wakes it."""
        ...

    def update_weights(self, params: Any) -> None:
        """Replaces the engine's weights with the trainer's (a params pytree in our layout)."""
        ...


def check_prompts(prompts: Sequence[Sequence[int]], *, vocab_size: int, max_prompt_length: int,
                  max_tokens: int) -> list[list[int]]:
    """Validates prompts up front, naming the bad prompt, so no engine fails deep inside a kernel.

    `max_prompt_length` is what is left of the engine's context after `max_tokens` new tokens.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError("generate() needs a non-empty list of prompts, each a list of token ids")
    checked = []
    for i, prompt in enumerate(prompts):
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"prompt {i} is empty or not a flat list of token ids (shape {ids.shape})")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {i} holds {ids.dtype} values; expected integer token ids")
        if ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}) (vocab size)")
        if len(ids) > max_prompt_length:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_tokens={max_tokens} at most "
                f"{max_prompt_length} fit the engine's max_length={max_prompt_length + max_tokens}")
        checked.append(ids.astype(np.int64).tolist())
    return checked


def check_max_tokens(max_tokens: Sequence[int] | None, num_prompts: int, limit: int) -> np.ndarray:
    """Per-prompt token limits as [num_prompts] int32: `limit` (SamplingParams.max_tokens) for all when
    None, else one integer in [1, limit] per prompt (the call's buffers are sized by `limit`)."""
    if max_tokens is None:
        return np.full((num_prompts,), limit, np.int32)
    values = np.asarray(max_tokens)
    if values.shape != (num_prompts,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"max_tokens: expected {num_prompts} integers (one per prompt), got shape {values.shape} "
                         f"of {values.dtype}")
    if values.min() < 1 or values.max() > limit:
        raise ValueError(f"max_tokens: per-prompt limits must be in [1, {limit}] (SamplingParams.max_tokens), "
                         f"got min {values.min()} max {values.max()}")
    return values.astype(np.int32)
