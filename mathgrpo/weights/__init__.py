"""Weights on disk: Hugging Face safetensors (one name table) and Orbax checkpoints."""
