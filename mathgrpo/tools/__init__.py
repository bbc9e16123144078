"""Commands beside training: plan, parity, generate."""
