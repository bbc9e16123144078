"""The train state (fp32 master params, AdamW moments, step counters), its optimizer and
learning-rate schedule, and its shardings."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from mathgrpo.config import ModelConfig, OptimConfig
from mathgrpo.model import abstract_params
from mathgrpo.parallel.mesh import LOGICAL_RULES
from mathgrpo.parallel.shardings import optimizer_state_shardings, param_shardings, replicated


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # [] int32: optimizer updates applied (skipped ones not counted)
    params: Any
    opt_state: Any
    skipped_steps: jax.Array  # [] int32: updates skipped for a non-finite gradient norm


def learning_rate_schedule(optim: OptimConfig) -> optax.Schedule:
    """verl's constant (linear warmup then flat) or cosine (warmup, then cosine to min_lr_ratio)."""
    if optim.schedule == "constant":
        warmup = max(optim.warmup_steps, 1)
        return lambda step: optim.lr * jnp.minimum(1.0, step / warmup) if optim.warmup_steps > 0 else \
            jnp.full((), optim.lr, jnp.float32)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
        decay_steps=optim.total_steps, end_value=optim.lr * optim.min_lr_ratio)


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with decoupled weight decay on every parameter (as verl)."""
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_grad),
        optax.adamw(learning_rate_schedule(optim), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay),
    )


def init_train_state(params: Any, optim: OptimConfig) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=make_optimizer(optim).init(params), skipped_steps=jnp.zeros((), jnp.int32))


def train_state_shardings(model: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules=LOGICAL_RULES):
    """Shardings of a TrainState (step and counters replicated)."""
    params = param_shardings(model, mesh, rules)
    abstract = abstract_params(model)
    return TrainState(step=replicated(mesh), params=params,
                      opt_state=optimizer_state_shardings(optimizer, abstract, params, mesh),
                      skipped_steps=replicated(mesh))
