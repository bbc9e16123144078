"""GRPO's group-relative advantages, as verl's `compute_grpo_outcome_advantage`:

    A_i = (r_i - mean(r)) / (std(r) + eps)

over the G responses of a prompt; std unbiased (/(G-1)); G = 1 gives mean 0, std 1;
eps = 1e-6 (`adv_eps`); `norm_adv_by_std=False` drops the division (Dr.GRPO)."""

from __future__ import annotations

import jax.numpy as jnp


def group_advantages(scores, group_size: int, eps: float = 1e-6, norm_by_std: bool = True):
    """GRPO outcome advantages [B] for scores [B]; the group_size responses of a prompt are contiguous.

    verl `compute_grpo_outcome_advantage`: (r - mean) / (std_unbiased + eps); a group of one has
    mean 0 and std 1; equal scores give exactly 0. `norm_by_std=False` is Dr.GRPO (r - mean).
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    groups = scores.reshape(-1, group_size)  # [P, G]
    if group_size == 1:
        mean, std = jnp.zeros_like(groups), jnp.ones_like(groups)
    else:
        mean = groups.mean(axis=1, keepdims=True)
        std = jnp.sqrt(jnp.sum((groups - mean) ** 2, axis=1, keepdims=True) / (group_size - 1))
    centered = groups - mean
    advantages = centered / (std + eps) if norm_by_std else centered
    return advantages.reshape(-1)
