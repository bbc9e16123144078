"""mathgrpo: the GRPO math recipe for Qwen3 in JAX."""

__version__ = "0.1.0"
