"""The recipe's math reward: graders, answer normalization and the time-bounded worker pool."""
