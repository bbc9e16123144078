"""Process-level helpers: which process logs, the host allocator."""
