"""Which process speaks, and host values of arrays that span processes."""

from __future__ import annotations

from typing import Any

import jax


def fetch(tree: Any) -> Any:
    """Host numpy values of (possibly multi-process) arrays: the whole array on every process."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def is_main_process() -> bool:
    return jax.process_index() == 0


def log(message: str) -> None:
    if is_main_process():
        print(message, flush=True)
