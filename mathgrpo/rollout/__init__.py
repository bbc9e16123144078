"""Rollout engines behind one protocol: `SamplingParams` in, `RolloutBatch` out (see base.py).

`JaxSampler` runs everywhere; the vLLM engine (its GPU wheel, or its CPU build) lives in vllm_engine.py, and
factory.py builds either. Both are imported on first use, so importing the protocol does not start JAX.
"""

from mathgrpo.rollout.base import FINISH_REASONS, Rollout, RolloutBatch, SamplingParams, check_prompts


def __getattr__(name: str):
    if name in ("JaxSampler", "SamplingState"):
        from mathgrpo.rollout import jax_sampler

        return getattr(jax_sampler, name)
    raise AttributeError(f"module 'mathgrpo.rollout' has no attribute {name!r}")


__all__ = ["FINISH_REASONS", "JaxSampler", "Rollout", "RolloutBatch", "SamplingParams", "SamplingState",
           "check_prompts"]
