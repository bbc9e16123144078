"""Training: the train state, packing, the jitted step, the RL loop and SFT."""
