"""The one place that builds a rollout engine: `train`, `eval` and `generate` all call `make_engine`.

`prepare(engine, rollout)` runs first, before JAX starts and before anything is loaded: for vLLM it
sets the environment that splits a GPU between JAX and vLLM and keeps vLLM's engine core in this
process, and it stops with the install command when vLLM is missing; for the JAX sampler it gives JAX
the whole GPU but a margin (`jax_memory_fraction`). The engines themselves import lazily, so choosing
the JAX sampler never imports vLLM or torch.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax

from mathgrpo.config import ENGINES, ModelConfig, RolloutConfig, jax_memory_fraction
from mathgrpo.rollout.base import Rollout, SamplingParams


class EngineUnavailable(RuntimeError):
    """The chosen rollout engine cannot run here; the message says how to install it or what to use."""


def _check_name(engine: str) -> None:
    if engine not in ENGINES:
        raise ValueError(f"rollout engine {engine!r}; expected one of {ENGINES}")


def prepare(engine: str, rollout: RolloutConfig) -> None:
    """Before JAX touches a device: the environment `engine` needs, and a clear stop when it is not installed.
    The JAX sampler's share (`jax_memory_fraction`) is a default: an XLA_PYTHON_CLIENT_MEM_FRACTION already
    set wins."""
    _check_name(engine)
    if engine != "vllm":
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                              f"{jax_memory_fraction(engine, rollout.gpu_memory_utilization):.3f}")
        return
    from mathgrpo.rollout import vllm_engine

    try:
        vllm_engine.check_available()
    except RuntimeError as error:
        raise EngineUnavailable(str(error)) from None
    os.environ.update(vllm_engine.environment_for(rollout))


def make_engine(engine: str, config: ModelConfig, params: Any, *, max_length: int, rollout: RolloutConfig,
                seed: int = 0, mesh=None, rules: Sequence | None = None,
                sampling: SamplingParams | None = None) -> Rollout:
    """The rollout engine `engine` ("jax" or "vllm"), holding its own copy of `params`.

    Args:
      max_length: most tokens (prompt + response) of a sequence.
      rollout: the engine settings (vLLM: memory, KV cache, weight sync, the training sampling
        settings that fix its log-prob mode).
      seed: the engine's own seed (requests carry theirs).
      mesh, rules: the JAX sampler shards on this mesh (None or one device: unsharded).
      sampling: the settings a vLLM engine will serve when they are not the training ones (eval,
        generate): its log-prob mode is chosen for them, raw when no mode is exact (NaN log-probs,
        warned). None: the training settings of `rollout`, where no exact mode is an error.
    """
    _check_name(engine)
    if engine == "vllm":
        from mathgrpo.rollout import vllm_engine

        mode = None
        if sampling is not None:
            try:
                mode = vllm_engine.logprobs_mode_for(sampling)
            except ValueError:
                mode = "raw_logprobs"
        return vllm_engine.VllmEngine(config, params, max_length=max_length, rollout=rollout, seed=seed,
                                      logprobs_mode=mode)
    from mathgrpo.parallel import mesh as parallel_mesh
    from mathgrpo.rollout.jax_sampler import JaxSampler

    # Several processes: each samples its share on its own device from its own copy of the weights, as
    # each GPU's vLLM engine does, never through a decode step that spans every process's devices.
    # rollout.max_slots counts pool rows per device: the pool spans the mesh's batch shards.
    if mesh is not None and mesh.devices.size > 1 and jax.process_count() == 1:
        slots = None if rollout.max_slots is None else rollout.max_slots * parallel_mesh.data_parallel_size(mesh)
        return JaxSampler(config, params, max_length=max_length, mesh=mesh, rules=rules or parallel_mesh.LOGICAL_RULES,
                          max_slots=slots, burst_steps=rollout.burst_steps, weights=rollout.sampler_weights)
    return JaxSampler(config, params, max_length=max_length, max_slots=rollout.max_slots,
                      burst_steps=rollout.burst_steps)
