"""On-policy distillation's public functions, importable as `mathgrpo.distill` (they live in rl/distill.py)."""

from mathgrpo.rl.distill import (
    distillation_token_rewards,
    sampled_token_rewards,
    token_reward_direct,
    token_reward_direct_plus_grpo,
    topk_id_sets,
    topk_overlap_ratio,
    topk_policy_loss,
    topk_reverse_kl_rewards,
)

__all__ = ["distillation_token_rewards", "sampled_token_rewards", "token_reward_direct",
           "token_reward_direct_plus_grpo", "topk_id_sets", "topk_overlap_ratio", "topk_policy_loss",
           "topk_reverse_kl_rewards"]
