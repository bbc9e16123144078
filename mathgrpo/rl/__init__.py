"""Reinforcement-learning math: log-probs, advantages, losses, rollout correction, distillation."""
