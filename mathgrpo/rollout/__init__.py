"""Rollout engines behind one protocol: `SamplingParams` in, `RolloutBatch` out (see base.py).

`JaxSampler` runs everywhere; the vLLM engine (GPU) lives in vllm_engine.py and is imported lazily.
"""

from mathgrpo.rollout.base import FINISH_REASONS, Rollout, RolloutBatch, SamplingParams, check_prompts
from mathgrpo.rollout.jax_sampler import JaxSampler, SamplingState

__all__ = ["FINISH_REASONS", "JaxSampler", "Rollout", "RolloutBatch", "SamplingParams", "SamplingState",
           "check_prompts"]
